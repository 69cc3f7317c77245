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
