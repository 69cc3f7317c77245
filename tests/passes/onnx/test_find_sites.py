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


# ---- module tree ---------------------------------------------------------------------------------

LN = ("torch.nn.modules.normalization.LayerNorm",)


@pytest.mark.slow
def test_module_tree_of_a_dynamo_export_takes_the_recorded_classes(onnx_corpus):
    from lora_fx.passes.onnx.find_sites import module_tree

    tree = module_tree(lora_fx.load(onnx_corpus.get("gpt2-dynamo18").path))
    assert tree["transformer.ln_f"] == tree["transformer.h.1.ln_2"] == LN
    assert tree["transformer.h.0.mlp.act"] == ("transformers.activations.NewGELUActivation",)
    assert tree["transformer.wte"] == ("torch.nn.modules.sparse.Embedding",)
    assert tree["lm_head"] == ("torch.nn.modules.linear.Linear",)
    # Modules holding layers (GPT2Attention runs c_attn's Gemm) might be anything PEFT adapts: left out, as is
    # attn_dropout, which the sdpa path never runs, and the unnamed root.
    assert not {"", "transformer", "transformer.h.0", "transformer.h.0.attn", "transformer.h.0.attn.c_attn"} & set(tree)
    assert not any("dropout" in path for path in tree)


@pytest.mark.slow
def test_module_tree_of_a_torchscript_export_says_what_the_nodes_compute(onnx_corpus):
    from lora_fx.passes.onnx.find_sites import module_tree
    from lora_fx.sites import EMBEDDING_LOOKUP

    tree = module_tree(lora_fx.load(onnx_corpus.get("llama-torchscript").path))
    assert tree["model.model.layers.1.mlp.act_fn"] == ("onnx ops: Sigmoid, Mul",)
    assert tree["model.model.rotary_emb"] == ("onnx ops: Mul, Cos, Sin",)
    assert tree["model.model.norm"][0].startswith("onnx ops: Pow, ReduceMean, Add, Sqrt")
    assert tree["model.model.embed_tokens"] == (EMBEDDING_LOOKUP,)
    assert not {"model", "model.model", "model.model.layers.0.self_attn", "model.model.layers.0.self_attn.q_proj"} & set(tree)


@pytest.mark.parametrize("name", HAND)
def test_module_tree_is_unknown_where_the_file_names_no_modules(onnx_corpus, name):
    from lora_fx.passes.onnx.find_sites import module_tree

    assert module_tree(lora_fx.load(onnx_corpus.get(name).path)) is None


def _scoped_model(nodes, inits, opset=17) -> ir.Model:
    f = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "scoped", [helper.make_tensor_value_info("x", f, ["b", 8])],
                              [helper.make_tensor_value_info(n.output[0], f, None) for n in nodes[-1:]], inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def test_module_tree_from_torchscript_names_refuses_only_where_sure():
    """A scope whose nodes multiply by no weight matrix is no layer PEFT adapts; one with a MatMul that is no site
    (a weight computed in the graph) might be, so it is left out and a target naming it is not refused. Scope
    paths gain what the call path lacks (``decoder`` called from its grandparent: ``model.decoder``)."""
    from lora_fx.errors import ConfigError
    from lora_fx.passes.onnx.find_sites import module_tree

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "model.decoder.layers.0.fc.weight"),
             numpy_helper.from_array(np.ones(8, np.float32), "norm.scale"), numpy_helper.from_array(np.zeros(8, np.float32), "norm.bias"),
             numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "v")]
    nodes = [
        helper.make_node("MatMul", ["x", "model.decoder.layers.0.fc.weight"], ["h"], name="/decoder/layers.0/fc/MatMul"),
        helper.make_node("LayerNormalization", ["h", "norm.scale", "norm.bias"], ["n"], name="/decoder/layers.0/norm/LayerNormalization"),
        helper.make_node("Constant", [], ["c"], name="/decoder/layers.0/folded/Constant", value=numpy_helper.from_array(np.ones(8, np.float32))),
        helper.make_node("Mul", ["n", "c"], ["m"], name="/decoder/layers.0/Mul"),
        # A weight normalised in the graph (weight_norm): no site, but maybe an nn.Linear.
        helper.make_node("Mul", ["v", "v"], ["w"], name="/decoder/layers.0/wn/Mul"),
        helper.make_node("MatMul", ["m", "w"], ["o"], name="/decoder/layers.0/wn/MatMul"),
        helper.make_node("Relu", ["o"], ["r"], name="/decoder/act/Relu"),
        helper.make_node("Dropout", ["r"], ["y"], name="/decoder/drop/Dropout"),
    ]
    model = _scoped_model(nodes, inits)
    assert [s.name for s in find_sites(model)] == ["model.decoder.layers.0.fc"]
    tree = module_tree(model)
    assert tree == {
        "model.decoder.layers.0.norm": ("onnx ops: LayerNormalization",),
        "model.decoder.act": ("onnx ops: Relu",),
        "model.decoder.drop": ("onnx ops: Dropout",),
    }
    with pytest.raises(ConfigError, match=r"model.decoder.layers.0.norm \(no class recorded, computes LayerNormalization\), not a linear"):
        lora_fx.apply(model, lora_fx.LoraConfig(r=2, target_modules=["fc", "norm"]))
    with pytest.raises(ConfigError, match=r"model.decoder.drop \(no class recorded, computes Dropout\)"):
        lora_fx.apply(model, lora_fx.LoraConfig(r=2, target_modules=["fc", "drop"]))
    # Not sure what "wn" and "folded" are: selected as before, on the sites only.
    targets = lora_fx.select_targets(find_sites(model), lora_fx.LoraConfig(r=2, target_modules=["fc", "wn", "folded"]), modules=tree)
    assert [t.site.name for t in targets] == ["model.decoder.layers.0.fc"]


