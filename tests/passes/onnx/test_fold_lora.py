"""fold_lora: W' = W + A @ B in every weight layout; the folded model is the base graph with new weights."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx_ir as ir
import pytest

import lora_fx
from lora_fx.errors import AdapterError, UnsupportedError
from lora_fx.passes.onnx.fold_lora import fold_lora
from lora_fx.passes.onnx.lora_layout import LORA_KEY
from tests.exported import lora_onnx, ort_run, rel, save
from tests.onnx_corpus import corpus


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _proto_bytes(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


@pytest.mark.parametrize("entry, tol", [("gemm-mlp", 1e-5), ("forms", 1e-5), ("fp16-mlp", 5e-3)])
def test_folded_model_computes_the_lora_model_with_the_base_graph(entry, tol):
    """Gemm transB=1/0 with alpha, MatMul over Transpose(W), plain MatMul [in, out], bias Adds, tied W, fp16."""
    base = lora_fx.load(corpus().get(entry).path)
    feeds = corpus().get(entry).feeds()
    lora = lora_onnx(entry)
    lora_path = save(lora, f"fold-{entry}-lora.onnx")
    want = ort_run(lora_path, feeds)
    assert rel(want, ort_run(corpus().get(entry).path, feeds)) > 1e-2  # the adapters do change the output

    result = fold_lora(lora)
    assert result.modified and sorted(result.changed) == sorted(json.loads(lora_onnx(entry).metadata_props[LORA_KEY]))
    folded_path = save(lora, f"fold-{entry}-folded.onnx")
    assert rel(ort_run(folded_path, feeds), want) <= tol
    # Exactly the base model's nodes and op types; no adapter initializer or metadata left.
    assert _ops(lora) == _ops(base)
    assert not [n for n in lora.graph.initializers if ".lora_" in n]
    assert LORA_KEY not in lora.metadata_props
    assert {v.name for v in lora.graph.inputs} == {v.name for v in base.graph.inputs}


def test_tied_weight_keeps_its_value_for_its_other_user():
    lora = lora_onnx("forms")
    # Adapt only the first of the two MatMuls sharing tied.weight.
    model = lora_fx.load(corpus().get("forms").path)
    lora = lora_fx.apply(model, lora_fx.LoraConfig(r=2, target_modules=["tied"], init_lora_weights=False))
    tied_before = lora.graph.initializers["tied.weight"].const_value.numpy().copy()
    want = ort_run(save(lora, "tied-lora.onnx"), corpus().get("forms").feeds())
    fold_lora(lora)
    np.testing.assert_array_equal(lora.graph.initializers["tied.weight"].const_value.numpy(), tied_before)
    second = next(n for n in lora.graph if n.name == "tied_second")
    assert second.inputs[1].name == "tied.weight"
    assert rel(ort_run(save(lora, "tied-folded.onnx"), corpus().get("forms").feeds()), want) <= 1e-5


@pytest.mark.parametrize("site", ["enc.half", "enc.q8", "enc.q4"])
def test_weights_that_are_not_stored_floats_are_refused_and_nothing_changes(site):
    """A Cast, DequantizeLinear or MatMulNBits weight cannot absorb a float delta: say so, change nothing."""
    model = lora_fx.load(corpus().get("forms").path)
    lora = lora_fx.apply(model, lora_fx.LoraConfig(r=2, target_modules=["enc.proj", site], init_lora_weights=False))
    before = _proto_bytes(lora)
    with pytest.raises(UnsupportedError, match=rf"site {site}.*adapter slots"):
        fold_lora(lora)
    assert _proto_bytes(lora) == before


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_merge_is_refused_before_anything_changes(bad):
    lora = lora_onnx("gemm-mlp")
    b = lora.graph.initializers["fc2.lora_B.weight"]
    arr = b.const_value.numpy().copy()
    arr[0, 0] = bad
    b.const_value = ir.tensor(arr, name=b.name)
    before = _proto_bytes(lora)
    with pytest.raises(AdapterError, match="site fc2: .*non-finite"):
        fold_lora(lora)
    assert _proto_bytes(lora) == before


def test_overflow_in_the_weight_dtype_is_refused():
    lora = lora_onnx("fp16-mlp")
    b = lora.graph.initializers["up.lora_B.weight"]
    b.const_value = ir.tensor(np.full(b.const_value.numpy().shape, 6e4, np.float16), name=b.name)
    a = lora.graph.initializers["up.lora_A.weight"]
    a.const_value = ir.tensor(np.ones(a.const_value.numpy().shape, np.float16), name=a.name)  # A @ B = r * 6e4 > fp16 max
    with pytest.raises(AdapterError, match="non-finite"):
        fold_lora(lora)


def test_prefix_adapters_cannot_be_folded():
    lora = lora_onnx("gemm-mlp")
    lora.metadata_props["lora_fx.prefix"] = "{}"
    with pytest.raises(UnsupportedError, match="prefix.*--adapters"):
        fold_lora(lora)


def test_a_model_without_lora_is_left_alone():
    model = lora_fx.load(corpus().get("gemm-mlp").path)
    before = _proto_bytes(model)
    assert not fold_lora(copy.deepcopy(model)).modified
    assert _proto_bytes(model) == before


def test_a_branch_with_lora_dropout_folds_to_the_base_graph():
    base = lora_fx.load(corpus().get("gemm-mlp").path)
    feeds = corpus().get("gemm-mlp").feeds()
    with_dropout, without = lora_onnx("gemm-mlp", dropout=0.3), lora_onnx("gemm-mlp")
    assert "Dropout" in _ops(with_dropout)
    fold_lora(with_dropout)
    fold_lora(without)
    assert _ops(with_dropout) == _ops(base)
    assert sorted(with_dropout.graph.initializers) == sorted(base.graph.initializers)  # the ratios went with the branch
    np.testing.assert_array_equal(ort_run(save(with_dropout, "fold-dropout.onnx"), feeds),
                                  ort_run(save(without, "fold-no-dropout.onnx"), feeds))


def test_bias_read_through_identity_folds():
    """The TorchScript exporter stores equal tensors once and reads the copies through Identity (Qwen2's zero
    k_proj and v_proj biases): v_proj's bias Add reads Identity(k_proj.bias), and folding must still see W."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    w = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(w(8, 6), "k_proj.weight"), numpy_helper.from_array(w(8, 6), "v_proj.weight"),
             numpy_helper.from_array(np.zeros(6, np.float32), "k_proj.bias")]
    nodes = [
        helper.make_node("MatMul", ["x", "k_proj.weight"], ["k0"], name="/k_proj/MatMul"),
        helper.make_node("Add", ["k_proj.bias", "k0"], ["k"], name="/k_proj/Add"),
        helper.make_node("Identity", ["k_proj.bias"], ["v_proj.bias"], name="Identity_0"),
        helper.make_node("MatMul", ["x", "v_proj.weight"], ["v0"], name="/v_proj/MatMul"),
        helper.make_node("Add", ["v_proj.bias", "v0"], ["v"], name="/v_proj/Add"),
        helper.make_node("Mul", ["k", "v"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "identity_bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 6])], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8))
    lora = lora_fx.apply(model, lora_fx.LoraConfig(r=2, target_modules=["k_proj", "v_proj"], init_lora_weights=False))
    feeds = {"x": rng.standard_normal((3, 8)).astype(np.float32)}
    want = ort_run(save(lora, "identity-bias-lora.onnx"), feeds)
    result = fold_lora(lora)
    assert sorted(result.changed) == ["k_proj", "v_proj"]
    assert rel(ort_run(save(lora, "identity-bias-folded.onnx"), feeds), want) <= 1e-5
    assert [n.op_type for n in lora.graph] == ["MatMul", "Add", "Identity", "MatMul", "Add", "Mul"]


def test_transpose_shared_by_two_sites_folds_each_delta_into_its_own_site():
    """One Transpose(W) read by two MatMuls (a layer called twice, after an exporter's common-subexpression
    elimination): each site gets its own merged W; folding both into W would give both sites one delta."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Transpose", ["shared.weight"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["h"], name="/first/MatMul"),
             helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("MatMul", ["t", "wt"], ["y"], name="/second/MatMul")]
    graph = helper.make_graph(nodes, "shared_transpose", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
                              [numpy_helper.from_array((rng.standard_normal((8, 8)) * 0.3).astype(np.float32), "shared.weight")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10))
    lora = lora_fx.apply(model, lora_fx.LoraConfig(r=2, target_modules=["first", "second"], init_lora_weights=False))
    feeds = {"x": rng.standard_normal((3, 8)).astype(np.float32)}
    want = ort_run(save(lora, "shared-transpose-lora.onnx"), feeds)
    fold_lora(lora)
    assert rel(ort_run(save(lora, "shared-transpose-folded.onnx"), feeds), want) <= 1e-5
    assert [n.op_type for n in lora.graph] == ["Transpose", "MatMul", "Tanh", "MatMul"]


def test_a_weight_held_by_a_constant_node_is_refused_by_name_and_folds_once_lifted():
    """The refusal names the Constant node and the pass that makes its value an initializer; after that pass
    the fold gives the unfolded model's outputs."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["w"], name="w_const", value=numpy_helper.from_array(w, "w_value")),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="fc/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    lora_fx.apply(model, lora_fx.LoraConfig(r=2, target_modules=".*", init_lora_weights="gaussian"))
    for value in model.graph.initializers.values():
        if value.name.endswith("lora_B.weight"):
            value.const_value = ir.tensor(rng.standard_normal(value.shape.numpy()).astype(np.float32), name=value.name)
    feeds = {"x": rng.standard_normal((3, 8)).astype(np.float32)}
    want = ort_run(save(model, "fold-const-lora.onnx"), feeds)
    with pytest.raises(UnsupportedError, match=r"Constant node 'w_const'.*LiftConstantsToInitializersPass"):
        fold_lora(ir.from_proto(ir.to_proto(model)))
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    fold_lora(model)
    assert "MatMul" in _ops(model) and not any("lora" in n for n in model.graph.initializers)
    assert rel(ort_run(save(model, "fold-const-folded.onnx"), feeds), want) <= 1e-5
