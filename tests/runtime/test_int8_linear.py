"""runtime/int8_linear: int8 weight chains of an ONNX graph train through lora_fx's int8 op.

Each form is compared with ONNX Runtime (forward) and with x @ W.T on the dequantized W (input
gradient), and the tensors autograd saves are checked to hold no float W.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper

import lora_fx
from lora_fx.config import QuantConfig
from runtime.onnx_torch import OnnxModule, trainable_module

from .onnx_models import ort_run

N, K = 48, 40
rng = np.random.default_rng(5)


def _weights() -> tuple[np.ndarray, np.ndarray]:
    q = rng.integers(-127, 128, (N, K)).astype(np.int8)  # [N, K]
    scale = (rng.random(N) * 0.02 + 0.005).astype(np.float32)
    return q, scale


def _model(form: str, zero_point: int = 0, shared: bool = False) -> tuple[ir.Model, np.ndarray, np.ndarray | None]:
    """A one-layer graph in ``form`` and its dequantized W [N, K]."""
    q, scale = _weights()
    w = q.astype(np.float32) * scale[:, None]
    bias = rng.standard_normal(N).astype(np.float32)
    inits: dict[str, np.ndarray] = {}
    nodes = []
    x_shape: list = ["batch", "seq", K]
    if form in ("nbits", "nbits_computed"):  # per-channel int8 in MatMulNBits bits 8, as other tools write it
        from lora_fx.kernels.quant_formats import int8_to_nbits

        block = 16  # K = 40: rows padded to 3 blocks
        blocks = -(-K // block)
        ms = dict(domain="com.microsoft", K=K, N=N, bits=8, block_size=block, accuracy_level=0)
        if form == "nbits":  # B and scales are initializers; a bias input
            b_nb, s_nb = int8_to_nbits(torch.from_numpy(q), torch.from_numpy(scale), block)
            inits.update(b=b_nb.numpy(), s=s_nb.numpy(), bias=bias)
            zero = ""
            if zero_point:  # zero points other than 128: another tool's int8, not lora_fx's
                inits["z"] = np.full(N * blocks, 128 + zero_point, np.uint8)
                w, zero = (q.astype(np.float32) - zero_point) * scale[:, None], "z"
            nodes.append(helper.make_node("MatMulNBits", ["x", "b", "s", zero, "", "bias"], ["y"], **ms))
            return _finish(form, nodes, inits, x_shape, shared), w, bias
        # B and scales computed from int8 [N, K] codes and [N] scales by constant nodes, as an exporter may write them.
        inits.update(q=q, s=scale, pad=np.zeros((N, blocks * block - K), np.int16),
                     off=np.array(128, np.int16), b_shape=np.array([N, blocks, block], np.int64),
                     col=np.array([N, 1], np.int64), grid=np.array([N, blocks], np.int64), flat=np.array([-1], np.int64))
        nodes += [helper.make_node("Cast", ["q"], ["q16"], to=TensorProto.INT16),
                  helper.make_node("Concat", ["q16", "pad"], ["q16p"], axis=1),
                  helper.make_node("Add", ["q16p", "off"], ["c16"]),
                  helper.make_node("Cast", ["c16"], ["c8"], to=TensorProto.UINT8),
                  helper.make_node("Reshape", ["c8", "b_shape"], ["b"]),
                  helper.make_node("Reshape", ["s", "col"], ["s_col"]),
                  helper.make_node("Expand", ["s_col", "grid"], ["s_grid"]),
                  helper.make_node("Reshape", ["s_grid", "flat"], ["s_flat"]),
                  helper.make_node("CastLike", ["s_flat", "x"], ["s_nb"]),
                  helper.make_node("MatMulNBits", ["x", "b", "s_nb"], ["y"], **ms)]
        return _finish(form, nodes, inits, x_shape, shared), w, None
    if form == "lora_fx":  # passes/onnx/quantize_weights' int8 layout
        inits.update(q=q, s=scale)
        nodes += [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0),
                  helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
                  helper.make_node("MatMul", ["x", "wt"], ["y"])]
    elif form == "fx_export":  # lora_fx/quant_export's translation of lora_fx::linear_int8: W cast like x first
        inits.update(q=q, s=scale)
        nodes += [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0),
                  helper.make_node("CastLike", ["w", "x"], ["wc"]),
                  helper.make_node("Transpose", ["wc"], ["wt"], perm=[1, 0]),
                  helper.make_node("MatMul", ["x", "wt"], ["y"])]
    elif form in ("ort_channel", "ort_tensor"):  # ONNX Runtime's quantizer: W [K, N], zero point 0
        if form == "ort_tensor":
            scale = np.full(N, scale[0], np.float32)
            w = q.astype(np.float32) * scale[:, None]
            inits.update(q=np.ascontiguousarray(q.T), s=np.array(scale[0], np.float32), z=np.array(zero_point, np.int8))
        else:
            inits.update(q=np.ascontiguousarray(q.T), s=scale, z=np.full(N, zero_point, np.int8))
            w = (q.astype(np.float32) - zero_point) * scale[:, None]
        nodes += [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=1),
                  helper.make_node("MatMul", ["x", "w"], ["y"])]
    elif form in ("gemm_transB", "gemm"):
        x_shape = ["batch", K]
        if form == "gemm_transB":
            inits.update(q=q, s=scale, b=bias)
            nodes.append(helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0))
        else:
            inits.update(q=np.ascontiguousarray(q.T), s=scale, b=bias)
            nodes.append(helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=1))
        nodes.append(helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=int(form == "gemm_transB")))
    else:
        raise AssertionError(form)
    model = _finish(form, nodes, inits, x_shape, shared)
    return model, w, (bias if form.startswith("gemm") else None)


def _finish(form: str, nodes: list, inits: dict[str, np.ndarray], x_shape: list, shared: bool) -> ir.Model:
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if shared:  # the dequantized W (or MatMulNBits' B) is read a second time: it must stay a plain node
        if form.startswith("nbits"):
            nodes.append(helper.make_node("Identity", ["b"], ["w_sum"]))
        else:
            nodes.append(helper.make_node("ReduceSum", ["w"], ["w_sum"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("w_sum", TensorProto.UINT8 if form.startswith("nbits") else TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, form, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)], outputs,
                              initializer=[onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    return ir.serde.deserialize_model(model)


def _saved_float_matrices(module: OnnxModule, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], list]:
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x=x)
    return out, [s for s in saved if s[0] in {(N, K), (K, N)} and s[1].is_floating_point]


@pytest.mark.parametrize("form", ["nbits", "nbits_computed", "lora_fx", "fx_export", "ort_channel", "ort_tensor", "gemm_transB",
                                  "gemm"])
def test_int8_chain_runs_fused_like_onnxruntime_and_saves_no_float_weight(form: str, tmp_path: Path) -> None:
    model, w, bias = _model(form)
    path = tmp_path / "m.onnx"
    ir.save(model, str(path))
    module = OnnxModule(model, trainable=[])
    assert len(module.int8_linears.matched) == 1 and not module.int8_linears.refused
    if form.startswith("nbits"):
        # The op's int8 [N, K] copy replaces what only MatMulNBits read: no second copy of W is held.
        assert not [b for b in module.buffers() if b.numel() >= N * K and b.dtype != torch.int8]
        assert sum(b.numel() for b in module.buffers() if b.dtype == torch.int8) == N * K
    x_np = rng.standard_normal((2, K) if form.startswith("gemm") else (2, 3, K)).astype(np.float32)
    x = torch.from_numpy(x_np).requires_grad_()
    out, float_w = _saved_float_matrices(module, x)
    assert not float_w
    y = out["y"]
    np.testing.assert_allclose(y.detach().numpy(), ort_run(path, {"x": x_np})[0], rtol=1e-5, atol=1e-5)
    y.pow(2).sum().backward()
    wt = torch.from_numpy(w)
    want = x.detach() @ wt.t() + (torch.from_numpy(bias) if bias is not None else 0)
    torch.testing.assert_close(y.detach(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, 2 * want @ wt, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form, zero_point, shared, why", [
    ("ort_channel", 3, False, "zero point is not 0"),
    ("nbits", 3, False, "zero points are not 128"),
    ("lora_fx", 0, True, "feeds more than"),
])
def test_chains_the_op_cannot_take_run_node_by_node_and_say_why(form, zero_point, shared, why, tmp_path: Path) -> None:
    model, w, _ = _model(form, zero_point=zero_point, shared=shared)
    path = tmp_path / "m.onnx"
    ir.save(model, str(path))
    with pytest.warns(UserWarning, match=rf"1 int8 weight\(s\) .* keeps a float copy .*{why}"):
        module = OnnxModule(model, trainable=[])
    assert not module.int8_linears.matched
    assert [why in r for r in module.int8_linears.refused.values()] == [True]
    x_np = rng.standard_normal((2, 3, K)).astype(np.float32)
    out, float_w = _saved_float_matrices(module, torch.from_numpy(x_np).requires_grad_())
    assert float_w  # the plain path: the decoded W is what MatMul saves
    np.testing.assert_allclose(out["y"].detach().numpy(), ort_run(path, {"x": x_np})[0], rtol=1e-5, atol=1e-5)


def test_matmul_nbits_b_read_elsewhere_stays_and_the_fused_call_still_runs(tmp_path: Path) -> None:
    model, w, bias = _model("nbits", shared=True)
    path = tmp_path / "m.onnx"
    ir.save(model, str(path))
    module = OnnxModule(model, trainable=[])
    assert len(module.int8_linears.matched) == 1 and module.int8_linears.matched[0].released == ("s",)
    x_np = rng.standard_normal((2, 3, K)).astype(np.float32)
    out, float_w = _saved_float_matrices(module, torch.from_numpy(x_np).requires_grad_())
    assert not float_w
    want = ort_run(path, {"x": x_np})
    np.testing.assert_allclose(out["y"].detach().numpy(), want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["w_sum"].numpy(), want[1])


def test_nodes_computing_the_activation_are_never_absorbed(tmp_path: Path) -> None:
    """A CastLike(scales, x) (lora_fx's FX export writes one for int4 scales) reads x for its type: when x
    comes from a node read by nothing else (a site without adapter), that node must still run; only the
    constant nodes behind B go."""
    model, w, _ = _model("nbits_computed")
    graph = model.graph
    x = graph.inputs[0]
    relu = ir.node("Relu", [x], name="act")
    relu.outputs[0].dtype, relu.outputs[0].shape = x.dtype, x.shape
    graph.insert_before(graph.node(0), relu)
    for user, index in list(x.uses()):
        if user is not relu:
            user.replace_input_with(index, relu.outputs[0])
    path = tmp_path / "m.onnx"
    ir.save(model, str(path))
    module = OnnxModule(model, trainable=[])
    (hit,) = module.int8_linears.matched
    assert relu not in hit.skipped and {n.op_type for n in hit.skipped} >= {"Cast", "Concat", "Add", "Reshape", "Expand"}
    x_np = rng.standard_normal((2, 3, K)).astype(np.float32)
    got = module(x=torch.from_numpy(x_np))["y"].numpy()
    np.testing.assert_allclose(got, ort_run(path, {"x": x_np})[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, np.maximum(x_np, 0) @ w.T, rtol=1e-5, atol=1e-5)


def test_qlora_int8_onnx_model_trains_without_float_weights(tmp_path: Path, monkeypatch) -> None:
    """lora_fx.apply with an int8 QuantConfig on an ONNX MLP: every quantized site runs fused, the LoRA
    gradients equal the plain node-by-node path's, and the loss falls."""
    from tests.passes.onnx.test_quantize_weights import IN, OUT, _mlp

    def build() -> ir.Model:
        model, _, _ = _mlp()
        torch.manual_seed(0)
        lora_fx.apply(model, lora_fx.LoraConfig(r=4, target_modules=["fc1", "fc2"], init_lora_weights=False),
                      quant=QuantConfig(dtype="int8", target_modules=".*"))
        return model

    module = trainable_module(build())
    assert len(module.int8_linears.matched) == 2
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((6, IN)).astype(np.float32))
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = module(x=x)["y"].pow(2).mean()
    assert not {(IN, OUT), (OUT, IN), (OUT, OUT)} & set(saved), saved
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_adapters().items()}

    from runtime.int8_linear import Int8Linears

    # The same graph node by node (DequantizeLinear -> Transpose -> MatMul, a float W saved): what the fused path must equal.
    monkeypatch.setitem(trainable_module.__globals__, "find_int8_linears", lambda graph: Int8Linears())
    plain = trainable_module(build())
    plain(x=x)["y"].pow(2).mean().backward()
    for name, p in plain.named_adapters().items():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)

    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = module(x=x)["y"].pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_torch_compile_trains_through_the_fused_int8_chain() -> None:
    model, w, _ = _model("lora_fx")
    module = OnnxModule(model, trainable=[])
    x_np = rng.standard_normal((2, 3, K)).astype(np.float32)

    def grad_of(fn):
        x = torch.from_numpy(x_np).requires_grad_()
        fn(x=x)["y"].pow(2).sum().backward()
        return x.grad

    torch._dynamo.reset()
    torch.testing.assert_close(grad_of(torch.compile(module)), grad_of(module), rtol=1e-5, atol=1e-5)
