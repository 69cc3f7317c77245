"""passes/onnx/quantize_weights against the contrib-op specs and ONNX Runtime: every stored form (MatMulBnb4,
MatMulNBits with padded rows, DequantizeLinear int8), float32 and float16 models, MatMul on 3-D inputs and
Gemm with transB and a bias; lora_fx's torch runtime of the same file; adapter gradients; shared weights."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lora_fx
from lora_fx.config import QuantConfig
from lora_fx.errors import ConfigError
from lora_fx.passes.onnx.quantize_weights import quantize_weights
from lora_fx.runtime.onnx_torch import OnnxModule, trainable_module

# QLoRA's NF4 code book, as printed in bitsandbytes (functional.py, get_4bit_type "nf4").
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0])
IN, OUT = 72, 20  # N*K = 1440: a short last nf4 block of 64; K = 72: int4 rows of 3 blocks of 32, padded

FORMATS = {
    "nf4": QuantConfig(dtype="nf4"),
    "nf4-dq": QuantConfig(dtype="nf4", double_quant=True, double_quant_block_size=8),
    "int4": QuantConfig(dtype="int4", block_size=32),
    "int4-affine": QuantConfig(dtype="int4", block_size=32, symmetric=False),
    "int4-wide-block": QuantConfig(dtype="int4", block_size=128),  # one block a row, mostly padding
    "int8": QuantConfig(dtype="int8"),
}
DTYPES = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}


def _model(form: str, dtype: str, seed: int = 0) -> tuple[ir.Model, np.ndarray, np.ndarray]:
    """One linear site ``fc`` with a bias: MatMul(x [b, s, IN], W [IN, OUT]) + b, or Gemm(x [b, IN], W [OUT, IN],
    b, transB=1). Returns the model, W as [out, in] and b (float64)."""
    np_type, onnx_type = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((OUT, IN)) * 0.2).astype(np_type)
    w[3, :] = 0.0  # an all-zero row
    b = rng.standard_normal(OUT).astype(np_type)
    if form == "matmul":
        nodes = [helper.make_node("MatMul", ["x", "fc.weight"], ["h"], name="fc/MatMul"),
                 helper.make_node("Add", ["h", "fc.bias"], ["y"], name="fc/Add")]
        inits, x_shape, y_shape = [numpy_helper.from_array(np.ascontiguousarray(w.T), "fc.weight")], ["b", "s", IN], ["b", "s", OUT]
    else:
        nodes = [helper.make_node("Gemm", ["x", "fc.weight", "fc.bias"], ["y"], name="fc/Gemm", transB=1)]
        inits, x_shape, y_shape = [numpy_helper.from_array(w, "fc.weight")], ["b", IN], ["b", OUT]
    graph = helper.make_graph(nodes, "fc", [helper.make_tensor_value_info("x", onnx_type, x_shape)],
                              [helper.make_tensor_value_info("y", onnx_type, y_shape)], inits + [numpy_helper.from_array(b, "fc.bias")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return ir.serde.deserialize_model(proto), w.astype(np.float64), b.astype(np.float64)


def _session(model: ir.Model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # ORT fuses DequantizeLinear(int8) -> MatMul into MatMulNBits(bits=8) at accuracy_level 4 (x quantized to
    # int8, about 0.4% off here) unless told otherwise; the ops quantize_weights writes say accuracy_level=0.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


def _nibbles(packed: np.ndarray, high_first: bool) -> np.ndarray:
    p = packed.reshape(-1).astype(np.int64)
    return np.stack([p >> 4, p & 15] if high_first else [p & 15, p >> 4], axis=1).reshape(-1)


def _value(model: ir.Model, value: ir.Value) -> np.ndarray:
    """An initializer, or (double-quantized absmax) the ONNX Runtime-evaluated constant subgraph behind it."""
    if value.name in model.graph.initializers:
        return model.graph.initializers[value.name].const_value.numpy().astype(np.float64)
    probe = ir.from_proto(ir.to_proto(model))
    probe.graph.outputs.append(next(v for n in probe.graph for v in n.outputs if v.name == value.name))
    x = {"x": np.zeros([d if isinstance(d, int) else 1 for d in (probe.graph.inputs[0].shape or [1, IN])],
                       probe.graph.inputs[0].dtype.numpy())}
    return _session(probe).run([value.name], x)[0].astype(np.float64)


def _spec_decode(model: ir.Model) -> np.ndarray:
    """W [out, in] of the quantized site, decoded from the stored bytes as the contrib-op specs define them."""
    (node,) = [n for n in model.graph if n.op_type in ("MatMulBnb4", "MatMulNBits", "DequantizeLinear")]
    first = 0 if node.op_type == "DequantizeLinear" else 1  # the contrib ops' input 0 is x
    ins = [None] * first + [_value(model, v) if v is not None else None for v in node.inputs[first:]]
    if node.op_type == "DequantizeLinear":  # q [N, K] int8, one scale per output channel (axis 0)
        return ins[0] * ins[1][:, None]
    n, k, bs = (node.attributes[a].value for a in ("N", "K", "block_size"))
    if node.op_type == "MatMulBnb4":  # flattened [N*K] in blocks, high nibble first, code * absmax
        codes = NF4[_nibbles(ins[1].astype(np.uint8), True)[: n * k]]
        return (codes * np.repeat(ins[2], bs)[: n * k]).reshape(n, k)
    per_row = -(-k // bs)  # MatMulNBits: B [N, per_row, bs/2] low nibble first; zero points [N, ceil(per_row/2)]
    codes = _nibbles(ins[1].astype(np.uint8), False).reshape(n, per_row * bs)
    zero = (_nibbles(ins[3].astype(np.uint8), False).reshape(n, -1)[:, :per_row] if len(ins) > 3 and ins[3] is not None
            else np.full((n, per_row), 8))
    w = (codes - np.repeat(zero, bs, axis=1)) * np.repeat(ins[2].reshape(n, per_row), bs, axis=1)
    return w[:, :k]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("form", ["matmul", "gemm"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_ort_and_lora_fx_runtime_compute_x_times_the_spec_decoded_weight(fmt, form, dtype):
    model, w, b = _model(form, dtype)
    result = quantize_weights(model, QuantConfig(**{**FORMATS[fmt].to_dict(), "target_modules": ".*"}))
    assert result.modified and "fc.weight" not in model.graph.initializers
    w_deq = _spec_decode(model)
    assert np.abs(w_deq - w).max() > 1e-4  # quantized for real, so the comparisons below can fail
    assert np.abs(w_deq - w).max() <= np.abs(w).max() * (0.02 if fmt == "int8" else 0.2)
    assert np.all(w_deq[3] == 0)
    np_type = DTYPES[dtype][0]
    shape = (2, 5, IN) if form == "matmul" else (7, IN)
    x = np.random.default_rng(1).standard_normal(shape).astype(np_type)
    want = x.astype(np.float64) @ w_deq.T + b
    got = _session(model).run(None, {"x": x})[0]
    assert got.dtype == np_type and got.shape == want.shape
    tol = 1e-5 if dtype == "float32" else 4e-3
    assert np.abs(got - want).max() / np.abs(want).max() <= tol
    ours = OnnxModule(model, trainable=[])(x=torch.from_numpy(x))["y"]
    assert ours.dtype == torch.from_numpy(x).dtype
    assert np.abs(ours.double().numpy() - want).max() / np.abs(want).max() <= tol


@pytest.mark.parametrize("fmt", ["nf4-dq", "int4-affine", "int8"])
def test_adapter_gradients_through_quantized_onnx_weights_equal_the_float_model_s(fmt):
    """Training an ONNX file runs its quantized W in torch: the adapters' gradients are those of the same
    model with a float W holding the dequantized values, and the stored W never changes."""
    lora = lora_fx.LoraConfig(r=4, target_modules=["fc"], init_lora_weights=False)
    model, _, _ = _model("matmul", "float32")
    torch.manual_seed(0)
    lora_fx.apply(model, lora, quant=QuantConfig(**{**FORMATS[fmt].to_dict(), "target_modules": ".*"}))
    w_deq = _spec_decode(model)
    plain, _, _ = _model("matmul", "float32")
    plain.graph.initializers["fc.weight"].const_value = ir.tensor(np.ascontiguousarray(w_deq.T.astype(np.float32)), name="fc.weight")
    lora_fx.apply(plain, lora)
    stored = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items() if ".weight_" in n}
    mq, mf = trainable_module(model), trainable_module(plain)
    assert set(mq.trainable_names) == set(mf.trainable_names) == {"fc.lora_A.weight", "fc.lora_B.weight"}
    with torch.no_grad():
        for name, p in mf.named_adapters().items():
            p.copy_(mq.named_adapters()[name])
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 5, IN)).astype(np.float32))
    for module in (mq, mf):
        module(x=x)["y"].pow(2).mean().backward()
    for name, p in mq.named_adapters().items():
        assert p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, mf.named_adapters()[name].grad, rtol=1e-4, atol=1e-7)
    assert all(not b.requires_grad for b in mq.buffers())
    assert all(np.array_equal(v.const_value.numpy(), stored[n]) for n, v in model.graph.initializers.items() if n in stored)


def test_a_refused_weight_leaves_the_model_unchanged():
    """Every site is quantized before the graph changes: a NaN in the second site's W refuses the whole call."""
    from tests.passes.onnx.test_quantize_weights import _mlp

    model, _, w2 = _mlp()
    bad = w2.copy()
    bad[5, 6] = np.nan
    model.graph.initializers["fc2.weight"].const_value = ir.tensor(bad, name="fc2.weight")
    before = ir.to_proto(model).SerializeToString()
    for dtype in ("nf4", "int4", "int8"):
        with pytest.raises(ConfigError, match=r"site fc2: 1 of 4096 weights are NaN or infinite.*exclude_modules"):
            quantize_weights(model, QuantConfig(dtype=dtype, target_modules=".*"))
        assert ir.to_proto(model).SerializeToString() == before


