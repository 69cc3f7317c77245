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


# ---- a merged model is a plain model: it can be rewritten again ------------------------------------------------------
# Before: each adapted node kept insert_lora's ``lora_fx.adapted`` marker through the fold, so rewriting the merged
# model refused every site it had merged ("already has a LoRA adapter ... fold the existing adapter first").
def _lora_keys(model: ir.Model) -> list[str]:
    """The ``lora_fx.`` keys of the model's metadata and of its nodes' in every graph (If branches too)."""
    from lora_fx.passes.onnx.find_sites import subgraph_graphs

    keys = set(model.metadata_props) | {k for g in subgraph_graphs(model) for n in g for k in n.metadata_props}
    return sorted(k for k in keys if k.startswith("lora_fx."))


def _round_trip(model: ir.Model) -> ir.Model:
    """As written to a file and read back: what a second ``lora-fx rewrite`` of the merged file reads."""
    return ir.from_proto(ir.to_proto(model))


def _rewrite(model: ir.Model, targets) -> ir.Model:
    import torch

    torch.manual_seed(1)  # the same random (non-zero) adapters for the model and its reference
    return lora_fx.apply(model, lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))


def _holding(model: ir.Model, weights: dict[str, np.ndarray]) -> ir.Model:
    """``model`` (the float base, never adapted) with ``weights`` written into its initializers of those names."""
    for name, array in weights.items():
        value = model.graph.initializers[name]
        value.const_value = ir.tensor(np.ascontiguousarray(array.astype(value.const_value.numpy().dtype)), name=name)
    return model


def _ort_model(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # quantized matmuls in float
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def _rewritten_again(merged: ir.Model, reference: ir.Model, targets, run) -> float:
    """Rewrite the merged model again and ``reference`` (the float model holding the merged weights) with the same
    adapters; returns how far apart their ORT outputs are. The new adapters change the outputs, so it can fail."""
    assert _lora_keys(merged) == []  # neither the model nor any node says it was adapted
    merged = _round_trip(merged)
    before = run(merged)
    again, want = _rewrite(merged, targets), _rewrite(reference, targets)
    assert sorted(json.loads(again.metadata_props[LORA_KEY])) == sorted(json.loads(want.metadata_props[LORA_KEY]))
    for name in (n for n in want.graph.initializers if ".lora_" in n):
        np.testing.assert_array_equal(again.graph.initializers[name].const_value.numpy(),
                                      want.graph.initializers[name].const_value.numpy())
    out = run(again)
    assert rel(out, before) > 1e-2
    return rel(out, run(want))


def _decoder_case():
    from tests.passes.onnx.test_find_sites_subgraphs import _feeds, merged_decoder

    base = lambda: ir.from_proto(merged_decoder(np.random.default_rng(0)))  # noqa: E731
    feeds = [_feeds(np.random.default_rng(2), use_cache) for use_cache in (True, False)]  # both If branches
    return base, ["q_proj", "v_proj"], lambda m: np.concatenate([_ort_model(m, f) for f in feeds])


def _corpus_case(entry: str):
    from tests.exported import SEED_TARGETS

    feeds = corpus().get(entry).feeds()
    return lambda: lora_fx.load(corpus().get(entry).path), SEED_TARGETS[entry], lambda m: _ort_model(m, feeds)


@pytest.mark.parametrize("case", ["gemm-mlp", "fp16-mlp", "merged-decoder"])
def test_a_merged_model_is_rewritten_again_as_the_base_model_holding_its_merged_weights(case):
    import torch

    base, targets, run = _decoder_case() if case == "merged-decoder" else _corpus_case(case)
    torch.manual_seed(0)
    merged = lora_fx.apply(base(), lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    assert fold_lora(merged).modified
    assert sorted(merged.graph.initializers) == sorted(base().graph.initializers)  # merged in place: same names
    reference = _holding(base(), {n: v.const_value.numpy() for n, v in merged.graph.initializers.items()})
    assert _rewritten_again(merged, reference, targets, run) <= 1e-6


@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "int4", "int8"])
@pytest.mark.parametrize("mode", ["float", "requantize"])
def test_a_merged_qlora_model_is_rewritten_again_as_the_float_model_of_its_merged_weights(name, mode):
    """``--merge --float`` (merged sites plain MatMuls) and ``--merge --requantize`` (stored quantized again, in their
    format): rewritten again, each computes what the float MLP holding the merged weights does with the same adapters."""
    from lora_fx.passes.onnx.fold_lora import QuantMerge
    from tests.passes.onnx.test_fold_lora_quantized import X, _decode, _qlora
    from tests.passes.onnx.test_quantize_weights import _mlp

    merged = _qlora(name)
    fold_lora(merged, QuantMerge(mode))

    def weight(site: str) -> np.ndarray:
        """The site's merged W [in, out]: decoded from its storage (independently), or the float W the fold wrote."""
        if f"{site}.weight_q" in merged.graph.initializers:
            return _decode(merged, site).T
        matmul = next(n for n in merged.graph if n.op_type == "MatMul" and n.inputs[1].name.startswith(f"{site}."))
        return matmul.inputs[1].const_value.numpy()

    stored = any(n.endswith(".weight_q") for n in merged.graph.initializers)
    assert stored == (mode == "requantize")
    reference = _holding(_mlp()[0], {f"{s}.weight": weight(s) for s in ("fc1", "fc2")})
    assert _rewritten_again(merged, reference, ".*", lambda m: _ort_model(m, {"x": X})) <= 1e-5


def test_a_file_merged_before_the_marks_were_dropped_is_rewritten_too():
    """Merged files written before fold_lora dropped insert_lora's node marks keep stale ``lora_fx.adapted`` marks on
    plain weights; with no adapter tensor left in the graph they no longer refuse a rewrite."""
    import torch

    from lora_fx.passes.onnx.insert_lora import ADAPTED

    base, targets, run = _corpus_case("gemm-mlp")
    torch.manual_seed(0)
    merged = lora_fx.apply(base(), lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    fold_lora(merged)
    reference = _holding(base(), {n: v.const_value.numpy() for n, v in merged.graph.initializers.items()})
    marked = [n for n in merged.graph if n.op_type == "Gemm"]
    for node in marked:
        node.metadata_props[ADAPTED] = "1"  # as the fold left them before
    assert marked
    again, want = _rewrite(merged, targets), _rewrite(reference, targets)
    assert rel(run(again), run(want)) <= 1e-6
