"""int8 weights in plain ONNX Runtime: lora_fx's form, and MatMulNBits bits 8 files of other tools.

lora_fx writes int8 as ``DequantizeLinear -> Transpose -> MatMul``. ONNX Runtime 1.31 fuses a per-channel
int8 ``DequantizeLinear -> MatMul`` into ``MatMulNBits(bits=8, accuracy_level=4)``, which quantizes the
activations to int8: a user who loads lora_fx's int8 export without
``session.qdq_matmulnbits_accuracy_level=0`` gets ~0.4% error (``lora_fx.runtime.ort.Session`` sets it).
The strict xfail records that. Writing ``MatMulNBits(bits=8, accuracy_level=0)`` instead, which ORT
computes exactly under default options, was measured 2-4x slower (its CPU kernel decodes W on every
call) and not kept; such files from other tools (ONNX Runtime's own MatMulNBits quantizer) are read,
run and trained exactly, which the last tests check.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import lora_fx
from lora_fx.config import QuantConfig
from lora_fx.passes.onnx.quantize_weights import quantize_weights
from lora_fx.passes.onnx.quantized_weight import quantized_weight
from lora_fx.runtime.onnx_torch import OnnxModule, trainable_module
from tests.passes.onnx.test_quantize_weights import IN, _mlp

LEVEL = "session.qdq_matmulnbits_accuracy_level"
X = np.random.default_rng(1).standard_normal((4, IN)).astype(np.float32)


def _int8_model() -> tuple[bytes, np.ndarray]:
    model, _, _ = _mlp()
    quantize_weights(model, QuantConfig(dtype="int8"))
    assert [n.op_type for n in model.graph] == ["DequantizeLinear", "Transpose", "MatMul", "Add", "Relu",
                                                "DequantizeLinear", "Transpose", "MatMul"]
    w = {n.name: quantized_weight(n.name, n).dequantize() for n in model.graph if n.op_type == "MatMul"}
    b1 = model.graph.initializers["fc1.bias"].const_value.numpy()
    ref = np.maximum(X.astype(np.float64) @ w["fc1/MatMul"].T + b1, 0) @ w["fc2/MatMul"].T
    return ir.serde.serialize_model(model).SerializeToString(), ref


def _rel(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def test_int8_exact_with_accuracy_level_0():
    proto, ref = _int8_model()
    options = ort.SessionOptions()
    options.add_session_config_entry(LEVEL, "0")
    y = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    assert _rel(y, ref) < 1e-5


@pytest.mark.xfail(strict=True, reason="ORT fuses int8 DQ->MatMul into MatMulNBits accuracy_level=4 (int8 activations); "
                   "the exact MatMulNBits(bits=8) form was measured 2-4x slower and not kept; lora_fx's Session sets level 0")
def test_int8_exact_with_default_session_options():
    proto, ref = _int8_model()
    y = ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    assert _rel(y, ref) < 1e-5


# ---- MatMulNBits bits 8 as another tool writes it --------------------------------------------------------
def ort_int8_mlp(block_size: int) -> ir.Model:
    """The two-layer MLP of ``_mlp`` quantized by ONNX Runtime's own MatMulNBitsQuantizer to symmetric
    ``MatMulNBits(bits=8)``: blocks of 32 give per-block scales; 128 one block a row (per output channel;
    fc2's K = 64 padded to the block)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model, _, _ = _mlp()
    quantizer = MatMulNBitsQuantizer(ir.to_proto(model), algo_config=DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, bits=8))
    quantizer.process()
    out = ir.from_proto(quantizer.model.model)
    nodes = [n for n in out.graph if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 and {(n.attributes["bits"].value, n.attributes["block_size"].value) for n in nodes} == {(8, block_size)}
    return out


def spec_decode_nbits8(node: ir.Node) -> np.ndarray:
    """W ``[N, K]`` of a MatMulNBits bits=8 node as the contrib-op spec defines it: B ``[N, blocks, block]``
    a byte a code, ``(code - zero) * scale`` per block, zero point 128 unless given, the row padding cut."""
    n, k, bs = (node.attributes[a].value for a in ("N", "K", "block_size"))
    blocks = -(-k // bs)
    codes = node.inputs[1].const_value.numpy().reshape(n, blocks, bs).astype(np.float64)
    scales = node.inputs[2].const_value.numpy().reshape(n, blocks, 1).astype(np.float64)
    zero = 128.0
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        zero = node.inputs[3].const_value.numpy().reshape(n, blocks, 1).astype(np.float64)
    return ((codes - zero) * scales).reshape(n, blocks * bs)[:, :k]


def _reference(model: ir.Model, x: np.ndarray) -> np.ndarray:
    w1, w2 = (spec_decode_nbits8(n) for n in model.graph if n.op_type == "MatMulNBits")
    b1 = model.graph.initializers["fc1.bias"].const_value.numpy().astype(np.float64)
    return np.maximum(x.astype(np.float64) @ w1.T + b1, 0) @ w2.T


@pytest.mark.parametrize("block_size", [32, 128])
def test_matmul_nbits_8_bits_file_of_another_tool_runs_exactly_in_plain_ort_and_in_lora_fx(block_size):
    model = ort_int8_mlp(block_size)
    ref = _reference(model, X)
    w1 = spec_decode_nbits8(next(n for n in model.graph if n.op_type == "MatMulNBits"))
    assert 0 < np.abs(w1 - _mlp()[1].T).max() <= np.abs(w1).max() * 0.01  # quantized for real
    # Plain ONNX Runtime, default session options: x @ W exactly (the ops say accuracy_level 0 by default).
    y = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    assert _rel(y, ref) < 1e-5
    # lora_fx reads both layouts; one scale a row runs fused through lora_fx::linear_int8, per-block scales node by node.
    per_row = block_size == 128
    assert [quantized_weight(n.name, n).per_channel for n in model.graph if n.op_type == "MatMulNBits"] == [per_row] * 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = OnnxModule(model, trainable=[])
    assert len(module.int8_linears.matched) == (2 if per_row else 0)
    assert any("dequantized whole" in str(w.message) for w in caught) != per_row
    assert _rel(module(x=torch.from_numpy(X))["y"].double().numpy(), ref) < 1e-5


@pytest.mark.parametrize("block_size", [32, 128])
def test_training_through_another_tool_s_int8_matmul_nbits_gives_the_float_model_s_gradients(block_size):
    """LoRA on an ORT-quantized bits=8 file: the adapters' gradients are those of the float model holding the
    spec-decoded W; one scale a row keeps no float W for backward; the loss falls; ORT runs the trained file."""
    lora = lora_fx.LoraConfig(r=4, target_modules=".*", init_lora_weights=False)
    model = ort_int8_mlp(block_size)
    w1, w2 = (spec_decode_nbits8(n) for n in model.graph if n.op_type == "MatMulNBits")
    torch.manual_seed(0)
    lora_fx.apply(model, lora)
    plain, _, _ = _mlp()
    for name, w in (("fc1.weight", w1), ("fc2.weight", w2)):
        plain.graph.initializers[name].const_value = ir.tensor(np.ascontiguousarray(w.T.astype(np.float32)), name=name)
    lora_fx.apply(plain, lora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-block scales: the float-copy warning (checked above)
        mq = trainable_module(model)
    mf = trainable_module(plain)
    assert set(mq.trainable_names) == set(mf.trainable_names) and len(mq.trainable_names) == 4
    with torch.no_grad():
        for name, p in mf.named_adapters().items():
            p.copy_(mq.named_adapters()[name])
    x = torch.from_numpy(X)
    saved: list[tuple[tuple[int, ...], bool]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.is_floating_point())) or t,
                                                  lambda t: t):
        loss = mq(x=x)["y"].pow(2).mean()
    float_w = [s for s, is_float in saved if is_float and s in {(64, IN), (IN, 64), (64, 64)}]
    assert bool(float_w) == (block_size == 32), float_w
    loss.backward()
    mf(x=x)["y"].pow(2).mean().backward()
    for name, p in mq.named_adapters().items():
        assert p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, mf.named_adapters()[name].grad, rtol=1e-4, atol=1e-7)

    opt = torch.optim.AdamW(mq.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(5):
        opt.zero_grad()
        loss = mq(x=x)["y"].pow(2).mean()
        loss.backward()
        opt.step()
    assert loss.item() < first
    mq.write_back()
    with torch.no_grad():
        want = mq(x=x)["y"].double().numpy()
    y = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    assert _rel(y, want) < 1e-5


@pytest.mark.slow
def test_fx_int8_export_runs_exactly_in_onnx_runtime_with_accuracy_level_0(tmp_path):
    """An int8 QLoRA GraphModule exported to ONNX (DequantizeLinear form): ONNX Runtime with the level-0
    session option (adapter active) gives the GraphModule's output."""
    from lora_fx.export import export_onnx
    from lora_fx.onnx_model import load
    from tests.models import inputs, max_rel, run
    from tests.passes.fx.test_quantize_weights import _odd_llama

    gm = lora_fx.capture(_odd_llama(), kwargs=inputs(2, 4))
    torch.manual_seed(1)
    gm = lora_fx.apply(gm, lora_fx.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
                       quant=QuantConfig(dtype="int8"))
    b = inputs(3, 7, pad=2)
    want = run(gm, b)
    result = export_onnx(copy.deepcopy(gm), tmp_path / "q.onnx", kwargs=inputs(2, 4), mode="adapters", peft_dir=False)
    ops = [n.op_type for n in load(tmp_path / "q.onnx").graph]
    assert ops.count("DequantizeLinear") == 7 and "MatMulNBits" not in ops
    # Training through the exported file runs every int8 weight as lora_fx's int8 op (no float W kept).
    from runtime.onnx_torch import OnnxModule

    int8 = OnnxModule(load(tmp_path / "q.onnx"), trainable=[]).int8_linears
    assert len(int8.matched) == 7 and not int8.refused, int8.refused
    options = ort.SessionOptions()
    options.add_session_config_entry(LEVEL, "0")
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in b.items()}
    adapter = ort.LoraAdapter()
    adapter.Load(str(result.adapter_paths[0]))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(adapter)
    assert max_rel(torch.from_numpy(session.run(None, feeds, run_options)[0]), want) <= 1e-5
    # The random adapters matter, so the comparison above can fail.
    assert max_rel(torch.from_numpy(session.run(None, feeds)[0]), want) > 1e-3