def test_module_tree_from_dynamo_metadata_trusts_torch_classes_and_checks_the_others():
    from lora_fx.passes.onnx.find_sites import module_tree

    def scoped(op, inputs, output, path, cls):
        node = helper.make_node(op, inputs, [output], name=f"node_{output}")
        for key, value in (("pkg.torch.onnx.name_scopes", ["", path, output]), ("pkg.torch.onnx.class_hierarchy", ["Top", cls, f"aten.{op}"])):
            node.metadata_props.add(key=key, value=repr(value))
        return node

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), n) for n in ("val_1", "val_2")]
    nodes = [
        scoped("MatMul", ["x", "val_1"], "h", "fc", "torch.nn.modules.linear.Linear"),
        scoped("Relu", ["h"], "a", "act", "torch.nn.modules.activation.ReLU"),
        scoped("Sigmoid", ["a"], "g", "gate", "user.Gate"),
        scoped("MatMul", ["g", "g"], "s", "gram", "user.Gram"),  # no site, and not a torch class: left out
        scoped("Mul", ["val_2", "val_2"], "w", "mix", "torch.nn.modules.linear.NonDynamicallyQuantizableLinear"),
        scoped("MatMul", ["s", "w"], "y", "mix", "torch.nn.modules.linear.NonDynamicallyQuantizableLinear"),
    ]
    tree = module_tree(_scoped_model(nodes, inits))
    assert tree == {
        "fc": ("torch.nn.modules.linear.Linear",),
        "act": ("torch.nn.modules.activation.ReLU",),
        "gate": ("user.Gate",),
        # A torch class comes with the classes it derives from: targeting sees an nn.Linear, never refused.
        "mix": ("torch.nn.modules.linear.NonDynamicallyQuantizableLinear", "torch.nn.modules.linear.Linear"),
    }
    assert [s.name for s in find_sites(_scoped_model(nodes, inits))] == ["fc"]
    targets = lora_fx.select_targets(find_sites(_scoped_model(nodes, inits)), lora_fx.LoraConfig(r=2, target_modules=["fc", "gram", "mix"]),
                                     modules=tree)
    assert [t.site.name for t in targets] == ["fc"]
    from lora_fx.errors import ConfigError

    with pytest.raises(ConfigError, match=r"gate \(Gate\), not a linear layer"):
        lora_fx.select_targets(find_sites(_scoped_model(nodes, inits)), lora_fx.LoraConfig(r=2, target_modules=["fc", "gate"]), modules=tree)


# ---- nn.MultiheadAttention ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mha_exports():
    """The FX tests' block (Linear, batch-first nn.MultiheadAttention, Linear), exported by both exporters (the files
    tests/lora_fx/test_onnx_multihead_attention.py reads too)."""
    from tests.shared_exports import mha_exports

    return mha_exports()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_multihead_attention_out_proj_is_named_and_grouped_as_in_fx(mha_exports, exporter):
    """The attention module runs out_proj's Gemm itself, so the node's scope is ``attn``: the site used to be named
    ``attn_2`` and ``["attn"]`` adapted in_proj alone. The weight's name says whose it is (``attn.out_proj.weight``);
    the class metadata (dynamo) or the ``attn.in_proj_bias`` parameter (TorchScript) says ``attn`` is an
    nn.MultiheadAttention, which PEFT adapts as a whole."""
    block, paths = mha_exports
    fx_sites = lora_fx.find_sites(lora_fx.capture(block, kwargs={"x": torch.randn(2, 5, 8)}))
    sites = find_sites(lora_fx.load(paths[exporter]))
    linear = lambda ss: [(s.name, s.part_of, s.in_features, s.out_features) for s in ss if s.kind is SiteKind.LINEAR]  # noqa: E731
    assert linear(sites) == linear(fx_sites) == [
        ("inp", None, 8, 16), ("attn", None, 16, 48), ("attn.out_proj", "attn", 16, 16), ("fc", None, 16, 4)]
    # The attention site keeps a name of its own in ONNX, where site names are unique across kinds.
    assert [s.name for s in sites if s.kind is SiteKind.ATTENTION] == ["attn_1"]
    targets = lora_fx.select_targets(sites, lora_fx.LoraConfig(r=2, target_modules=["attn"]), modules=None)
    assert [(t.site.name, t.part_of) for t in targets] == [("attn", None), ("attn.out_proj", "attn")]


def test_a_parent_using_a_child_weight_is_not_grouped_without_evidence():
    """``attn.out_proj`` is named after the weight's module, but ``part_of`` needs proof that the caller is an
    nn.MultiheadAttention: here the caller has no ``in_proj_*`` parameter and no class metadata."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "mix.proj.weight")]
    model = _scoped_model([helper.make_node("Gemm", ["x", "mix.proj.weight"], ["y"], name="/mix/Gemm", transB=1)], inits)
    assert [(s.name, s.part_of) for s in find_sites(model)] == [("mix.proj", None)]