def _shared_weight_model() -> tuple[ir.Model, np.ndarray]:
    """Two sites read one initializer: ``a`` through MatMul, ``b`` through Transpose -> MatMul (tied weights)."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((64, 64)) * 0.1).astype(np.float32)  # [in, out] for a; b reads it transposed
    nodes = [helper.make_node("MatMul", ["x", "shared.weight"], ["h"], name="a/MatMul"),
             helper.make_node("Transpose", ["shared.weight"], ["wt"], name="b/Transpose", perm=[1, 0]),
             helper.make_node("MatMul", ["h", "wt"], ["y"], name="b/MatMul")]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])], [numpy_helper.from_array(w, "shared.weight")])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)), w


@pytest.mark.parametrize("dtype", ["nf4", "int4", "int8"])
def test_quantizing_one_reader_of_a_shared_weight_leaves_the_other_reading_it_in_float(dtype):
    x = np.random.default_rng(6).standard_normal((3, 64)).astype(np.float32)
    model, w = _shared_weight_model()
    names = {s.handle.name: s.name for s in lora_fx.find_sites(model) if s.kind.value == "linear"}
    first, second = names["a/MatMul"], names["b/MatMul"]  # named after the weight both read
    assert first != second
    quantize_weights(model, QuantConfig(dtype=dtype, target_modules=[first]))
    assert "shared.weight" in model.graph.initializers  # b still reads it
    np.testing.assert_array_equal(model.graph.initializers["shared.weight"].const_value.numpy(), w)
    after = {s.handle.name: s.name for s in lora_fx.find_sites(model) if s.kind.value == "linear"}
    assert after == names  # both sites keep their names, so adapters and targets still find them
    w_a = _spec_decode(model)  # [out, in] of a
    want = (x @ w_a.T) @ w.T.astype(np.float64)
    got = _session(model).run(None, {"x": x})[0]
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5
    # Both readers quantized: each gets its own storage and the float initializer goes.
    model, w = _shared_weight_model()
    quantize_weights(model, QuantConfig(dtype=dtype, target_modules=[first, second]))
    assert "shared.weight" not in model.graph.initializers
    assert {f"{first}.weight_q", f"{second}.weight_q"} <= set(model.graph.initializers)
    assert np.isfinite(_session(model).run(None, {"x": x})[0]).all()
