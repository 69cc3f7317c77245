"""expose_adapters: adapter initializers become ORT adapter slots; no adapter = base, any rank fits."""

from __future__ import annotations

import copy
import json

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


# ---- modules trained in full (modules_to_save): head slots defaulting to the base head ------------


def _head_served():
    """gemm-mlp with LoRA on fc1 and fc2 and ``head`` trained in full: the graph holds the trained head (the
    corpus values), its base is half the weight and an all-zero bias (what a fresh classifier has)."""
    from lora_fx.export import serve_slots

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    lora = lora_fx.apply(lora_fx.load(corpus().get(ENTRY).path),
                         lora_fx.LoraConfig(r=4, target_modules=["fc1", "fc2"], init_lora_weights=False))
    want = ort_run(save(lora, "expose-head-lora.onnx"), corpus().get(ENTRY).feeds())
    trained = {n: lora.graph.initializers[n].const_value.numpy().copy() for n in ("head.weight", "head.bias")}
    base = {"head.weight": trained["head.weight"] * 0.5, "head.bias": np.zeros_like(trained["head.bias"])}
    adapter = current_adapter(lora, ["head.weight", "head.bias"])
    serve_slots(lora, saved={n: ("head", v) for n, v in base.items()})
    adapter.fingerprint = lora.metadata_props[FINGERPRINT_KEY]
    return lora, adapter, want, trained, base


def _with_head(values: dict) -> ir.Model:
    model = lora_fx.load(corpus().get(ENTRY).path)
    for name, arr in values.items():
        model.graph.initializers[name].const_value = ir.tensor(arr, name=name)
    return model


def test_head_slots_default_to_the_base_head_and_the_adapter_brings_the_trained_one():
    from lora_fx.onnx_adapter import SAVED_KEY, model_slots

    served, adapter, want, trained, base = _head_served()
    feeds = corpus().get(ENTRY).feeds()
    inputs = {v.name for v in served.graph.inputs}
    assert {"head.weight", "head.bias"} <= inputs
    assert json.loads(served.metadata_props[SAVED_KEY]) == {"head.weight": "head", "head.bias": "head"}
    for name in base:
        np.testing.assert_array_equal(served.graph.initializers[name].const_value.numpy(), base[name])
        np.testing.assert_array_equal(adapter.tensors[name], trained[name])
    slots = model_slots(served)
    assert (slots["head.weight"].shape, slots["head.weight"].module) == ((5, 24), "head")
    path = save(served, "expose-head-served.onnx")
    # No adapter: the base model, base head included (LoRA B zero).
    np.testing.assert_allclose(ort_run(path, feeds), ort_run(save(_with_head(base), "expose-head-base.onnx"), feeds), atol=1e-5)
    # The adapter brings its head; the base bias is all zeros, which the optimizer once folded away for good.
    got = ort_run(path, feeds, adapter=write_onnx_adapter(TMP / "expose-head.onnx_adapter", adapter))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(want - ort_run(path, feeds)).max() > 1e-2


def test_the_fingerprint_leaves_the_head_slots_out_and_covers_the_rest():
    served, _, _, _, _ = _head_served()
    before = base_fingerprint(served)
    other_head = copy.deepcopy(served)
    w = other_head.graph.initializers["head.weight"]
    w.const_value = ir.tensor(w.const_value.numpy() + 1.0, name=w.name)
    assert base_fingerprint(other_head) == before  # each adapter brings its own head
    other_base = copy.deepcopy(served)
    w = other_base.graph.initializers["fc2.weight"]
    arr = w.const_value.numpy().copy()
    arr[0, 0] += 1e-3
    w.const_value = ir.tensor(arr, name=w.name)
    assert base_fingerprint(other_base) != before


def test_a_head_slot_of_another_shape_or_name_is_refused():
    from lora_fx.errors import UnsupportedError

    lora = lora_fx.apply(lora_fx.load(corpus().get(ENTRY).path), lora_fx.LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(AdapterError, match=r"base value of head.weight has shape \(3, 24\), but the graph's is \(5, 24\)"):
        expose_adapters(lora, {"head.weight": ("head", np.zeros((3, 24), np.float32))})
    with pytest.raises(UnsupportedError, match=r"classifier.weight \(classifier.*not an initializer.*mode='merged'"):
        expose_adapters(lora, {"classifier.weight": ("classifier", np.zeros((3, 24), np.float32))})
