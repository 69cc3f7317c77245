"""Linear and attention layers inside control-flow subgraphs: linear layers in If branches on main-graph weights are
sites (one adapter, a branch in every If branch); attention and Loop bodies are found and reported, never rewritten.

The models are built by hand the way the exporters that write them lay them out: Hugging Face Optimum's merged decoder
(``decoder_model_merged.onnx``: one ``If`` named ``optimum::if``, switched by ``use_cache_branch``, the decoder with and
without past key values as its two branches, both reading the weights as outer-scope initializers of the main graph)
and a ``Loop`` whose body runs a layer on outer-scope weights.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lora_fx
from lora_fx.cli import main
from lora_fx.errors import TargetNotFoundError
from lora_fx.passes.onnx.find_sites import find_sites, site_nodes
from lora_fx.passes.onnx.insert_lora import apply_lora, lora_metadata
from lora_fx.sites import SiteKind

F = TensorProto.FLOAT
HIDDEN, VOCAB, LAYERS = 8, 11, 2
OPSET = [helper.make_opsetid("", 17)]


def _weights(rng: np.random.Generator) -> list[onnx.TensorProto]:
    """A tiny decoder's parameters, stored ``[in, out]`` as TorchScript exports keep MatMul weights."""
    arrays = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN))}
    for i in range(LAYERS):
        for proj in ("q_proj", "v_proj"):
            arrays[f"model.layers.{i}.self_attn.{proj}.weight"] = rng.standard_normal((HIDDEN, HIDDEN)) / HIDDEN**0.5
        arrays[f"model.layers.{i}.self_attn.v_proj.bias"] = rng.standard_normal(HIDDEN)
    arrays["lm_head.weight"] = rng.standard_normal((HIDDEN, VOCAB)) / HIDDEN**0.5
    return [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]


def _decoder_nodes(tag: str, ids: str, extra: str | None = None) -> tuple[list[onnx.NodeProto], str]:
    """One branch's decoder: embedding lookup, per layer ``relu(q_proj(h)) -> v_proj (+ bias)`` with a residual, and
    lm_head; the nodes named as TorchScript names them. ``extra`` (the past, in the with-past branch) is added in."""
    t = lambda name: f"{name}_{tag}"  # noqa: E731  (value names must be unique across the model's graphs)
    nodes = [helper.make_node("Gather", ["model.embed_tokens.weight", ids], [t("h0")], name="/model/embed_tokens/Gather")]
    h = t("h0")
    if extra is not None:
        nodes.append(helper.make_node("Add", [h, extra], [t("hp")], name="/model/past/Add"))
        h = t("hp")
    for i in range(LAYERS):
        scope = f"/model/layers.{i}/self_attn"
        w = f"model.layers.{i}.self_attn"
        nodes += [
            helper.make_node("MatMul", [h, f"{w}.q_proj.weight"], [t(f"q{i}")], name=f"{scope}/q_proj/MatMul"),
            helper.make_node("Relu", [t(f"q{i}")], [t(f"r{i}")], name=f"{scope}/Relu"),
            helper.make_node("MatMul", [t(f"r{i}"), f"{w}.v_proj.weight"], [t(f"v{i}")], name=f"{scope}/v_proj/MatMul"),
            helper.make_node("Add", [t(f"v{i}"), f"{w}.v_proj.bias"], [t(f"vb{i}")], name=f"{scope}/v_proj/Add"),
            helper.make_node("Add", [h, t(f"vb{i}")], [t(f"h{i + 1}")], name=f"/model/layers.{i}/Add"),
        ]
        h = t(f"h{i + 1}")
    nodes.append(helper.make_node("MatMul", [h, "lm_head.weight"], [t("logits")], name="/lm_head/MatMul"))
    return nodes, t("logits")


