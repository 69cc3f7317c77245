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
    if form == "lora_fx":  # passes/onnx/quantize_weights' int8 layout
        inits.update(q=q, s=scale)
        nodes += [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0),
                  helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
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
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if shared:  # the dequantized W is read a second time: it must stay a plain node
        nodes.append(helper.make_node("ReduceSum", ["w"], ["w_sum"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("w_sum", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, form, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)], outputs,
                              initializer=[onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    if form.startswith("gemm"):
        return ir.serde.deserialize_model(model), w, bias
    return ir.serde.deserialize_model(model), w, None


def _saved_float_matrices(module: OnnxModule, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], list]:
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x=x)
    return out, [s for s in saved if s[0] in {(N, K), (K, N)} and s[1].is_floating_point]


@pytest.mark.parametrize("form", ["lora_fx", "ort_channel", "ort_tensor", "gemm_transB", "gemm"])
def test_int8_chain_runs_fused_like_onnxruntime_and_saves_no_float_weight(form: str, tmp_path: Path) -> None:
    model, w, bias = _model(form)
    path = tmp_path / "m.onnx"
    ir.save(model, str(path))
    module = OnnxModule(model, trainable=[])
    assert len(module.int8_linears.matched) == 1 and not module.int8_linears.refused
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
    ("lora_fx", 0, True, "feeds more than"),
])
def test_chains_the_op_cannot_take_run_node_by_node_and_say_why(form, zero_point, shared, why, tmp_path: Path) -> None:
    model, w, _ = _model(form, zero_point=zero_point, shared=shared)
    path = tmp_path / "m.onnx"
    ir.save(model, str(path))
    with pytest.warns(UserWarning, match=rf"1 DequantizeLinear weight\(s\) .* keeps a float copy .*{why}"):
        module = OnnxModule(model, trainable=[])
    assert not module.int8_linears.matched
    assert [why in r for r in module.int8_linears.refused.values()] == [True]
    x_np = rng.standard_normal((2, 3, K)).astype(np.float32)
    out, float_w = _saved_float_matrices(module, torch.from_numpy(x_np).requires_grad_())
    assert float_w  # the plain path: the decoded W is what MatMul saves
    np.testing.assert_allclose(out["y"].detach().numpy(), ort_run(path, {"x": x_np})[0], rtol=1e-5, atol=1e-5)


def test_qlora_int8_onnx_model_trains_without_float_weights(tmp_path: Path) -> None:
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

    plain = trainable_module(build())
    plain.int8_linears.matched.clear()  # the same graph node by node: what the fused path must equal
    plain._nodes = plain._compile(plain._model.graph, set(plain._init_consts), {})
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
