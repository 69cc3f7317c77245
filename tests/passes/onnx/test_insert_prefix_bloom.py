"""ONNX prefix-tuning on Bloom (heads merged into the batch axis, ALiBi) against PEFT, on exports by the dynamo and
the TorchScript exporters.

Bloom's attention runs ``MatMul`` on ``[batch * heads, ...]`` around a ``[batch, heads, q, k]`` Reshape and adds
ALiBi to its scores. PEFT's cache of T prefixes comes with a mask of T ones in front, from which Bloom computes
ALiBi for T + n keys (without a mask: over ``arange(T + n)``); the ONNX pass recomputes it the same way
(tests/passes/fx/test_insert_prefix_bloom.py does the same on the FX graph). Checked here: sites, outputs with and
without left padding, one step's prefix gradients, and the served export (``lora-fx export --adapters``).
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from contextlib import redirect_stdout

import numpy as np
import onnxruntime as ort
import pytest
import torch

import lora_fx
from lora_fx.passes.onnx.insert_prefix import insert_prefix, prefix_metadata
from lora_fx.runtime.onnx_torch import OnnxModule
from lora_fx.sites import SiteKind
from tests.models import inputs, run
from tests.passes.fx.test_insert_prefix_bloom import SHAPES, T, _peft, batch, bloom
from tests.passes.onnx.prefix_grads import assert_peft_prefix_gradients
from tests.runtime.onnx_models import _Positional

pytestmark = pytest.mark.slow  # each export of the tiny Bloom takes ~5 s

SITES = ["transformer.h.0.self_attention", "transformer.h.1.self_attention"]
EXPORTERS = ["dynamo", "torchscript"]


def _export(path, exporter: str, names=("input_ids", "attention_mask")) -> None:
    """As a user exports it: dynamo with its default optimizer, or TorchScript (positional inputs) at opset 17 or,
    ``torchscript12``, 12 (the inserted nodes then spelled in opset-12 ops)."""
    model = bloom()
    model.config.use_cache = False  # the exporters cannot output a DynamicCache
    kw = {k: v for k, v in inputs(2, 8).items() if k in names}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dims = {k: {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")} for k in kw}
            torch.onnx.export(model, (), str(path), kwargs=kw, dynamo=True, opset_version=18, input_names=list(kw),
                              output_names=["logits"], dynamic_shapes=dims, verbose=False)
        else:
            torch.onnx.export(_Positional(model, list(kw), ["logits"]), tuple(kw.values()), str(path), dynamo=False,
                              opset_version=12 if exporter == "torchscript12" else 17, input_names=list(kw),
                              output_names=["logits"],
                              dynamic_axes={k: {0: "batch", 1: "seq"} for k in kw})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bloom")
    cache = {}

    def get(exporter: str, mask: bool = True):
        if (exporter, mask) not in cache:
            path = tmp / f"bloom-{exporter}{'' if mask else '-nomask'}.onnx"
            _export(path, exporter, ("input_ids", "attention_mask") if mask else ("input_ids",))
            cache[exporter, mask] = path
        return cache[exporter, mask]

    return get


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    """PEFT's prefix-tuning of the tiny Bloom (random prompt embeddings, T virtual tokens), saved, and the model."""
    directory = tmp_path_factory.mktemp("peft") / "adapter"
    torch.manual_seed(3)
    pm = _peft(bloom())
    pm.save_pretrained(directory)
    return directory, pm


def _names(exporter: str) -> list[str]:
    # TorchScript names the modules by their call path, here under the export wrapper's "model.".
    return [f"model.{s}" for s in SITES] if exporter.startswith("torchscript") else SITES


