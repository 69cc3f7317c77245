"""Quantized-weight ops (lora_fx.runtime.onnx_ops.quantized) against ONNX Runtime: DequantizeLinear
(per channel, int4 blocked), MatMulNBits (bits 4 and 8) and MatMulBnb4, and training through them without a float W."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper

from lora_fx.runtime.onnx_torch import OnnxModule
from tests.runtime.onnx_ops.single_op import check_against_ort, rng, single_op_model


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
    check_against_ort(model, {"x": x}, tmp_path, tol=1e-5)


def test_dequantize_linear_per_channel(tmp_path: Path) -> None:
    q = rng.integers(0, 255, (4, 6)).astype(np.uint8)
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1)
    model = single_op_model(node, {"q": q}, inits={"s": rng.random(6).astype(np.float32), "z": rng.integers(0, 255, 6).astype(np.uint8)})
    check_against_ort(model, {"q": q}, tmp_path)


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
    model = single_op_model(node, {"x": x}, inits=inits)
    check_against_ort(model, {"x": x}, tmp_path, tol=1e-4)


# per-channel int8 (one scale per row, zero point 128: run through lora_fx::linear_int8), per-block scales,
# explicit uint8 zero points; K = 40 pads each row to 3 blocks of 16.
@pytest.mark.parametrize("layout", ["per_row", "per_block", "zero_points"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_matmul_nbits_8_bits(layout: str, dtype, tmp_path: Path) -> None:
    n, k, block = 6, 40, 16
    blocks = -(-k // block)
    packed = rng.integers(0, 256, (n, blocks, block)).astype(np.uint8)
    scales = ((rng.random((n, blocks)) + 0.1) * 0.01).astype(dtype)
    if layout != "per_block":
        scales[:] = scales[:, :1]
    inits = {"w": packed, "s": scales.reshape(-1)}
    ins = ["x", "w", "s"]
    if layout == "zero_points":
        inits["z"] = rng.integers(100, 156, n * blocks).astype(np.uint8)
        ins.append("z")
    node = helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=k, N=n, bits=8, block_size=block,
                            accuracy_level=0)
    x = rng.standard_normal((3, k)).astype(dtype)
    model = single_op_model(node, {"x": x}, inits=inits)
    check_against_ort(model, {"x": x}, tmp_path, tol=1e-4 if dtype == np.float32 else 2e-3)
    # The decode the spec defines: (code - zero) * scale, zero 128 unless given; the row padding is never read.
    zero = inits["z"].reshape(n, blocks, 1) if "z" in inits else 128
    w = ((packed.astype(np.float64) - zero) * scales.astype(np.float64)[..., None]).reshape(n, -1)[:, :k]
    got = OnnxModule(model, trainable=[])(x=torch.from_numpy(x))["y"].double().numpy()
    want = x.astype(np.float64) @ w.T
    assert np.abs(got - want).max() / np.abs(want).max() <= (1e-6 if dtype == np.float32 else 2e-3)


def test_matmul_bnb4_nf4(tmp_path: Path) -> None:
    n, k, block = 4, 64, 32
    packed = rng.integers(0, 256, (n * k // 2,)).astype(np.uint8)
    absmax = (rng.random(n * k // block) + 0.5).astype(np.float32)
    node = helper.make_node("MatMulBnb4", ["x", "w", "a"], ["y"], domain="com.microsoft", K=k, N=n, block_size=block, quant_type=1)
    x = rng.standard_normal((2, k)).astype(np.float32)
    model = single_op_model(node, {"x": x}, inits={"w": packed, "a": absmax})
    check_against_ort(model, {"x": x}, tmp_path, tol=1e-4)


# (64, 32): whole blocks; (40, 16): every row padded to 3 blocks, each row's zero points end on a padding nibble.
@pytest.mark.parametrize("k, block", [(64, 32), (40, 16)])
@pytest.mark.parametrize("op", ["MatMulBnb4", "MatMulNBits"])
def test_training_through_4bit_onnx_weights_saves_no_float_weight(op: str, k: int, block: int, tmp_path: Path) -> None:
    """The backward decodes W again (lora_fx's quantized ops) instead of keeping the decoded W."""
    n = 48
    if op == "MatMulBnb4":
        blocks = -(-n * k // block)
        inits = {"w": rng.integers(0, 256, (n * k // 2,)).astype(np.uint8), "a": (rng.random(blocks) + 0.5).astype(np.float32)}
        node = helper.make_node(op, ["x", "w", "a"], ["y"], domain="com.microsoft", K=k, N=n, block_size=block, quant_type=1)
    else:
        per_row = -(-k // block)
        inits = {"w": rng.integers(0, 256, (n, per_row, block // 2)).astype(np.uint8),
                 "s": (rng.random(n * per_row) + 0.1).astype(np.float32),
                 "z": rng.integers(0, 256, (n, (per_row + 1) // 2)).astype(np.uint8)}
        node = helper.make_node(op, ["x", "w", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block)
    x = rng.standard_normal((3, 5, k)).astype(np.float32)
    model = single_op_model(node, {"x": x}, inits=inits)
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
    eye = OnnxModule(single_op_model(node, {"x": np.eye(k, dtype=np.float32)}, inits=inits), trainable=[])
    w_t = eye(x=torch.eye(k))["y"].detach()  # [K, N] = W.T
    torch.testing.assert_close(xt.grad, 2 * (xt.detach() @ w_t) @ w_t.t(), rtol=1e-4, atol=1e-4)
    check_against_ort(model, {"x": x}, tmp_path, tol=1e-4)



def test_matmul_bnb4_with_trans_b_0_is_refused() -> None:
    """ONNX Runtime's transB=0 reads x [..., N] and gives y [..., K] with values that are no product of x and
    the decoded W (neither [N, K] nor [K, N]); lora_fx refuses it rather than compute something else."""
    from lora_fx.errors import UnsupportedError

    n, k, block = 8, 64, 32
    node = helper.make_node("MatMulBnb4", ["x", "w", "a"], ["y"], domain="com.microsoft", K=k, N=n, block_size=block,
                            quant_type=1, transB=0)
    x = rng.standard_normal((2, n)).astype(np.float32)
    model = single_op_model(node, {"x": x}, inits={"w": rng.integers(0, 256, (n * k // 2,)).astype(np.uint8),
                                                   "a": (rng.random(n * k // block) + 0.5).astype(np.float32)})
    with pytest.raises(UnsupportedError, match="MatMulBnb4 with transB=0 is not supported"):
        OnnxModule(model, trainable=[])(x=torch.from_numpy(x))
