"""The torch execution of ONNX graphs equals ONNX Runtime: whole exported models (original and
LoRA-rewritten) and single ops whose ONNX semantics differ from torch's defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper

import lora_fx
from lora_fx.errors import UnsupportedError
from lora_fx.runtime.onnx_torch import OnnxModule, check_supported, trainable_initializers, trainable_module
from tests import models
from tests.onnx_corpus import corpus
from tests.runtime import onnx_models as om

TOL = 1e-5
FP16_TOL = 2e-3  # fp16 rounds at ~1e-3: torch and ORT may round intermediate results differently

CORPUS = corpus().names


def _feeds(entry, seq: int | None = None) -> dict[str, np.ndarray]:
    feeds = entry.feeds()
    if entry.name == "llama-dynamo23":
        # ORT 1.31's opset-23 RotaryEmbedding kernel rejects batch > 1 with a shared cos/sin cache; batch 1 runs
        feeds = {k: v[:1] for k, v in feeds.items()}
    if seq is not None:
        feeds = {k: v[:, :seq] if v.ndim == 2 and k != "x" else v for k, v in feeds.items()}
    return feeds


def _assert_matches_ort(path: Path, module: OnnxModule, feeds: dict[str, np.ndarray], what: str) -> None:
    out = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    ref = om.ort_run(path, feeds)
    assert len(out) == len(ref) > 0
    for (name, got), r in zip(out.items(), ref):
        got = got.detach()
        assert tuple(got.shape) == r.shape, (what, name, tuple(got.shape), r.shape)
        tol = FP16_TOL if r.dtype == np.float16 else TOL
        err = models.max_rel(got.double(), torch.from_numpy(r).double())
        assert err <= tol, f"{what} {name}: relative error {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("name", CORPUS)
def test_corpus_model_matches_onnxruntime(name: str, tmp_path: Path) -> None:
    """Original and LoRA-rewritten graphs of every corpus model, torch against ONNX Runtime."""
    entry = corpus().get(name)
    original = lora_fx.load(entry.path)
    module = OnnxModule(original)
    _assert_matches_ort(entry.path, module, _feeds(entry), f"{name} original")
    if any(v.ndim == 2 for v in entry.feeds().values()) and "x" not in entry.feeds():
        # a second sequence length through the same module: per-shape constants must not leak
        _assert_matches_ort(entry.path, module, _feeds(entry, seq=5), f"{name} original, seq 5")
    torch.manual_seed(0)
    rewritten = lora_fx.apply(lora_fx.load(entry.path), lora_fx.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert trainable_initializers(rewritten)
    path = lora_fx.save(rewritten, tmp_path / "lora.onnx")
    lora_module = OnnxModule(rewritten)
    _assert_matches_ort(Path(path), lora_module, _feeds(entry), f"{name} rewritten")
    # random A and B change the output: the comparison above is not of the base model again
    feeds = {k: torch.from_numpy(v) for k, v in _feeds(entry).items()}
    base, adapted = module(**feeds), lora_module(**feeds)
    key = next(iter(base))
    assert models.max_rel(adapted[key].detach().double(), base[key].detach().double()) > 1e-3


def test_adapter_initializers_are_the_parameters() -> None:
    model = om.add_lora(lora_fx.load(corpus().get("bert-dynamo18").path), r=2)
    module = trainable_module(model)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    meta = json.loads(model.metadata_props["lora_fx.lora"])
    assert len(trainable) == 2 * len(meta) > 0
    assert set(module.named_adapters()) == {s[k] for s in meta.values() for k in ("a", "b")}
    # frozen weights are buffers, and not in the state dict (checkpoints hold only adapters)
    assert set(module.state_dict()) == trainable
    # gradients reach A and B only
    feeds = models.inputs(2, 6)
    out = module(**feeds)
    (out["last_hidden_state"].pow(2).mean() + out["pooler_output"].pow(2).mean()).backward()  # every site in play
    grads = {n: p.grad for n, p in module.named_adapters().items()}
    assert all(g is not None for g in grads.values())
    assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if n.endswith("lora_B.weight"))


def test_write_back_updates_initializers(tmp_path: Path) -> None:
    model = om.add_lora(lora_fx.load(corpus().get("gpt2-dynamo18").path), r=2)
    module = trainable_module(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.named_adapters().values():
            p.add_(0.02 * torch.randn_like(p))  # a "trained" adapter: moved, at a realistic scale
    names = module.write_back()
    for name in names:
        saved = model.graph.initializers[name].const_value.numpy()
        np.testing.assert_array_equal(saved, module.tensor(name).detach().numpy())
    path = Path(lora_fx.save(model, tmp_path / "wb.onnx"))
    reloaded = lora_fx.load(path)
    for name in names:
        np.testing.assert_array_equal(reloaded.graph.initializers[name].const_value.numpy(), module.tensor(name).detach().numpy())
    feeds = {k: v.numpy() for k, v in models.inputs(2, 7).items()}
    _assert_matches_ort(path, OnnxModule(reloaded), feeds, "written back")


@pytest.mark.slow
def test_torch_compile_traces_the_graph() -> None:
    model = om.add_lora(lora_fx.load(corpus().get("bert-dynamo18").path), r=2, random_b=True)
    module = OnnxModule(model)
    feeds = models.inputs(2, 8, pad=2)
    eager = module(**feeds)["last_hidden_state"]
    compiled = torch.compile(module)
    out = compiled(**feeds)["last_hidden_state"]
    assert models.max_rel(out.detach(), eager.detach()) <= 1e-5
    out.sum().backward()  # and trains through the compiled graph
    assert all(p.grad is not None for p in module.named_adapters().values())


# ---- single ops, against ONNX Runtime ------------------------------------------------------------

def _single(node: onnx.NodeProto, inputs: dict[str, np.ndarray], n_out: int = 1, opset: int = 18,
            inits: dict[str, np.ndarray] | None = None, ms: bool = False) -> ir.Model:
    def info(name: str, arr: np.ndarray) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), None)

    outs = [helper.make_empty_tensor_value_info(o) for o in node.output[:n_out]]
    graph = helper.make_graph(
        [node], "g", [info(k, v) for k, v in inputs.items()], outs,
        initializer=[onnx.numpy_helper.from_array(v, k) for k, v in (inits or {}).items()],
    )
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    proto = helper.make_model(graph, opset_imports=imports, ir_version=10)
    return ir.serde.deserialize_model(proto)


def _check_op(model: ir.Model, inputs: dict[str, np.ndarray], tmp_path: Path, tol: float = 1e-6) -> None:
    path = tmp_path / "op.onnx"
    ir.save(model, str(path))
    ref = om.ort_run(path, inputs)
    out = OnnxModule(model, trainable=[])(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    for (name, got), r in zip(out.items(), ref):
        got = got.detach().numpy()
        assert got.shape == r.shape and got.dtype == r.dtype, (name, got.shape, r.shape, got.dtype, r.dtype)
        if np.issubdtype(r.dtype, np.floating):
            np.testing.assert_allclose(got, r, rtol=tol, atol=tol)
        else:
            np.testing.assert_array_equal(got, r)


rng = np.random.default_rng(0)
I64 = np.array([-7, 7, -7, 7, -8, 9], dtype=np.int64)
D64 = np.array([2, -2, -2, 2, 3, -4], dtype=np.int64)
X3 = rng.standard_normal((2, 3, 5)).astype(np.float32)

OP_CASES = {
    "div-int-truncates": (helper.make_node("Div", ["a", "b"], ["y"]), {"a": I64, "b": D64}, {}, 18),
    "mod-int-divisor-sign": (helper.make_node("Mod", ["a", "b"], ["y"]), {"a": I64, "b": D64}, {}, 18),
    "mod-fmod": (helper.make_node("Mod", ["a", "b"], ["y"], fmod=1), {"a": I64, "b": D64}, {}, 18),
    "gather-negative": (helper.make_node("Gather", ["x", "i"], ["y"], axis=1),
                        {"x": X3, "i": np.array([[-1, 0], [1, -3]], dtype=np.int64)}, {}, 18),
    "gather-negative-const": (helper.make_node("Gather", ["x", "i"], ["y"], axis=2), {"x": X3},
                              {"i": np.array([-1, 2, -5], dtype=np.int64)}, 18),
    "gather-elements-negative": (helper.make_node("GatherElements", ["x", "i"], ["y"], axis=2),
                                 {"x": X3, "i": rng.integers(-5, 5, (2, 3, 4)).astype(np.int64)}, {}, 18),
    "gather-nd-batch": (helper.make_node("GatherND", ["x", "i"], ["y"], batch_dims=1),
                        {"x": X3, "i": np.array([[[0, 1], [2, -1]], [[1, 4], [0, 0]]], dtype=np.int64)}, {}, 18),
    "scatter-nd": (helper.make_node("ScatterND", ["x", "i", "u"], ["y"]),
                   {"x": X3, "i": np.array([[0, 2], [1, 0]], dtype=np.int64), "u": np.ones((2, 5), np.float32)}, {}, 18),
    "slice-negative-step": (helper.make_node("Slice", ["x", "s", "e", "ax", "st"], ["y"]), {"x": X3},
                            {"s": np.array([-1, 10], np.int64), "e": np.array([-100, 0], np.int64),
                             "ax": np.array([2, 1], np.int64), "st": np.array([-2, -1], np.int64)}, 18),
    "slice-clamped": (helper.make_node("Slice", ["x", "s", "e"], ["y"]), {"x": X3},
                      {"s": np.array([1, -2], np.int64), "e": np.array([2**62, 2**62], np.int64)}, 18),
    "softmax-opset11-flattens": (helper.make_node("Softmax", ["x"], ["y"], axis=1), {"x": X3}, {}, 11),
    "softmax-default-axis": (helper.make_node("Softmax", ["x"], ["y"]), {"x": X3}, {}, 18),
    "reshape-zero-minus-one": (helper.make_node("Reshape", ["x", "s"], ["y"]), {"x": X3},
                               {"s": np.array([0, -1], np.int64)}, 18),
    "split-num-outputs-uneven": (helper.make_node("Split", ["x"], ["a", "b", "c"], axis=2, num_outputs=3), {"x": X3}, {}, 18),
    "expand-bidirectional": (helper.make_node("Expand", ["x", "s"], ["y"]), {"x": rng.standard_normal((3, 1)).astype(np.float32)},
                             {"s": np.array([2, 1, 4], np.int64)}, 18),
    "trilu-lower-k": (helper.make_node("Trilu", ["x", "k"], ["y"], upper=0), {"x": X3}, {"k": np.array(-1, np.int64)}, 18),
    "reduce-mean-axes-input": (helper.make_node("ReduceMean", ["x", "ax"], ["y"], keepdims=0), {"x": X3},
                               {"ax": np.array([-1, 0], np.int64)}, 18),
    "reduce-sum-empty-noop": (helper.make_node("ReduceSum", ["x"], ["y"], noop_with_empty_axes=0), {"x": X3}, {}, 18),
    "unsqueeze-axes": (helper.make_node("Unsqueeze", ["x", "ax"], ["y"]), {"x": X3}, {"ax": np.array([-1, 0], np.int64)}, 18),
    "squeeze-axes": (helper.make_node("Squeeze", ["x", "ax"], ["y"]), {"x": X3[:, :1]}, {"ax": np.array([1], np.int64)}, 18),
    "cumsum-exclusive-reverse": (helper.make_node("CumSum", ["x", "ax"], ["y"], exclusive=1, reverse=1), {"x": X3},
                                 {"ax": np.array(2, np.int64)}, 18),
    "range-float": (helper.make_node("Range", ["a", "b", "c"], ["y"]), {},
                    {"a": np.array(0.5, np.float32), "b": np.array(3.2, np.float32), "c": np.array(0.7, np.float32)}, 18),
    "constant-of-shape": (helper.make_node("ConstantOfShape", ["s"], ["y"], value=helper.make_tensor("v", TensorProto.INT64, [1], [3])),
                          {}, {"s": np.array([2, 3], np.int64)}, 18),
    "shape-start-end": (helper.make_node("Shape", ["x"], ["y"], start=1, end=-1), {"x": X3}, {}, 18),
    "where-broadcast": (helper.make_node("Where", ["c", "x", "z"], ["y"]),
                        {"c": rng.random((3, 1)) > 0.5, "x": X3, "z": np.float32(-1.0) * np.ones(5, np.float32)}, {}, 18),
    "pow-int-exponent": (helper.make_node("Pow", ["x", "e"], ["y"]), {"x": X3}, {"e": np.array(3, np.int64)}, 18),
    "einsum": (helper.make_node("Einsum", ["x", "w"], ["y"], equation="bij,kj->bik"),
               {"x": X3, "w": rng.standard_normal((4, 5)).astype(np.float32)}, {}, 18),
    "layer-norm-axis1-all-outputs": (helper.make_node("LayerNormalization", ["x", "g", "b"], ["y", "m", "s"], axis=1),
                                     {"x": X3}, {"g": rng.standard_normal((3, 5)).astype(np.float32),
                                                 "b": rng.standard_normal((3, 5)).astype(np.float32)}, 18),
    "gemm-trans-alpha-beta": (helper.make_node("Gemm", ["a", "b", "c"], ["y"], transA=1, alpha=0.5, beta=2.0),
                              {"a": rng.standard_normal((4, 3)).astype(np.float32)},
                              {"b": rng.standard_normal((4, 5)).astype(np.float32), "c": rng.standard_normal(5).astype(np.float32)}, 18),
    "cast-bool": (helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BOOL), {"x": X3}, {}, 18),
    "rms-normalization": (helper.make_node("RMSNormalization", ["x", "g"], ["y"], epsilon=1e-3), {"x": X3},
                          {"g": rng.standard_normal(5).astype(np.float32)}, 23),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_semantics_match_onnxruntime(case: str, tmp_path: Path) -> None:
    node, inputs, inits, opset = OP_CASES[case]
    model = _single(node, inputs, n_out=len(node.output), opset=opset, inits=inits)
    _check_op(model, inputs, tmp_path)


def _attention_case(is_causal: int, mask: str, past: bool, three_d: bool, nonpad: bool = False) -> tuple:
    b, hq, hkv, s, p, d = 2, 4, 2, 5, 3, 8
    q = rng.standard_normal((b, hq, s, d)).astype(np.float32)
    k = rng.standard_normal((b, hkv, s, d)).astype(np.float32)
    v = rng.standard_normal((b, hkv, s, d)).astype(np.float32)
    total = s + (p if past else 0)
    inputs = {"q": q, "k": k, "v": v}
    names = ["q", "k", "v"]
    attrs: dict = {"is_causal": is_causal}
    if three_d:
        inputs = {"q": q.transpose(0, 2, 1, 3).reshape(b, s, hq * d), "k": k.transpose(0, 2, 1, 3).reshape(b, s, hkv * d),
                  "v": v.transpose(0, 2, 1, 3).reshape(b, s, hkv * d)}
        attrs.update(q_num_heads=hq, kv_num_heads=hkv)
    if mask == "bool":
        m = rng.random((b, 1, s, total)) > 0.3
        m[..., 0] = True
        inputs["m"] = m
        names.append("m")
    elif mask == "float":
        inputs["m"] = rng.standard_normal((s, total)).astype(np.float32)
        names.append("m")
    else:
        names.append("")
    if past:
        inputs["pk"] = rng.standard_normal((b, hkv, p, d)).astype(np.float32)
        inputs["pv"] = rng.standard_normal((b, hkv, p, d)).astype(np.float32)
        names += ["pk", "pv"]
    if nonpad:  # opset 24: the second row's last two keys are padding
        inputs["nonpad"] = np.array([total, total - 2], np.int64)
        names += [""] * (6 - len(names)) + ["nonpad"]
    while names[-1] == "":
        names.pop()
    outs = ["y", "pk_out", "pv_out"] if past else ["y"]
    return helper.make_node("Attention", names, outs, **attrs), inputs


@pytest.mark.parametrize("is_causal,mask,past,three_d", [
    (0, "none", False, False), (1, "none", False, False), (0, "bool", False, False), (1, "float", True, False),
    (0, "float", False, True), (1, "bool", True, True),
])
def test_opset23_attention_matches_onnxruntime(is_causal, mask, past, three_d, tmp_path: Path) -> None:
    node, inputs = _attention_case(is_causal, mask, past, three_d)
    model = _single(node, inputs, n_out=len(node.output), opset=23)
    _check_op(model, inputs, tmp_path, tol=1e-5)


@pytest.mark.parametrize("is_causal,mask,three_d", [(0, "none", False), (1, "none", False), (1, "bool", True),
                                                    (1, "float", False), (0, "bool", True)])
def test_opset24_attention_with_nonpad_kv_seqlen_matches_onnxruntime(is_causal, mask, three_d, tmp_path: Path) -> None:
    """Padded keys hidden per row; causal rows aligned bottom-right to each row's valid keys (offset nonpad - S)."""
    node, inputs = _attention_case(is_causal, mask, False, three_d, nonpad=True)
    assert len(node.input) == 7
    _check_op(_single(node, inputs, opset=24), inputs, tmp_path, tol=1e-5)


