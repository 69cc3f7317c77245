"""expose_adapters: adapter initializers become ORT adapter slots; no adapter = base, any rank fits."""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import pytest

import lora_fx
from lora_fx.errors import AdapterError
from lora_fx.onnx_adapter import base_fingerprint, current_adapter, read_onnx_adapter, write_onnx_adapter
from lora_fx.passes.onnx.expose_adapters import DEFAULT_RANK, expose_adapters, rank_dim
from lora_fx.passes.onnx.lora_layout import FINGERPRINT_KEY
from tests.exported import TMP, lora_onnx, ort_run, rel, save
from tests.onnx_corpus import corpus

ENTRY = "gemm-mlp"


def _served(r: int = 4, seed: int = 0):
    lora = lora_onnx(ENTRY, r=r, seed=seed)
    want = ort_run(save(lora, f"expose-lora-r{r}-s{seed}.onnx"), corpus().get(ENTRY).feeds())
    adapter = current_adapter(lora)
    result = expose_adapters(lora)
    adapter.fingerprint = lora.metadata_props[FINGERPRINT_KEY]
    return lora, adapter, want, result


def test_slots_are_inputs_with_zero_defaults_and_a_symbolic_rank():
    served, adapter, _, result = _served()
    assert sorted(result.changed) == ["fc1", "fc2", "head"]
    inputs = {v.name: v for v in served.graph.inputs}
    for site, (n_in, n_out) in {"fc1": (16, 32), "fc2": (32, 24), "head": (24, 5)}.items():
        a, b = inputs[f"{site}.lora_A.weight"], inputs[f"{site}.lora_B.weight"]
        assert a is served.graph.initializers[a.name] and b is served.graph.initializers[b.name]
        assert [str(d) if not isinstance(d, int) else d for d in a.shape] == [n_in, rank_dim(site)]
        assert [str(d) if not isinstance(d, int) else d for d in b.shape] == [rank_dim(site), n_out]
        # Real zeros of rank >= 1, never rank 0 (onnxruntime issue 21483).
        for value, shape in ((a, (n_in, DEFAULT_RANK)), (b, (DEFAULT_RANK, n_out))):
            arr = value.const_value.numpy()
            assert arr.shape == shape and arr.size > 0 and not arr.any()
        assert adapter.tensors[a.name].shape == (n_in, 4) and np.abs(adapter.tensors[b.name]).max() > 0


def test_no_active_adapter_is_the_base_model_and_the_adapter_restores_the_lora_model():
    served, adapter, want, _ = _served()
    path = save(served, "expose-served.onnx")
    feeds = corpus().get(ENTRY).feeds()
    base = ort_run(corpus().get(ENTRY).path, feeds)
    np.testing.assert_array_equal(ort_run(path, feeds), base)
    adapter_path = write_onnx_adapter(TMP / "expose-default.onnx_adapter", adapter)
    got = ort_run(path, feeds, adapter=adapter_path)  # plain onnxruntime: LoraAdapter + add_active_adapter
    assert rel(got, want) <= 1e-5 and rel(want, base) > 1e-2


def test_an_adapter_of_another_rank_runs_in_the_same_session():
    served, _, _, _ = _served(r=4)
    path = save(served, "expose-served-r4.onnx")
    other, adapter2, want2, _ = _served(r=2, seed=7)
    adapter2.fingerprint = served.metadata_props[FINGERPRINT_KEY]
    p2 = write_onnx_adapter(TMP / "expose-r2.onnx_adapter", adapter2)
    assert read_onnx_adapter(p2).tensors["fc1.lora_A.weight"].shape == (16, 2)
    assert rel(ort_run(path, corpus().get(ENTRY).feeds(), adapter=p2), want2) <= 1e-5


def test_fingerprint_is_of_the_base_weights():
    served, _, _, _ = _served()
    base = lora_fx.load(corpus().get(ENTRY).path)
    assert served.metadata_props[FINGERPRINT_KEY] == base_fingerprint(base)
    changed = copy.deepcopy(base)
    w = changed.graph.initializers["fc2.weight"]
    arr = w.const_value.numpy().copy()
    arr[0, 0] += 1e-3
    w.const_value = ir.tensor(arr, name=w.name)
    assert base_fingerprint(changed) != base_fingerprint(base)


def test_exposing_twice_changes_nothing_and_a_model_without_lora_is_refused():
    served, _, _, _ = _served()
    assert not expose_adapters(served).modified
    with pytest.raises(AdapterError, match="no LoRA adapter"):
        expose_adapters(lora_fx.load(corpus().get(ENTRY).path))


def test_lora_dropout_changes_neither_the_fingerprint_nor_what_the_served_model_computes():
    from lora_fx.export import serve_slots

    lora = lora_onnx(ENTRY, dropout=0.3)
    want = ort_run(save(lora, "expose-dropout-lora.onnx"), corpus().get(ENTRY).feeds())
    adapter = current_adapter(lora)
    serve_slots(lora)
    assert not any(n.op_type == "Dropout" for n in lora.graph)  # an inference graph: the optimizer drops them
    assert lora.metadata_props[FINGERPRINT_KEY] == base_fingerprint(lora_fx.load(corpus().get(ENTRY).path))
    adapter.fingerprint = lora.metadata_props[FINGERPRINT_KEY]
    path = save(lora, "expose-dropout-served.onnx")
    got = ort_run(path, corpus().get(ENTRY).feeds(), adapter=write_onnx_adapter(TMP / "expose-dropout.onnx_adapter", adapter))
    assert rel(got, want) <= 1e-5
