"""find_sites on ONNX: exact counts, module-path names, heads, every linear form, inserted nodes skipped."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lora_fx
from lora_fx.passes.onnx.find_sites import find_sites
from lora_fx.sites import IRKind, SiteKind

ZOO = [
    "bert-dynamo18", "gpt2-dynamo18", "llama-dynamo18", "bert-dynamo23", "llama-dynamo23", "llama-dynamo18-noopt",
    "bert-torchscript", "gpt2-torchscript", "llama-torchscript", "minilm-torchscript", "bert-ortfused", "llama-ortfused",
]
HAND = ["gemm-mlp", "fp16-mlp", "forms"]


def _linear_modules(model: torch.nn.Module) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO + HAND)
def test_exact_site_counts(onnx_corpus, name):
    entry = onnx_corpus.get(name)
    sites = lora_fx.find_sites(lora_fx.load(entry.path))
    linear = [s for s in sites if s.kind is SiteKind.LINEAR]
    attention = [s for s in sites if s.kind is SiteKind.ATTENTION]
    assert (len(linear), len(attention)) == (entry.n_linear, entry.n_attention), [s.name for s in sites]
    assert all(s.ir is IRKind.ONNX and isinstance(s.handle, ir.Node) for s in sites)
    assert len({s.name for s in sites}) == len(sites), "site names must be unique"


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_linear_names_are_torch_module_paths(onnx_corpus, name):
    entry = onnx_corpus.get(name)
    sites = lora_fx.find_sites(lora_fx.load(entry.path))
    names = {s.name.removeprefix(entry.prefix) for s in sites if s.kind is SiteKind.LINEAR and s.op != "com.microsoft.Attention"}
    expected = _linear_modules(entry.model)
    if not entry.same_sites_as_fx:  # q/k/v fused into one packed projection
        expected = {n for n in expected if n.rsplit(".", 1)[-1] not in ("query", "key", "value")}
    assert names == expected
    out = [s.name.removeprefix(entry.prefix) for s in sites if s.is_output_layer]
    assert out == (["lm_head"] if "lm_head" in expected else [])


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_attention_sites_have_heads_and_block_names(onnx_corpus, name):
    entry = onnx_corpus.get(name)
    att = [s for s in lora_fx.find_sites(lora_fx.load(entry.path)) if s.kind is SiteKind.ATTENTION]
    arch = name.split("-")[0]
    blocks = {"bert": "encoder.layer.{}.attention.self", "minilm": "encoder.layer.{}.attention.self",
              "gpt2": "transformer.h.{}.attn", "llama": "model.layers.{}.self_attn"}[arch]
    assert [s.name.removeprefix(entry.prefix) for s in att] == [blocks.format(i) for i in range(entry.n_attention)]
    for s in att:
        assert (s.num_heads, s.kv_heads, s.head_dim) == entry.heads, s


def test_forms_ops_shapes_and_tied_names(onnx_corpus):
    entry = onnx_corpus.get("forms")
    sites = find_sites(lora_fx.load(entry.path))
    got = [(s.name, s.op, s.in_features, s.out_features, s.has_bias, s.fan_in_fan_out, s.is_output_layer) for s in sites]
    assert got == [
        ("enc.proj", "MatMul", 16, 32, True, False, False),  # Transpose of an [out, in] weight, bias Add
        ("enc.half", "MatMul", 32, 32, False, True, False),  # Cast fp16 -> fp32
        ("enc.q8", "MatMul", 32, 32, False, True, False),  # DequantizeLinear int8
        ("enc.q4", "com.microsoft.MatMulNBits", 32, 32, False, False, False),
        ("tied", "MatMul", 32, 32, False, True, False),  # one weight, two uses: two sites
        ("tied_1", "MatMul", 32, 32, False, True, False),  # reaches the output but projects onto no vocabulary
    ]
    assert all(s.dtype == "float32" for s in sites)


def test_gemm_transb_and_bias(onnx_corpus):
    sites = find_sites(lora_fx.load(onnx_corpus.get("gemm-mlp").path))
    assert [(s.name, s.in_features, s.out_features, s.has_bias, s.fan_in_fan_out, s.is_output_layer) for s in sites] == [
        ("fc1", 16, 32, True, False, False), ("fc2", 32, 24, False, True, False), ("head", 24, 5, True, False, False),
    ]


def _contrib_attention_model() -> ir.Model:
    """MultiHeadAttention, GroupQueryAttention, com.microsoft.Attention and MatMulBnb4 nodes (for matching only)."""
    f = TensorProto.FLOAT
    w = numpy_helper.from_array(np.zeros((32, 96), np.float32), "qkv.weight")
    b = numpy_helper.from_array(np.zeros(96, np.float32), "qkv.bias")
    nf4 = numpy_helper.from_array(np.zeros(32 * 32 // 2, np.uint8), "nf4.weight")
    absmax = numpy_helper.from_array(np.ones(32 * 32 // 64, np.float32), "nf4.absmax")
    nodes = [
        helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o1"], name="/enc/mha/MultiHeadAttention", domain="com.microsoft", num_heads=4),
        helper.make_node("GroupQueryAttention", ["q", "k8", "v8", "", "", "seqlens", "total"], ["o2", "pk", "pv"],
                         name="/dec/gqa/GroupQueryAttention", domain="com.microsoft", num_heads=4, kv_num_heads=1),
        helper.make_node("Attention", ["q", "qkv.weight", "qkv.bias"], ["o3"], name="/enc/fused/Attention", domain="com.microsoft", num_heads=4),
        helper.make_node("MatMulBnb4", ["q", "nf4.weight", "nf4.absmax"], ["o4"], name="/enc/nf4/MatMulBnb4", domain="com.microsoft",
                         K=32, N=32, block_size=64, quant_type=1),
    ]
    inputs = [helper.make_tensor_value_info(n, f, ["b", "s", d]) for n, d in (("q", 32), ("k", 32), ("v", 32), ("k8", 8), ("v8", 8))]
    inputs += [helper.make_tensor_value_info("seqlens", TensorProto.INT32, ["b"]), helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("o1", "o2", "o3", "o4")]
    graph = helper.make_graph(nodes, "contrib", inputs, outputs, [w, b, nf4, absmax])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return ir.serde.deserialize_model(model)


def test_contrib_attention_ops_and_bnb4():
    sites = find_sites(_contrib_attention_model())
    got = [(s.name, s.kind.value, s.op, s.num_heads, s.kv_heads, s.head_dim, s.in_features, s.out_features) for s in sites]
    assert got == [
        ("enc.mha", "attention", "com.microsoft.MultiHeadAttention", 4, 4, 8, 32, 32),
        ("dec.gqa", "attention", "com.microsoft.GroupQueryAttention", 4, 1, 8, 32, 32),
        ("enc.fused.qkv", "linear", "com.microsoft.Attention", None, None, None, 32, 96),
        ("enc.fused", "attention", "com.microsoft.Attention", 4, 4, 8, 32, 32),
        ("enc.nf4", "linear", "com.microsoft.MatMulBnb4", None, None, None, 32, 32),
    ]


def test_decomposed_torchscript_div_form():
    """TorchScript's older form: MatMul(q, kᵀ) → Div by sqrt(d) → Add mask → Softmax → MatMul(·, v)."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2], name="/blk/attn/Transpose"),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="/blk/attn/MatMul"),
        helper.make_node("Div", ["s", "sqrt_d"], ["sd"], name="/blk/attn/Div"),
        helper.make_node("Add", ["sd", "mask"], ["sm"], name="/blk/attn/Add"),
        helper.make_node("Softmax", ["sm"], ["p"], axis=-1, name="/blk/attn/Softmax"),
        helper.make_node("MatMul", ["p", "v"], ["o"], name="/blk/attn/MatMul_1"),
    ]
    shape = [1, 2, 5, 16]
    inputs = [helper.make_tensor_value_info(n, f, shape) for n in ("q", "k", "v")] + [helper.make_tensor_value_info("mask", f, [1, 1, 5, 5])]
    graph = helper.make_graph(nodes, "div_attn", inputs, [helper.make_tensor_value_info("o", f, shape)],
                              [numpy_helper.from_array(np.array(4.0, np.float32), "sqrt_d")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    (site,) = find_sites(model)
    assert (site.name, site.kind, site.op, site.num_heads, site.head_dim) == ("blk.attn", SiteKind.ATTENTION, "decomposed", 2, 16)


def test_lora_nodes_are_not_sites_and_rewrite_keeps_counts(onnx_corpus):
    entry = onnx_corpus.get("gemm-mlp")
    model = lora_fx.load(entry.path)
    before = [s.name for s in find_sites(model)]
    lora_fx.apply(model, lora_fx.LoraConfig(r=2, target_modules="all-linear"))
    assert [s.name for s in find_sites(model)] == before


def test_no_sites_in_a_graph_without_weights():
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"]), helper.make_node("Relu", ["c"], ["y"])], "plain",
        [helper.make_tensor_value_info("a", f, [2, 3]), helper.make_tensor_value_info("b", f, [3, 4])],
        [helper.make_tensor_value_info("y", f, [2, 4])],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert find_sites(model) == []


def test_foreign_lora_branches_and_overridable_weights_are_not_sites():
    """A LoRA branch another tool inserted (no lora_fx metadata), with its matrices as graph inputs."""
    f = TensorProto.FLOAT
    inits = [numpy_helper.from_array(np.ones((8, 8), np.float32), n) for n in ("fc.weight", "fc.lora_A.weight", "fc.lora_B.weight", "slot")]
    nodes = [
        helper.make_node("MatMul", ["x", "fc.weight"], ["y0"], name="/fc/MatMul"),
        helper.make_node("MatMul", ["x", "fc.lora_A.weight"], ["xa"], name="/fc/lora_A/MatMul"),
        helper.make_node("MatMul", ["xa", "fc.lora_B.weight"], ["xab"], name="/fc/lora_B/MatMul"),
        helper.make_node("Add", ["y0", "xab"], ["y1"]),
        helper.make_node("MatMul", ["y1", "slot"], ["y"], name="/slot/MatMul"),
    ]
    inputs = [helper.make_tensor_value_info("x", f, ["b", 8]), helper.make_tensor_value_info("slot", f, [8, 8])]
    graph = helper.make_graph(nodes, "foreign", inputs, [helper.make_tensor_value_info("y", f, ["b", 8])], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [s.name for s in find_sites(model)] == ["fc"]


def test_torchscript_call_path_names_take_the_parameter_path():
    """TorchScript names nodes by the call path; OPTForCausalLM calls ``self.model.decoder(...)`` directly, so its
    nodes read ``/decoder/layers.0/…`` while the parameters (here the biases; the MatMul weights are anonymous
    transposed copies) are ``model.decoder.layers.0.…``: sites take the parameters' full module path."""
    f = TensorProto.FLOAT
    rng = np.random.default_rng(0)
    scope = "/decoder/layers.0/self_attn"
    nodes, inits = [], [numpy_helper.from_array(np.array([1, 5, 2, 16], np.int64), "heads_shape")]
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        inits += [numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), f"onnx::MatMul_{i}"),
                  numpy_helper.from_array(np.zeros(32, np.float32), f"model.decoder.layers.0.self_attn.{proj}.bias")]
        nodes += [
            helper.make_node("MatMul", ["x", f"onnx::MatMul_{i}"], [f"{proj}_mm"], name=f"{scope}/{proj}/MatMul"),
            helper.make_node("Add", [f"model.decoder.layers.0.self_attn.{proj}.bias", f"{proj}_mm"], [f"{proj}_out"], name=f"{scope}/{proj}/Add"),
            helper.make_node("Reshape", [f"{proj}_out", "heads_shape"], [f"{proj}_h"], name=f"{scope}/Reshape_{i}"),
            helper.make_node("Transpose", [f"{proj}_h"], [proj[0]], perm=[0, 2, 3, 1] if proj == "k_proj" else [0, 2, 1, 3],
                             name=f"{scope}/Transpose_{i}"),
        ]
    nodes += [
        helper.make_node("MatMul", ["q", "k"], ["s"], name=f"{scope}/MatMul"),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1, name=f"{scope}/Softmax"),
        helper.make_node("MatMul", ["p", "v"], ["o"], name=f"{scope}/MatMul_1"),
    ]
    graph = helper.make_graph(nodes, "opt_like", [helper.make_tensor_value_info("x", f, [1, 5, 32])],
                              [helper.make_tensor_value_info("o", f, None)], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]))
    names = [s.name for s in find_sites(model)]
    block = "model.decoder.layers.0.self_attn"
    assert names == [f"{block}.q_proj", f"{block}.k_proj", f"{block}.v_proj", block]