@pytest.mark.parametrize("attr", ["left_window_size", "right_window_size"])
def test_opset25_attention_windows_are_refused(attr: str) -> None:
    node, inputs = _attention_case(1, "none", False, False)
    node.attribute.append(helper.make_attribute(attr, 2))
    with pytest.raises(UnsupportedError, match="sliding windows"):
        OnnxModule(_single(node, inputs, opset=25), trainable=[])(**{k: torch.from_numpy(v) for k, v in inputs.items()})


def test_dequantize_linear_int4_blocked(tmp_path: Path) -> None:
    q = rng.integers(-8, 8, (8, 6)).astype(np.int8)
    scale = rng.random((2, 6)).astype(np.float32) + 0.1
    zp = rng.integers(-2, 2, (2, 6)).astype(np.int8)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=0, block_size=4),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[helper.make_tensor("q", TensorProto.INT4, q.shape, q.flatten().tolist()),
                     onnx.numpy_helper.from_array(scale, "s"),
                     helper.make_tensor("z", TensorProto.INT4, zp.shape, zp.flatten().tolist())],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))
    _check_op(model, {"x": x}, tmp_path, tol=1e-5)


def test_dequantize_linear_per_channel(tmp_path: Path) -> None:
    q = rng.integers(0, 255, (4, 6)).astype(np.uint8)
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1)
    model = _single(node, {"q": q}, inits={"s": rng.random(6).astype(np.float32), "z": rng.integers(0, 255, 6).astype(np.uint8)})
    _check_op(model, {"q": q}, tmp_path)