def merged_decoder(rng: np.random.Generator) -> onnx.ModelProto:
    """Optimum's merged decoder layout: the main graph is the If alone, over shared initializers."""
    with_past, out_p = _decoder_nodes("with_past", "input_ids", extra="past")
    no_past, out_n = _decoder_nodes("no_past", "input_ids")
    logits = lambda name: helper.make_tensor_value_info(name, F, ["b", "s", VOCAB])  # noqa: E731
    then_g = helper.make_graph(with_past, "with_past", [], [logits(out_p)])
    else_g = helper.make_graph(no_past, "no_past", [], [logits(out_n)])
    node = helper.make_node("If", ["use_cache_branch"], ["logits"], name="optimum::if", then_branch=then_g, else_branch=else_g)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("past", F, ["b", "s", HIDDEN]),
              helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])]
    graph = helper.make_graph([node], "merged", inputs, [logits("logits")], _weights(rng))
    return helper.make_model(graph, opset_imports=OPSET, ir_version=10)


def looped_model(rng: np.random.Generator) -> onnx.ModelProto:
    """A Loop whose body runs a linear layer and a decomposed attention on outer-scope weights, with an If nested in
    the body holding one more linear layer."""
    names = ["blk.q.weight", "blk.k.weight", "blk.v.weight", "blk.gate.weight"]
    inits = [numpy_helper.from_array((rng.standard_normal((HIDDEN, HIDDEN)) / HIDDEN**0.5).astype(np.float32), n) for n in names]
    inits.append(numpy_helper.from_array(np.array(HIDDEN**0.5, np.float32), "sqrt_d"))
    gate = helper.make_graph([helper.make_node("MatMul", ["h_in", "blk.gate.weight"], ["g"], name="/blk/gate/MatMul")],
                             "gate", [], [helper.make_tensor_value_info("g", F, [1, 1, 4, HIDDEN])])
    keep = helper.make_graph([helper.make_node("Identity", ["h_in"], ["g2"])], "keep", [], [helper.make_tensor_value_info("g2", F, [1, 1, 4, HIDDEN])])
    body_nodes = [
        helper.make_node("MatMul", ["h_in", "blk.q.weight"], ["q"], name="/blk/q/MatMul"),
        helper.make_node("MatMul", ["h_in", "blk.k.weight"], ["k"], name="/blk/k/MatMul"),
        helper.make_node("MatMul", ["h_in", "blk.v.weight"], ["v"], name="/blk/v/MatMul"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2], name="/blk/attn/Transpose"),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="/blk/attn/MatMul"),
        helper.make_node("Div", ["s", "sqrt_d"], ["sd"], name="/blk/attn/Div"),
        helper.make_node("Softmax", ["sd"], ["p"], axis=-1, name="/blk/attn/Softmax"),
        helper.make_node("MatMul", ["p", "v"], ["o"], name="/blk/attn/MatMul_1"),
        helper.make_node("If", ["gated"], ["go"], name="/blk/If", then_branch=gate, else_branch=keep),
        helper.make_node("Add", ["o", "go"], ["h_out"], name="/blk/Add"),
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
    ]
    shape = [1, 1, 4, HIDDEN]
    body = helper.make_graph(
        body_nodes, "layer",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", F, shape)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("h_out", F, shape)],
    )
    node = helper.make_node("Loop", ["n", "", "x"], ["y"], name="layer_loop", body=body)
    inputs = [helper.make_tensor_value_info("x", F, shape), helper.make_tensor_value_info("n", TensorProto.INT64, []),
              helper.make_tensor_value_info("gated", TensorProto.BOOL, [])]
    graph = helper.make_graph([node], "looped", inputs, [helper.make_tensor_value_info("y", F, shape)], inits)
    return helper.make_model(graph, opset_imports=OPSET, ir_version=10)


