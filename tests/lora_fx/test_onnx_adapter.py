""".onnx_adapter files and the ONNX side of save_adapter/load_adapter, checked through ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

import lora_fx
from lora_fx.errors import AdapterError
from lora_fx.onnx_adapter import (
    current_adapter, onnx_adapter_to_peft_dir, peft_dir_to_onnx_adapter, read_onnx_adapter, sidecar_path,
    short_fingerprint, stamp_fingerprint, write_onnx_adapter,
)
from lora_fx.passes.onnx.expose_adapters import expose_adapters
from tests.exported import lora_onnx, ort_run, rel, save
from tests.onnx_corpus import corpus

ENTRY = "gemm-mlp"


def test_save_adapter_then_load_adapter_on_a_fresh_onnx_base(tmp_path):
    lora = lora_onnx(ENTRY, r=4, alpha=6)
    feeds = corpus().get(ENTRY).feeds()
    want = ort_run(save(lora, "oa-lora.onnx"), feeds)
    lora_fx.save_adapter(lora, tmp_path / "peft")
    fresh = lora_fx.load_adapter(lora_fx.load(corpus().get(ENTRY).path), tmp_path / "peft")
    assert rel(ort_run(save(fresh, "oa-fresh.onnx"), feeds), want) <= 1e-6


def test_a_refused_adapter_leaves_a_bare_onnx_model_unchanged(tmp_path):
    """load_adapter applies the adapter's config to a bare model only once every tensor fits."""
    import json

    from safetensors.numpy import load_file, save_file

    lora = lora_onnx(ENTRY, r=4, alpha=6)
    lora_fx.save_adapter(lora, tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("fc1.lora_A.weight"))
    tensors[key] = np.zeros((4, tensors[key].shape[1] + 1), tensors[key].dtype)  # one input feature too many
    save_file(tensors, str(weights))
    bare = lora_fx.load(corpus().get(ENTRY).path)
    before = ([n.op_type for n in bare.graph], sorted(bare.graph.initializers), dict(bare.metadata_props))
    with pytest.raises(AdapterError, match=r"expects \(4, \d+\)"):
        lora_fx.load_adapter(bare, tmp_path / "peft")
    assert ([n.op_type for n in bare.graph], sorted(bare.graph.initializers), dict(bare.metadata_props)) == before
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 4


def test_file_round_trips_with_and_without_its_sidecar(tmp_path):
    lora = lora_onnx(ENTRY, r=4, alpha=6)
    feeds = corpus().get(ENTRY).feeds()
    want = ort_run(save(lora, "oa-lora2.onnx"), feeds)
    adapter = current_adapter(lora)
    expose_adapters(lora)
    adapter.fingerprint = stamp_fingerprint(lora)
    served = save(lora, "oa-served.onnx")
    path = write_onnx_adapter(tmp_path / "a.onnx_adapter", adapter)
    back = read_onnx_adapter(path)
    assert back.fingerprint == adapter.fingerprint and back.short_fingerprint == short_fingerprint(adapter.fingerprint)
    assert back.sites["fc1"]["scale"] == pytest.approx(1.5)
    for k, v in adapter.tensors.items():
        np.testing.assert_array_equal(back.tensors[k], v)
    # .onnx_adapter -> PEFT dir -> .onnx_adapter gives the same outputs, with or without the sidecar.
    for keep_sidecar in (True, False):
        if not keep_sidecar:
            sidecar_path(path).unlink()
        peft_dir = onnx_adapter_to_peft_dir(path, tmp_path / f"peft-{keep_sidecar}")
        again = peft_dir_to_onnx_adapter(peft_dir, served, tmp_path / f"again-{keep_sidecar}.onnx_adapter")
        assert rel(ort_run(served, feeds, adapter=again), want) <= 1e-5
    assert read_onnx_adapter(path).fingerprint is None  # only the 31 bits in the file remain


def test_a_sidecar_from_another_file_is_refused(tmp_path):
    lora = lora_onnx(ENTRY)
    a = current_adapter(lora)
    a.fingerprint = "a" * 64
    b = current_adapter(lora)
    b.fingerprint = "b" * 64
    pa = write_onnx_adapter(tmp_path / "a.onnx_adapter", a)
    pb = write_onnx_adapter(tmp_path / "b.onnx_adapter", b)
    sidecar_path(pa).write_text(sidecar_path(pb).read_text())
    with pytest.raises(AdapterError, match="disagree"):
        read_onnx_adapter(pa)