@pytest.mark.parametrize("k", [40, 64])  # 40: a partial last block (the plain decode); 64: lora_fx's int4 op
@pytest.mark.parametrize("with_zp", [False, True])
def test_matmul_nbits(with_zp: bool, k: int, tmp_path: Path) -> None:
    n, block = 6, 16
    blocks = -(-k // block)
    packed = rng.integers(0, 256, (n, blocks, block // 2)).astype(np.uint8)
    scales = (rng.random((n * blocks)) + 0.1).astype(np.float32)
    inits = {"w": packed, "s": scales}
    ins = ["x", "w", "s"]
    if with_zp:
        inits["z"] = rng.integers(0, 256, (n, -(-blocks // 2))).astype(np.uint8)
        ins.append("z")
    node = helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block)
    x = rng.standard_normal((3, k)).astype(np.float32)
    model = _single(node, {"x": x}, inits=inits, ms=True)
    _check_op(model, {"x": x}, tmp_path, tol=1e-4)


def test_matmul_bnb4_nf4(tmp_path: Path) -> None:
    n, k, block = 4, 64, 32
    packed = rng.integers(0, 256, (n * k // 2,)).astype(np.uint8)
    absmax = (rng.random(n * k // block) + 0.5).astype(np.float32)
    node = helper.make_node("MatMulBnb4", ["x", "w", "a"], ["y"], domain="com.microsoft", K=k, N=n, block_size=block, quant_type=1)
    x = rng.standard_normal((2, k)).astype(np.float32)
    model = _single(node, {"x": x}, inits={"w": packed, "a": absmax}, ms=True)
    _check_op(model, {"x": x}, tmp_path, tol=1e-4)


@pytest.mark.parametrize("op", ["MatMulBnb4", "MatMulNBits"])
def test_training_through_4bit_onnx_weights_saves_no_float_weight(op: str, tmp_path: Path) -> None:
    """The backward decodes W again (lora_fx's quantized ops) instead of keeping the decoded W."""
    n, k, block = 48, 64, 32
    if op == "MatMulBnb4":
        inits = {"w": rng.integers(0, 256, (n * k // 2,)).astype(np.uint8), "a": (rng.random(n * k // block) + 0.5).astype(np.float32)}
        node = helper.make_node(op, ["x", "w", "a"], ["y"], domain="com.microsoft", K=k, N=n, block_size=block, quant_type=1)
    else:
        inits = {"w": rng.integers(0, 256, (n, k // block, block // 2)).astype(np.uint8),
                 "s": (rng.random(n * k // block) + 0.1).astype(np.float32), "z": rng.integers(0, 256, (n, 1)).astype(np.uint8)}
        node = helper.make_node(op, ["x", "w", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block)
    x = rng.standard_normal((3, 5, k)).astype(np.float32)
    model = _single(node, {"x": x}, inits=inits, ms=True)
    module = OnnxModule(model, trainable=[])
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    xt = torch.from_numpy(x).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x=xt)["y"]
    y.pow(2).sum().backward()
    assert not [s for s in saved if s[0] in {(n, k), (k, n)}], saved
    # The gradient is the one of x @ W.T with the decoded W (here from the ONNX Runtime outputs' own W).
    eye = OnnxModule(_single(node, {"x": np.eye(k, dtype=np.float32)}, inits=inits, ms=True), trainable=[])
    w_t = eye(x=torch.eye(k))["y"].detach()  # [K, N] = W.T
    torch.testing.assert_close(xt.grad, 2 * (xt.detach() @ w_t) @ w_t.t(), rtol=1e-4, atol=1e-4)
    _check_op(model, {"x": x}, tmp_path, tol=1e-4)


def test_gemm_mlp_matches_onnxruntime(tmp_path: Path) -> None:
    """A hand-built MLP of Gemm + Relu + Gemm with a LoRA branch on the first layer."""
    w1, b1 = rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    w2, b2 = rng.standard_normal((3, 16)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    a = rng.standard_normal((8, 2)).astype(np.float32)
    bb = rng.standard_normal((2, 16)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
        helper.make_node("MatMul", ["x", "fc1.lora_A.weight"], ["xa"]),
        helper.make_node("MatMul", ["xa", "fc1.lora_B.weight"], ["xab"]),
        helper.make_node("Add", ["h", "xab"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[onnx.numpy_helper.from_array(v, n) for n, v in
                     {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "fc1.lora_A.weight": a, "fc1.lora_B.weight": bb}.items()],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    assert trainable_initializers(model) == ["fc1.lora_A.weight", "fc1.lora_B.weight"]
    _check_op(model, {"x": rng.standard_normal((5, 8)).astype(np.float32)}, tmp_path, tol=1e-5)


def test_unsupported_op_is_named_before_running() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="ok"),
             helper.make_node("Hardmax", ["h"], ["y"], name="the_hardmax"),
             helper.make_node("Frobnicate", ["y"], ["z"], name="custom", domain="vendor.ops")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("vendor.ops", 1)])
    model = ir.serde.deserialize_model(proto)
    with pytest.raises(UnsupportedError) as err:
        check_supported(model)
    msg = str(err.value)
    assert "Hardmax" in msg and "the_hardmax" in msg and "Frobnicate" in msg and "vendor.ops" in msg and "custom" in msg
    with pytest.raises(UnsupportedError, match="Frobnicate"):
        OnnxModule(model)


def _ms(op: str, ins: list[str], outs: list[str], **attrs) -> onnx.NodeProto:
    return helper.make_node(op, ins, outs, domain="com.microsoft", **attrs)


def _f(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


MS_CASES = {
    "fused-matmul": (_ms("FusedMatMul", ["a", "b"], ["y"], alpha=0.5, transA=1, transB=1), {"a": _f(2, 5, 3), "b": _f(2, 4, 5)}),
    "fast-gelu-bias": (_ms("FastGelu", ["x", "b"], ["y"]), {"x": _f(2, 3, 8), "b": _f(8)}),
    "bias-gelu": (_ms("BiasGelu", ["x", "b"], ["y"]), {"x": _f(2, 3, 8), "b": _f(8)}),
    "skip-layer-norm": (_ms("SkipLayerNormalization", ["x", "s", "g", "b", "bias"], ["y", "", "", "sum"], epsilon=1e-5),
                        {"x": _f(2, 3, 8), "s": _f(2, 3, 8), "g": _f(8), "b": _f(8), "bias": _f(8)}),
    "skip-simplified-layer-norm": (_ms("SkipSimplifiedLayerNormalization", ["x", "s", "g"], ["y"], epsilon=1e-5),
                                   {"x": _f(2, 3, 8), "s": _f(2, 3, 8), "g": _f(8)}),
    "multi-head-attention-mask": (_ms("MultiHeadAttention", ["q", "k", "v", "", "m"], ["y"], num_heads=2),
                                  {"q": _f(2, 4, 8), "k": _f(2, 5, 8), "v": _f(2, 5, 8),
                                   "m": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)}),
    "attention-packed-qkv": (_ms("Attention", ["x", "w", "b", "m"], ["y"], num_heads=2),
                             {"x": _f(2, 4, 8), "w": _f(8, 24), "b": _f(24), "m": np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32)}),
    # prompt mode, right padding (seqlens_k = valid length - 1), 4 query heads over 2 kv heads
    "group-query-attention-prompt": (_ms("GroupQueryAttention", ["q", "k", "v", "", "", "sl", "tl"], ["y"], num_heads=4, kv_num_heads=2),
                                     {"q": _f(2, 5, 32), "k": _f(2, 5, 16), "v": _f(2, 5, 16),
                                      "sl": np.array([4, 2], np.int32), "tl": np.array(5, np.int32)}),
    "rotary-embedding-ms": (_ms("RotaryEmbedding", ["x", "p", "c", "s"], ["y"]),
                            {"x": _f(2, 3, 16), "p": np.array([[0, 1, 2], [2, 3, 4]], np.int64),
                             "c": np.cos(_f(8, 4)), "s": np.sin(_f(8, 4))}),
}


@pytest.mark.parametrize("case", list(MS_CASES))
def test_contrib_op_matches_onnxruntime(case: str, tmp_path: Path) -> None:
    node, inputs = MS_CASES[case]
    n_out = len([o for o in node.output if o])
    model = _single(node, inputs, n_out=len(node.output), ms=True) if n_out == len(node.output) else None
    if model is None:  # optional outputs left out: only name the real ones as graph outputs
        outs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), None)
                                                for k, v in inputs.items()], outs)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
        model = ir.serde.deserialize_model(proto)
    _check_op(model, inputs, tmp_path, tol=1e-5)


def test_frozen_weights_share_the_models_memory_and_adapters_do_not(tmp_path: Path) -> None:
    """Training through a loaded ONNX file holds each frozen weight once (torch views the model's numpy
    array); adapters are copies, trained in place and written back with write_back()."""
    w = rng.standard_normal((8, 6)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "fc.weight"], ["h"]),
             helper.make_node("MatMul", ["x", "fc.lora_A.weight"], ["xa"]),
             helper.make_node("MatMul", ["xa", "fc.lora_B.weight"], ["xab"]),
             helper.make_node("Add", ["h", "xab"], ["y"])]
    inits = {"fc.weight": w, "fc.lora_A.weight": rng.standard_normal((8, 2)).astype(np.float32),
             "fc.lora_B.weight": np.zeros((2, 6), np.float32)}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 6])],
                              [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(tmp_path / "m.onnx"))
    model = lora_fx.load(tmp_path / "m.onnx")
    module = OnnxModule(model)
    assert module.trainable_names == ["fc.lora_A.weight", "fc.lora_B.weight"]

    def address(name: str) -> int:
        return model.graph.initializers[name].const_value.numpy().__array_interface__["data"][0]

    assert module.tensor("fc.weight").data_ptr() == address("fc.weight")
    assert all(module.tensor(n).data_ptr() != address(n) for n in module.trainable_names)
    # A model not from lora_fx.load views read-only protobuf memory: torch gets a copy, and it works the same.
    proto_model = ir.serde.deserialize_model(onnx.load(str(tmp_path / "m.onnx")))
    x = torch.from_numpy(rng.standard_normal((3, 8)).astype(np.float32))
    torch.testing.assert_close(OnnxModule(proto_model)(x=x)["y"], module(x=x)["y"])


def test_an_attribute_the_op_function_ignores_is_refused_unless_it_holds_the_default(tmp_path: Path) -> None:
    """An op function that never reads an attribute computes the op without it: refused on the first call, naming
    the node and attribute, unless the attribute holds the schema default (then ignoring it changes nothing)."""
    x = rng.standard_normal((2, 3)).astype(np.float32)
    default = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT, saturate=1)  # saturate: float8 only, default 1
    _check_op(_single(default, {"x": x}, opset=19), {"x": x}, tmp_path)
    odd = helper.make_node("Cast", ["x"], ["y"], name="c", to=TensorProto.FLOAT, saturate=0)
    with pytest.raises(UnsupportedError, match=r"Cast node 'c'.*does not implement its attribute saturate=0"):
        OnnxModule(_single(odd, {"x": x}, opset=19), trainable=[])(x=torch.from_numpy(x))
    unknown = helper.make_node("Relu", ["x"], ["y"], name="r", alpha=0.5)  # no such attribute in the schema
    with pytest.raises(UnsupportedError, match=r"Relu node 'r'.*attribute alpha=0.5"):
        OnnxModule(_single(unknown, {"x": x}), trainable=[])(x=torch.from_numpy(x))


def test_contrib_op_attributes_use_onnxruntimes_defaults_and_compute_hints_pass(tmp_path: Path) -> None:
    """com.microsoft ops: ONNX Runtime's schema gives the defaults; accuracy_level (how ORT computes, not what)
    may stay unread, weight_prepacked (what the weight bytes mean) may not."""
    n, k, block = 4, 32, 32
    inits = {"w": rng.integers(0, 256, (n, 1, block // 2)).astype(np.uint8), "s": (rng.random(n) + 0.1).astype(np.float32)}
    x = rng.standard_normal((3, k)).astype(np.float32)
    hinted = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                              block_size=block, accuracy_level=4)  # ORT: int8 activations; lora_fx: float, as at level 0
    exact = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block)
    ir.save(_single(exact, {"x": x}, inits=inits, ms=True), str(tmp_path / "exact.onnx"))
    got = OnnxModule(_single(hinted, {"x": x}, inits=inits, ms=True), trainable=[])(x=torch.from_numpy(x))["y"]
    np.testing.assert_allclose(got.numpy(), om.ort_run(tmp_path / "exact.onnx", {"x": x})[0], rtol=1e-5, atol=1e-5)
    prepacked = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], name="q", domain="com.microsoft", K=k, N=n,
                                 bits=4, block_size=block, weight_prepacked=1)
    with pytest.raises(UnsupportedError, match="MatMulNBits node 'q'.*weight_prepacked=1"):
        OnnxModule(_single(prepacked, {"x": x}, inits=inits, ms=True), trainable=[])(x=torch.from_numpy(x))


def test_weights_in_external_data_are_copied_once_and_the_file_unmapped(tmp_path: Path) -> None:
    """External data is a read-only mapping of the .data file: torch gets a copy, and the mapping is closed, so
    the file's pages do not stay in the process's memory next to the copy."""
    from lora_fx.onnx_model import save

    w = rng.standard_normal((64, 48)).astype(np.float32)  # big enough to go to the .data file
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "fc.weight"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 48])],
                              [onnx.numpy_helper.from_array(w, "fc.weight")])
    save(ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)),
         tmp_path / "m.onnx", external_data=True)
    model = lora_fx.load(tmp_path / "m.onnx")
    tensor = model.graph.initializers["fc.weight"].const_value
    assert isinstance(tensor, ir.ExternalTensor)
    tensor.numpy()  # mapped, as a pass reading the weight leaves it
    module = OnnxModule(model, trainable=[])
    assert tensor.raw is None  # unmapped
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(module(x=torch.from_numpy(x))["y"].numpy(), x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tensor.numpy(), w)  # the model still reads its weight (mapped again)