def mixed_model(rng: np.random.Generator) -> onnx.ModelProto:
    """An encoder linear in the main graph (``enc.fc``, bias Add) feeding the merged decoder's If, whose branches read
    its output from the outer scope."""
    proto = merged_decoder(rng)
    graph = proto.graph
    graph.initializer.extend([
        numpy_helper.from_array((rng.standard_normal((HIDDEN, HIDDEN)) / HIDDEN**0.5).astype(np.float32), "enc.fc.weight"),
        numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32), "enc.fc.bias"),
    ])
    encoder = [helper.make_node("MatMul", ["enc_in", "enc.fc.weight"], ["enc_mm"], name="/enc/fc/MatMul"),
               helper.make_node("Add", ["enc_mm", "enc.fc.bias"], ["enc_out"], name="/enc/fc/Add")]
    for node in list(graph.node):
        graph.node.remove(node)
    graph.node.extend(encoder + [node])
    # The branches' past is the encoder's output now: the subgraphs read a value the rewrite redirects.
    for attr in graph.node[-1].attribute:
        for sub in attr.g.node:
            sub.input[:] = ["enc_out" if name == "past" else name for name in sub.input]
    graph.input.remove(next(i for i in graph.input if i.name == "past"))
    graph.input.insert(0, helper.make_tensor_value_info("enc_in", F, ["b", "s", HIDDEN]))
    # Both branches read the past, so the no-past one does too (as a cross-attention would).
    no_past = next(a.g for a in graph.node[-1].attribute if a.name == "else_branch")
    first = no_past.node[0]
    no_past.node.insert(1, helper.make_node("Add", [first.output[0], "enc_out"], ["h0_enc_no_past"], name="/model/enc/Add"))
    for sub in list(no_past.node)[2:]:
        sub.input[:] = ["h0_enc_no_past" if name == first.output[0] else name for name in sub.input]
    return proto


def _ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def _ort(model: ir.Model | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    onnx.checker.check_model(proto)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def _feeds(rng: np.random.Generator, use_cache: bool) -> dict[str, np.ndarray]:
    return {
        "input_ids": rng.integers(0, VOCAB, (2, 3)).astype(np.int64),
        "past": rng.standard_normal((2, 3, HIDDEN)).astype(np.float32),
        "enc_in": rng.standard_normal((2, 3, HIDDEN)).astype(np.float32),
        "use_cache_branch": np.array([use_cache]),
    }


DECODER_LINEAR = [f"model.layers.{i}.self_attn.{p}" for i in range(LAYERS) for p in ("q_proj", "v_proj")] + ["lm_head"]


# ---- find_sites -----------------------------------------------------------------------------------


def test_merged_decoder_layers_are_one_site_each_with_a_node_in_both_branches():
    model = _ir(merged_decoder(np.random.default_rng(0)))
    sites = find_sites(model)
    # Each layer once, though both branches hold it; named and shaped as in the main graph.
    assert [(s.name, s.in_features, s.out_features, s.has_bias) for s in sites] == [
        (n, HIDDEN, VOCAB if n == "lm_head" else HIDDEN, n.endswith("v_proj")) for n in DECODER_LINEAR]
    assert [s.name for s in sites if s.is_output_layer] == ["lm_head"]
    assert sites.inside == {n: "If node 'optimum::if' (else_branch, then_branch)" for n in DECODER_LINEAR}
    for site in sites:
        assert sorted(n.graph.name for n in site_nodes(model, site.handle)) == ["no_past", "with_past"]
    assert (sites.subgraphs, sites.unreachable, sites.unreachable_note) == ([], [], None)


def test_loop_body_layers_and_nested_control_flow_are_found():
    sites = find_sites(_ir(looped_model(np.random.default_rng(0))))
    assert list(sites) == []
    (group,) = sites.subgraphs
    assert (group.node.name, group.subgraphs) == ("layer_loop", ["body"])
    assert [(s.name, s.kind) for s in group.sites] == [
        ("blk.q", SiteKind.LINEAR), ("blk.k", SiteKind.LINEAR), ("blk.v", SiteKind.LINEAR), ("blk.attn", SiteKind.ATTENTION),
        ("blk.gate", SiteKind.LINEAR),  # in the If nested in the body
    ]
    assert sites.unreachable_note.startswith("4 linear layers and 1 attention site (blk.q, blk.k, blk.v, ...) lie inside the "
                                             "subgraphs of Loop node 'layer_loop' (body), which lora_fx does not rewrite")
    assert "Export the model without control flow" in sites.unreachable_note
    assert "Optimum" not in sites.unreachable_note


def test_branch_copies_of_a_layer_with_other_node_names_count_once():
    """An optimizer may rename each branch's nodes apart (``MatMul_3``, ``MatMul_17``) and leave the weight an anonymous
    ``onnx::`` initializer: the copies still read one outer-scope weight, so they are one layer."""
    w = numpy_helper.from_array(np.ones((HIDDEN, HIDDEN), np.float32), "onnx::MatMul_5")
    branch = lambda tag, name: helper.make_graph(  # noqa: E731
        [helper.make_node("MatMul", ["x", "onnx::MatMul_5"], [f"y_{tag}"], name=name)], tag, [],
        [helper.make_tensor_value_info(f"y_{tag}", F, ["b", HIDDEN])])
    node = helper.make_node("If", ["c"], ["y"], name="If_0", then_branch=branch("a", "MatMul_3"), else_branch=branch("b", "MatMul_17"))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", F, ["b", HIDDEN]),
                                            helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", F, ["b", HIDDEN])], [w])
    model = _ir(helper.make_model(graph, opset_imports=OPSET))
    sites = find_sites(model)
    assert [s.name for s in sites] == ["MatMul_17"]  # else_branch comes first in the node's attributes
    assert sites.inside == {"MatMul_17": "If node 'If_0' (else_branch, then_branch)"}
    assert [n.name for n in site_nodes(model, sites[0].handle)] == ["MatMul_17", "MatMul_3"]


def test_a_model_without_control_flow_reports_nothing_beyond_its_sites(onnx_corpus):
    sites = find_sites(lora_fx.load(onnx_corpus.get("gemm-mlp").path))
    assert [s.name for s in sites] == ["fc1", "fc2", "head"]
    assert (sites.subgraphs, sites.unreachable, sites.unreachable_note) == ([], [], None)


# ---- targeting and the rewrite --------------------------------------------------------------------


def _folded(proto: onnx.ModelProto, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> onnx.ModelProto:
    """The reference: ``proto`` with each adapter merged into its ``[in, out]`` weight by hand (PEFT's B @ A is [out, in])."""
    merged = onnx.ModelProto()
    merged.CopyFrom(proto)
    for site, (a, b) in adapters.items():
        w = next(t for t in merged.graph.initializer if t.name == f"{site}.weight")
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) + scale * (b @ a).numpy().T, w.name))
    return merged


