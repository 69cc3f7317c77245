"""PEFT prefix-tuning directories with NaN/inf tensors: refused as LoRA files are, before the model changes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_fx
from lora_fx.errors import AdapterError
from tests.models import build, inputs, run
from tests.onnx_corpus import corpus


@pytest.fixture(scope="module")
def peft_prefix(tmp_path_factory):
    """A PEFT prefix-tuning adapter of the tiny GPT-2 (4 virtual tokens) and the PEFT model's output."""
    import peft

    directory = tmp_path_factory.mktemp("prefix") / "adapter"
    torch.manual_seed(0)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    pm = peft.get_peft_model(copy.deepcopy(build("gpt2")), config).eval()
    pm.save_pretrained(directory)
    return directory, run(pm, inputs(2, 8, seed=3))


def _spoil(directory, tmp_path, name: str, value: float, key: str = "prompt_embeddings"):
    """A copy of ``directory`` whose tensor ``key`` holds ``value`` in three places (added if the file lacks it)."""
    import shutil

    out = tmp_path / name
    shutil.copytree(directory, out)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    spoilt = tensors.get(key, torch.zeros(4, 8)).clone()
    spoilt.view(-1)[:3] = value
    tensors[key] = spoilt
    save_file(tensors, str(weights))
    return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_prefix_adapter_leaves_a_torch_model_as_it_was(peft_prefix, tmp_path, value):
    directory, want = peft_prefix
    bad = _spoil(directory, tmp_path, "bad", value)
    gm = lora_fx.capture(build("gpt2"), kwargs=inputs(2, 8))
    base = run(gm, inputs(2, 8, seed=3))
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: adapter tensor 'prompt_embeddings' holds 3 NaN or "
                                           r"inf values of \d+; .*diverged.*train again"):
        lora_fx.load_adapter(gm, bad)
    # Refused before apply: no prefix slots were added, the outputs are the base model's.
    from lora_fx.passes.fx.capture import meta

    assert not meta(gm).get("prefix")
    torch.testing.assert_close(run(gm, inputs(2, 8, seed=3)), base, rtol=0, atol=0)
    # The finite directory loads onto the same model and gives PEFT's outputs.
    lora_fx.load_adapter(gm, directory)
    torch.testing.assert_close(run(gm, inputs(2, 8, seed=3)), want, rtol=1e-5, atol=1e-5)
    # Onto a model that already has prefixes: they keep their values.
    before = {n: p.detach().clone() for n, p in gm.named_parameters() if "prefix_" in n}
    with pytest.raises(AdapterError, match="NaN or inf"):
        lora_fx.load_adapter(gm, bad)
    for n, p in gm.named_parameters():
        if n in before:
            torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)
    torch.testing.assert_close(run(gm, inputs(2, 8, seed=3)), want, rtol=1e-5, atol=1e-5)


def test_a_non_finite_prefix_adapter_leaves_an_onnx_model_as_it_was(peft_prefix, tmp_path):
    directory, want = peft_prefix
    model = lora_fx.load(corpus().get("gpt2-torchscript").path)
    before = ([n.op_type for n in model.graph], sorted(model.graph.initializers), dict(model.metadata_props))
    for name, key in (("emb", "prompt_embeddings"), ("encoder", "prefix_encoder.transform.0.weight")):
        with pytest.raises(AdapterError, match=rf"adapter tensor '{key}' holds 3 NaN or inf values"):
            lora_fx.load_adapter(model, _spoil(directory, tmp_path, name, float("nan"), key))
        assert ([n.op_type for n in model.graph], sorted(model.graph.initializers), dict(model.metadata_props)) == before
    # The same directory, finite: prefix slots are added, and ONNX Runtime computes PEFT's outputs.
    import onnxruntime as ort

    lora_fx.load_adapter(model, directory)
    lora_fx.save(model, tmp_path / "prefixed.onnx")
    sess = ort.InferenceSession(str(tmp_path / "prefixed.onnx"), providers=["CPUExecutionProvider"])
    b = inputs(2, 8, seed=3)
    got = sess.run(None, {i.name: b[i.name].numpy() for i in sess.get_inputs()})[0]
    assert np.abs(got - want.numpy()).max() / np.abs(want.numpy()).max() <= 1e-5


def _attention_sites(model):
    from lora_fx.passes.onnx.find_sites import find_sites
    from lora_fx.sites import SiteKind

    return [s.name for s in find_sites(model) if s.kind is SiteKind.ATTENTION]


def test_save_adapter_refuses_onnx_prefixes_on_some_layers(tmp_path):
    """save_adapter of an ONNX file prefixed at one of two layers wrote num_layers 1 and a target_modules key PEFT ignores;
    PEFT's forward then failed (its prefix-tuning has no per-layer targets). Refused, naming the .onnx_adapter way out."""
    model = lora_fx.load(corpus().get("gpt2-torchscript").path)
    first, second = _attention_sites(model)
    lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=3, task_type="CAUSAL_LM", target_modules=[first]))
    with pytest.raises(AdapterError, match=rf"no per-layer targets.*1 of the model's 2 attention layers.*{second}.*"
                                           r"\.onnx_adapter export.*--adapters --no-peft"):
        lora_fx.save_adapter(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_onnx_prefixes_on_every_layer_named_in_target_modules_save_as_peft_reads_them(tmp_path):
    """target_modules naming every attention site: the directory leaves it out (PEFT ignores it, and it named the ONNX
    file's sites, which a torch capture names otherwise): it loads onto a fresh capture with the file's outputs."""
    import onnxruntime as ort

    from lora_fx.config import read_adapter_config

    entry = corpus().get("gpt2-torchscript")
    model = lora_fx.load(entry.path)
    lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=3, task_type="CAUSAL_LM", target_modules=_attention_sites(model)))
    lora_fx.save_adapter(model, tmp_path / "peft")
    assert "target_modules" not in read_adapter_config(tmp_path / "peft")
    lora_fx.save(model, tmp_path / "p.onnx")
    x = inputs(2, 8, seed=3)
    sess = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    want = sess.run(None, {k: v.numpy() for k, v in x.items() if k in names})[0]
    gm = lora_fx.load_adapter(lora_fx.capture(build("gpt2"), kwargs=inputs(2, 8)), tmp_path / "peft")
    got = run(gm, x).numpy()
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5
    assert np.abs(run(lora_fx.capture(build("gpt2"), kwargs=inputs(2, 8)), x).numpy() - want).max() > 1e-3