def test_intermediate_values_are_dropped_after_their_last_reader(monkeypatch) -> None:
    """A forward holds what autograd saves, not every intermediate of the graph: each value leaves the run
    once its last reader ran (an unused output right away), as torch.fx's generated code deletes it."""
    import weakref

    nodes = [helper.make_node("Neg", ["x"], ["a"], name="n0"), helper.make_node("Abs", ["a"], ["b"], name="n1"),
             helper.make_node("Dropout", ["b"], ["c", "unused_mask"], name="n2"),
             helper.make_node("Exp", ["c"], ["y"], name="n3"), helper.make_node("Neg", ["y"], ["z"], name="n4")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n"])])
    module = OnnxModule(ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                                                                     ir_version=10)), trainable=[])
    assert {n.label: set(n.free) for n in module._nodes} == {
        "Neg node 'n0'": {"x"}, "Abs node 'n1'": {"a"}, "Dropout node 'n2'": {"unused_mask", "b"},
        "Exp node 'n3'": {"c"}, "Neg node 'n4'": set()}  # y and z are graph outputs
    alive: dict[str, weakref.ref] = {}
    call = OnnxModule._call

    def spy(n, ctx, args):
        if n.label == "Neg node 'n4'":  # by the last node only the graph output y is left
            assert [k for k, ref in alive.items() if ref() is not None] == ["y"]
        out = call(n, ctx, args)
        for name, t in zip(n.outputs, out):
            alive[name] = weakref.ref(t)
        return out

    monkeypatch.setattr(OnnxModule, "_call", staticmethod(spy))
    with torch.no_grad():
        out = module(x=torch.randn(1000))
    torch.testing.assert_close(out["z"], -out["y"])