def _adapters(names: list[str], r: int = 2) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    out = {}
    for name in names:
        n_out = VOCAB if name == "lm_head" else HIDDEN
        out[name] = (torch.randn(r, HIDDEN, generator=g), torch.randn(n_out, r, generator=g) * 0.3)
    return out


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("target", [["q_proj", "v_proj"], "all-linear", ".*q_proj"])
def test_merged_decoder_adapts_both_branches_as_folded_weights_do(target, use_cache):
    proto = merged_decoder(np.random.default_rng(0))
    model = _ir(proto)
    config = lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=target)
    expected = DECODER_LINEAR[0:4:2] if target == ".*q_proj" else DECODER_LINEAR[:-1]  # all-linear leaves lm_head out
    adapters = _adapters(expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left out, so nothing to warn about
        apply_lora(model, config, adapters=adapters)
    assert sorted(lora_metadata(model)) == sorted(expected)
    # One A and B per site, in the main graph.
    assert sorted(n for n in model.graph.initializers if ".lora_" in n) == sorted(
        f"{s}.lora_{ab}.weight" for s in expected for ab in "AB")
    feeds = _feeds(np.random.default_rng(1), use_cache)
    got, want, base = _ort(model, feeds), _ort(_folded(proto, adapters, 2.0), feeds), _ort(proto, feeds)
    assert np.abs(want - base).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_merged_decoder_with_dropout_hoist_and_fold_matches_the_folded_weights():
    from lora_fx.passes.onnx.fold_lora import fold_lora
    from lora_fx.passes.onnx.hoist_lora_add import hoist_lora_add

    proto = merged_decoder(np.random.default_rng(0))
    model = _ir(proto)
    adapters = _adapters(DECODER_LINEAR)
    apply_lora(model, lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=DECODER_LINEAR, lora_dropout=0.1), adapters=adapters)
    ratios = [n for n in model.graph.initializers if n.endswith("lora_dropout.ratio")]
    assert len(ratios) == len(DECODER_LINEAR)  # one per site, as PEFT has one nn.Dropout per layer
    assert sorted(hoist_lora_add(model).changed) == sorted(DECODER_LINEAR[1:4:2])  # the v_proj biases, in both branches
    want = _folded(proto, adapters, 2.0)
    for use_cache in (True, False):
        feeds = _feeds(np.random.default_rng(1), use_cache)
        np.testing.assert_allclose(_ort(model, feeds), _ort(want, feeds), rtol=1e-4, atol=1e-4)
    fold_lora(model)
    # Exactly the base file's nodes again, in every graph; only the weights differ.
    counts = lambda m: sorted((g.name, n.op_type) for g in [m.graph, *m.graph.subgraphs()] for n in g)  # noqa: E731
    assert counts(model) == counts(_ir(proto)) and set(model.graph.initializers) == set(_ir(proto).graph.initializers)
    for use_cache in (True, False):
        feeds = _feeds(np.random.default_rng(1), use_cache)
        np.testing.assert_allclose(_ort(model, feeds), _ort(want, feeds), rtol=1e-4, atol=1e-4)