def test_heads_from_the_head_split_reshape_without_static_shapes():
    """TorchScript with dynamic axes records no shapes and T5 has no score scale: the head size comes from the
    Reshape target ``Concat(batch, seq, -1, head_dim)`` (``view(*input_shape, -1, head_dim)``), the heads from
    the projection's width."""
    f = TensorProto.FLOAT
    rng = np.random.default_rng(0)
    scope = "/encoder/block.0/layer.0/SelfAttention"
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one"), numpy_helper.from_array(np.array([8], np.int64), "head_dim")]
    nodes = [helper.make_node("Shape", ["x"], ["x_shape"]),
             helper.make_node("Gather", ["x_shape", "zero"], ["b0"]), helper.make_node("Unsqueeze", ["b0", "axis0"], ["b"]),
             helper.make_node("Gather", ["x_shape", "one"], ["s0"]), helper.make_node("Unsqueeze", ["s0", "axis0"], ["s"]),
             helper.make_node("Concat", ["b", "s", "minus_one", "head_dim"], ["heads_shape"], axis=0)]
    for i, proj in enumerate("qkv"):
        inits.append(numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), f"encoder.block.0.layer.0.SelfAttention.{proj}.weight"))
        nodes += [
            helper.make_node("MatMul", ["x", f"encoder.block.0.layer.0.SelfAttention.{proj}.weight"], [f"{proj}_mm"], name=f"{scope}/{proj}/MatMul"),
            helper.make_node("Reshape", [f"{proj}_mm", "heads_shape"], [f"{proj}_h"], name=f"{scope}/Reshape_{i}"),
            helper.make_node("Transpose", [f"{proj}_h"], [proj], perm=[0, 2, 3, 1] if proj == "k" else [0, 2, 1, 3], name=f"{scope}/Transpose_{i}"),
        ]
    nodes += [
        helper.make_node("MatMul", ["q", "k"], ["scores"], name=f"{scope}/MatMul"),
        helper.make_node("Add", ["scores", "bias"], ["biased"], name=f"{scope}/Add"),
        helper.make_node("Softmax", ["biased"], ["p"], axis=-1, name=f"{scope}/Softmax"),
        helper.make_node("MatMul", ["p", "v"], ["o"], name=f"{scope}/MatMul_1"),
    ]
    graph = helper.make_graph(nodes, "t5_like", [helper.make_tensor_value_info("x", f, None), helper.make_tensor_value_info("bias", f, None)],
                              [helper.make_tensor_value_info("o", f, None)], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]))
    (att,) = [s for s in find_sites(model) if s.kind is SiteKind.ATTENTION]
    assert (att.name, att.num_heads, att.kv_heads, att.head_dim) == ("encoder.block.0.layer.0.SelfAttention", 4, 4, 8)