def _session(model, path):
    lora_fx.save(model, path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_bloom_attention_is_found_with_its_heads(exported, exporter):
    sites = lora_fx.find_sites(lora_fx.load(exported(exporter)))
    attention = [s for s in sites if s.kind is SiteKind.ATTENTION]
    assert [s.name for s in attention] == _names(exporter)
    assert {(s.op, s.num_heads, s.kv_heads, s.head_dim) for s in attention} == {("merged_heads", 4, 4, 8)}
    assert len([s for s in sites if s.kind is SiteKind.LINEAR]) == 9


@pytest.mark.parametrize("exporter", [*EXPORTERS, "torchscript12"])
def test_peft_adapter_gives_peft_outputs(exported, peft_adapter, exporter, tmp_path):
    """With and without left padding (the last shape) and ragged right padding; Bloom moves no positions."""
    directory, pm = peft_adapter
    base = bloom()
    model = lora_fx.load_adapter(lora_fx.load(exported(exporter)), directory)
    assert list(prefix_metadata(model)["sites"]) == _names(exporter)
    sess = _session(model, tmp_path / "prefixed.onnx")
    for size, seq, pad, left in SHAPES:
        b = batch(size, seq, pad, left)
        keep = b["attention_mask"].bool().numpy()
        ours = sess.run(None, {k: v.numpy() for k, v in b.items()})[0]
        ref = run(pm, b).numpy()
        assert _rel(ours[keep], ref[keep]) <= 1e-5, (size, seq, pad, left)
        assert _rel(run(base, b).numpy()[keep], ref[keep]) > 1e-2
    # ALiBi's cumsum of the mask is no position to move, under PEFT or here.
    fresh = lora_fx.load(exported(exporter))
    assert insert_prefix(fresh, lora_fx.PrefixConfig(num_virtual_tokens=T)).changed == _names(exporter)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_without_a_mask_alibi_counts_over_t_plus_n(exported, peft_adapter, exporter, tmp_path):
    directory, pm = peft_adapter
    model = lora_fx.load_adapter(lora_fx.load(exported(exporter, mask=False)), directory)
    sess = _session(model, tmp_path / "prefixed.onnx")
    for size, seq, _, _ in [s for s in SHAPES if not s[2]]:
        ids = batch(size, seq)["input_ids"]
        ours = sess.run(None, {"input_ids": ids.numpy()})[0]
        assert _rel(ours, run(pm, {"input_ids": ids}).numpy()) <= 1e-5, (size, seq)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_one_step_has_peft_prefix_gradients(exported, peft_adapter, exporter):
    directory, pm = peft_adapter
    model = lora_fx.load_adapter(lora_fx.load(exported(exporter)), directory)
    module = OnnxModule(model)
    assert sorted(module.trainable_names) == sorted(f"{s}.prefix_{w}" for s in _names(exporter) for w in ("key", "value"))
    b = batch(3, 9, 3, left=True)
    assert_peft_prefix_gradients(model, module, pm, b, keep=b["attention_mask"].bool())


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_served_export_runs_in_onnx_runtime_and_switches_adapters(exported, peft_adapter, exporter, tmp_path):
    """``lora-fx export --adapters`` of the prefix-tuned file: slots defaulting to the loaded prefixes, an
    .onnx_adapter and a PEFT directory that give PEFT's outputs, and a second adapter switched in per run."""
    import peft

    from lora_fx.cli import main

    directory, pm = peft_adapter
    base = bloom()
    prefixed = tmp_path / "prefixed.onnx"
    lora_fx.save(lora_fx.load_adapter(lora_fx.load(exported(exporter)), directory), prefixed)
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["export", str(prefixed), "-o", str(tmp_path / "served.onnx"), "--adapters", "--json"]) == 0
    summary = json.loads(out.getvalue())
    assert summary["mode"] == "adapters" and summary["sites"] == _names(exporter)
    sess = ort.InferenceSession(summary["model"], providers=["CPUExecutionProvider"])
    assert {i.name for i in sess.get_overridable_initializers()} == {f"{s}.prefix_{w}" for s in _names(exporter)
                                                                     for w in ("key", "value")}
    # A second PEFT adapter, exported from another copy of the file, switched in through ONNX Runtime's adapter API.
    torch.manual_seed(11)
    other = _peft(base)
    other.save_pretrained(tmp_path / "other")
    lora_fx.save(lora_fx.load_adapter(lora_fx.load(exported(exporter)), tmp_path / "other"), tmp_path / "other.onnx")
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["export", str(tmp_path / "other.onnx"), "-o", str(tmp_path / "other-served.onnx"), "--adapters",
                     "--name", "other", "--json"]) == 0
    other_adapter = json.loads(out.getvalue())["adapters"][0]
    for size, seq, pad, left in SHAPES[1:]:
        b = batch(size, seq, pad, left)
        keep = b["attention_mask"].bool().numpy()
        feeds = {k: v.numpy() for k, v in b.items()}
        want = run(pm, b).numpy()
        assert _rel(sess.run(None, feeds)[0][keep], want[keep]) <= 1e-5
        for adapter, ref in ((summary["adapters"][0], want), (other_adapter, run(other, b).numpy())):
            loaded = ort.LoraAdapter()
            loaded.Load(adapter)
            opts = ort.RunOptions()
            opts.add_active_adapter(loaded)
            assert _rel(sess.run(None, feeds, opts)[0][keep], ref[keep]) <= 1e-5, (adapter, size, seq, pad, left)
    # The PEFT directory written beside it is the same adapter in PEFT.
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), summary["peft_dirs"][0]).eval()
    b = batch(3, 11, 4)
    keep = b["attention_mask"].bool().numpy()
    assert _rel(run(back, b).numpy()[keep], run(pm, b).numpy()[keep]) <= 1e-6