def test_passes_that_cannot_handle_branch_sites_refuse_them_before_any_change():
    from lora_fx.errors import UnsupportedError
    from lora_fx.passes.onnx.lora_layout import find_branch, find_branches, read_records

    model = _ir(merged_decoder(np.random.default_rng(0)))
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(UnsupportedError, match=r"modules_to_save names lm_head, whose linear layer lm_head lies inside If branches"):
        lora_fx.apply(model, lora_fx.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert ir.to_proto(model).SerializeToString() == before
    apply_lora(model, lora_fx.LoraConfig(r=2, target_modules=["q_proj"]))
    site, rec = next(iter(read_records(model).items()))
    with pytest.raises(UnsupportedError, match=r"with its LoRA branch in 2 places .*lora_layout.find_branches"):
        find_branch(model.graph, site, rec)
    assert len(find_branches(model.graph, site, rec)) == 2


def branch_alone(rng: np.random.Generator, use_cache: bool) -> onnx.ModelProto:
    """One branch of ``merged_decoder`` as a model of its own (the unmerged file), on the same weights."""
    nodes, out = _decoder_nodes("with_past", "input_ids", extra="past") if use_cache else _decoder_nodes("no_past", "input_ids")
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])]
    if use_cache:
        inputs.append(helper.make_tensor_value_info("past", F, ["b", "s", HIDDEN]))
    graph = helper.make_graph(nodes, "alone", inputs, [helper.make_tensor_value_info(out, F, ["b", "s", VOCAB])], _weights(rng))
    return helper.make_model(graph, opset_imports=OPSET, ir_version=10)


QUANTS = {"nf4": dict(dtype="nf4", block_size=16, double_quant=True, double_quant_block_size=2),
          "int4": dict(dtype="int4", block_size=16, symmetric=False), "int8": dict(dtype="int8")}


def _qlora(proto: onnx.ModelProto, quant: str, adapters: dict) -> ir.Model:
    from lora_fx.passes.onnx.quantize_weights import quantize_weights

    model = _ir(proto)
    quantize_weights(model, lora_fx.QuantConfig(target_modules=DECODER_LINEAR, **QUANTS[quant]))
    apply_lora(model, lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=DECODER_LINEAR), adapters=adapters)
    return model


@pytest.mark.parametrize("quant", list(QUANTS))
def test_qlora_stores_a_branch_site_once_and_each_branch_computes_what_it_does_alone(quant):
    """quantize_weights on a site inside If branches: the storage once in the main graph, the quantized op at every
    branch node; each branch (and, folded with requantize or in float, each folded branch) computes what the same
    decoder does quantized as a file of its own."""
    from lora_fx.passes.onnx.fold_lora import fold_lora

    adapters = _adapters(DECODER_LINEAR)
    proto = merged_decoder(np.random.default_rng(0))
    model = _qlora(proto, quant, adapters)
    assert not [n for n in model.graph.initializers if n in {f"{s}.weight" for s in DECODER_LINEAR}]  # float W gone
    assert sorted(n for n in model.graph.initializers if n.endswith(".weight_q")) == sorted(f"{s}.weight_q" for s in DECODER_LINEAR)
    op = {"nf4": "MatMulBnb4", "int4": "MatMulNBits", "int8": "DequantizeLinear"}[quant]
    branches = list(model.graph.subgraphs())
    assert len(branches) == 2 and all(sum(n.op_type == op for n in g) == len(DECODER_LINEAR) and not g.initializers
                                      for g in branches)
    assert sorted(find_sites(model).inside) == sorted(DECODER_LINEAR)  # still one site each, adapters included
    folded = {how: _qlora(proto, quant, adapters) for how in ("requantize", "float")}
    for how, m in folded.items():
        fold_lora(m, how)
    for use_cache in (True, False):
        alone = branch_alone(np.random.default_rng(0), use_cache)
        feeds = _feeds(np.random.default_rng(1), use_cache)
        got, want = _ort(model, feeds), _ort(_qlora(alone, quant, adapters), feeds)
        assert np.abs(got - _ort(alone, feeds)).max() > 1e-2  # quantization and adapter count
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for how, m in folded.items():
            reference = _qlora(alone, quant, adapters)
            fold_lora(reference, how)
            np.testing.assert_allclose(_ort(m, feeds), _ort(reference, feeds), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_ort(folded["float"], feeds), got, rtol=1e-4, atol=1e-4)


def test_qlora_refuses_a_branch_site_whose_nodes_read_its_weight_in_different_layouts():
    from lora_fx.errors import UnsupportedError
    from lora_fx.passes.onnx.quantize_weights import quantize_weights

    proto = merged_decoder(np.random.default_rng(0))
    then = next(a.g for a in proto.graph.node[0].attribute if a.name == "then_branch")
    # The with-past branch reads the (square) q_proj weight transposed: one weight, two layouts.
    w = "model.layers.0.self_attn.q_proj.weight"
    mm = next(n for n in then.node if w in n.input)
    mm.input[1] = "wt_with_past"
    then.node.insert(0, helper.make_node("Transpose", [w], ["wt_with_past"], perm=[1, 0], name="/model/layers.0/self_attn/q_proj/T"))
    model = _ir(proto)
    assert "model.layers.0.self_attn.q_proj" in find_sites(model).inside
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(UnsupportedError, match=r"site model.layers.0.self_attn.q_proj: its If-branch nodes .* read its weight "
                                               r"in different layouts.*exclude_modules"):
        quantize_weights(model, lora_fx.QuantConfig(dtype="int4", block_size=16, target_modules=DECODER_LINEAR))
    assert ir.to_proto(model).SerializeToString() == before


def test_folding_refuses_a_quantized_branch_site_whose_nodes_read_different_storage():
    from lora_fx.errors import UnsupportedError
    from lora_fx.passes.onnx.fold_lora import fold_lora
    from lora_fx.passes.onnx.quantized_weight import new_initializer

    model = _qlora(merged_decoder(np.random.default_rng(0)), "int4", _adapters(DECODER_LINEAR))
    # One branch's q_proj reads a copy of the packed W of its own: no one W + A @ B is right for both nodes.
    q = model.graph.initializers["model.layers.0.self_attn.q_proj.weight_q"]
    node = next(n for g in model.graph.subgraphs() for n in g if n.op_type == "MatMulNBits" and n.inputs[1] is q)
    node.replace_input_with(1, new_initializer(model.graph, "copy.weight_q", q.const_value.numpy().copy()))
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(UnsupportedError, match=r"site model.layers.0.self_attn.q_proj: its If-branch nodes read different "
                                               r"quantized weights.*adapter slots"):
        fold_lora(model, "requantize")
    assert ir.to_proto(model).SerializeToString() == before


def test_loop_model_is_refused_with_the_generic_way_out():
    with pytest.raises(TargetNotFoundError, match=r"inside the subgraphs of Loop node 'layer_loop' \(body\).*without control flow"):
        lora_fx.apply(_ir(looped_model(np.random.default_rng(0))), lora_fx.LoraConfig(r=2, target_modules=["q", "v"]))


def test_prefix_tuning_on_attention_only_inside_a_loop_is_refused_with_the_note():
    model = _ir(looped_model(np.random.default_rng(0)))
    before = set(model.graph.initializers)
    with pytest.raises(TargetNotFoundError, match=r"only 1 inside control-flow subgraphs: .*Loop node 'layer_loop'"):
        lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=2))
    assert set(model.graph.initializers) == before


@pytest.mark.parametrize("use_cache", [True, False])
def test_mixed_model_adapts_the_main_graph_and_the_branches(use_cache):
    proto = mixed_model(np.random.default_rng(0))
    model = _ir(proto)
    adapters = {"enc.fc": _adapters(["enc.fc"])["enc.fc"], **_adapters(DECODER_LINEAR[:-1])}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_lora(model, lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"), adapters=adapters)
    assert sorted(lora_metadata(model)) == sorted(["enc.fc", *DECODER_LINEAR[:-1]])
    feeds = _feeds(np.random.default_rng(1), use_cache)
    np.testing.assert_allclose(_ort(model, feeds), _ort(_folded(proto, adapters, 2.0), feeds), rtol=1e-5, atol=1e-5)


def test_mixed_model_adapter_reaches_the_branches_as_merged_weights_do():
    """A nonzero adapter on the main-graph site changes what the branches read, exactly as folding it into W does."""
    proto = mixed_model(np.random.default_rng(0))
    feeds = _feeds(np.random.default_rng(1), True)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, HIDDEN, generator=g), torch.randn(HIDDEN, 2, generator=g)
    config = lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=["enc.fc"])
    model = _ir(proto)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enc.fc alone matches no subgraph layer: nothing to warn about
        apply_lora(model, config, adapters={"enc.fc": (a, b)})
    merged = onnx.ModelProto()
    merged.CopyFrom(proto)
    w = next(t for t in merged.graph.initializer if t.name == "enc.fc.weight")
    # The stored weight is [in, out] (x @ W): PEFT's B @ A is [out, in].
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) + 2.0 * (b @ a).numpy().T, "enc.fc.weight"))
    got, want, base = _ort(model, feeds), _ort(merged, feeds), _ort(proto, feeds)
    assert np.abs(want - base).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_main_graph_target_alone_does_not_warn():
    model = _ir(mixed_model(np.random.default_rng(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora_fx.apply(model, lora_fx.LoraConfig(r=2, target_modules=["fc"]))
    assert sorted(lora_metadata(model)) == ["enc.fc"]


# ---- lora-fx sites --------------------------------------------------------------------------------


def test_sites_command_lists_branch_layers_as_sites_and_says_where(tmp_path, capsys):
    path = tmp_path / "decoder_model_merged.onnx"
    onnx.save(mixed_model(np.random.default_rng(0)), str(path))
    assert main(["sites", str(path)]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ["enc.fc", *DECODER_LINEAR]) and "6 sites: 6 linear, 0 attention" in out, out
    assert "5 of them inside If node 'optimum::if' (else_branch, then_branch)" in out and "not rewritable" not in out, out
    assert main(["sites", str(path), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [(e["name"], e.get("inside")) for e in entries] == [("enc.fc", None)] + [
        (n, "If node 'optimum::if' (else_branch, then_branch)") for n in DECODER_LINEAR]


def test_sites_command_still_lists_loop_layers_as_not_rewritable(tmp_path, capsys):
    path = tmp_path / "looped.onnx"
    onnx.save(looped_model(np.random.default_rng(0)), str(path))
    assert main(["sites", str(path), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert {(e["rewritable"], e["inside"]) for e in entries} == {(False, "Loop node 'layer_loop' (body)")}


def test_rewrite_command_adapts_a_merged_decoder(tmp_path, capsys):
    path = tmp_path / "decoder_model_merged.onnx"
    proto = merged_decoder(np.random.default_rng(0))
    onnx.save(proto, str(path))
    out = tmp_path / "lora.onnx"
    assert main(["rewrite", str(path), "-o", str(out), "--target-modules", "q_proj,v_proj", "--init", "gaussian"]) == 0
    model = lora_fx.load(str(out))
    assert sorted(lora_metadata(model)) == sorted(DECODER_LINEAR[:-1])
    for use_cache in (True, False):  # B starts at zero: the base model, in either branch
        feeds = _feeds(np.random.default_rng(1), use_cache)
        np.testing.assert_array_equal(_ort(model, feeds), _ort(proto, feeds))
