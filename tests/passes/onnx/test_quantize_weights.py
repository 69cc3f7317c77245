"""passes/onnx/quantize_weights: MatMul weights to MatMulBnb4 / MatMulNBits / DequantizeLinear, run in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import lora_fx
from lora_fx.config import QuantConfig
from lora_fx.errors import ConfigError
from lora_fx.passes.fx import quantize_weights as fxq
from lora_fx.passes.onnx.quantize_weights import quantize_weights

IN, OUT = 128, 64


def _mlp() -> tuple[ir.Model, np.ndarray, np.ndarray]:
    """x [b, 128] @ W1 [128, 64] + b1 -> Relu -> @ W2 [64, 64] (torch's [in, out] MatMul layout)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((IN, OUT)).astype(np.float32) * 0.1
    w2 = rng.standard_normal((OUT, OUT)).astype(np.float32) * 0.1
    b1 = rng.standard_normal(OUT).astype(np.float32)
    x = ir.Value(name="x", shape=ir.Shape(["batch", IN]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21}, name="mlp")
    inits = {}
    for name, arr in (("fc1.weight", w1), ("fc1.bias", b1), ("fc2.weight", w2)):
        v = ir.Value(name=name, shape=ir.Shape(list(arr.shape)), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.Tensor(arr, name=name))
        graph.register_initializer(v)
        inits[name] = v
    m1 = ir.node("MatMul", [x, inits["fc1.weight"]], name="fc1/MatMul")
    a1 = ir.node("Add", [m1.outputs[0], inits["fc1.bias"]], name="fc1/Add")
    r = ir.node("Relu", [a1.outputs[0]])
    m2 = ir.node("MatMul", [r.outputs[0], inits["fc2.weight"]], name="fc2/MatMul")
    for n in (m1, a1, r, m2):
        graph.append(n)
    m2.outputs[0].name = "y"
    m2.outputs[0].dtype = ir.DataType.FLOAT
    graph.outputs.append(m2.outputs[0])
    return ir.Model(graph, ir_version=10), w1, w2


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _dequantized(cfg: QuantConfig, w: np.ndarray) -> np.ndarray:
    wt = torch.from_numpy(w).t().contiguous()  # [out, in]
    n, k = wt.shape
    if cfg.dtype.value == "nf4":
        s = fxq.quantize_nf4(wt, cfg.block_size)
        d = fxq.dequantize_nf4(s["qweight"], s["qscale"], None, None, n, k, cfg.block_size, 256)
    elif cfg.dtype.value == "int4":
        s = fxq.quantize_int4(wt, cfg.block_size, cfg.symmetric)
        d = fxq.dequantize_int4(s["qweight"], s["qscale"], s.get("qzero"), n, k, cfg.block_size)
    else:
        s = fxq.quantize_int8(wt)
        d = fxq.dequantize_int8(s["qweight"], s["qscale"])
    return d.t().numpy()


@pytest.mark.parametrize("cfg, op, limit", [
    (QuantConfig(dtype="nf4"), "MatMulBnb4", 0.141),
    (QuantConfig(dtype="int4", block_size=32), "MatMulNBits", 0.16),
    (QuantConfig(dtype="int4", block_size=32, symmetric=False), "MatMulNBits", 0.17),
    (QuantConfig(dtype="int8"), "DequantizeLinear", 0.27),
])
def test_quantized_onnx_model_runs_in_ort_like_the_dequantized_weights(cfg, op, limit):
    model, w1, w2 = _mlp()
    before = sum(v.const_value.nbytes for n, v in model.graph.initializers.items() if n.endswith("weight"))
    result = quantize_weights(model, QuantConfig(**{**cfg.to_dict(), "target_modules": ".*"}))
    assert result.modified and len(result.changed) == 2
    assert op in {n.op_type for n in model.graph}
    assert "fc1.weight" not in model.graph.initializers  # the float weight is gone from the file
    after = sum(v.const_value.nbytes for n, v in model.graph.initializers.items() if ".weight_" in n)
    assert after / before <= limit
    sites = {s.name: s for s in lora_fx.find_sites(model) if s.kind.value == "linear"}
    assert {n: (s.in_features, s.out_features) for n, s in sites.items()} == {"fc1": (IN, OUT), "fc2": (OUT, OUT)}
    x = np.random.default_rng(1).standard_normal((3, IN)).astype(np.float32)
    d1, d2 = _dequantized(cfg, w1), _dequantized(cfg, w2)
    b1 = model.graph.initializers["fc1.bias"].const_value.numpy()
    want = np.maximum(x @ d1 + b1, 0) @ d2
    got = _run(model, x)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4
    # Quantization really changed the weights, so the comparison can fail.
    exact = np.maximum(x @ w1 + b1, 0) @ w2
    assert np.abs(exact - want).max() / np.abs(want).max() > 1e-4
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_weights(model, QuantConfig(**{**cfg.to_dict(), "target_modules": ".*"}))


def test_double_quant_is_refused_for_onnx():
    model, _, _ = _mlp()
    with pytest.raises(ConfigError, match="double_quant=False"):
        lora_fx.apply(model, lora_fx.LoraConfig(r=2, target_modules=".*"), quant=QuantConfig(dtype="nf4", double_quant=True))


def test_cli_rewrite_with_quant(tmp_path):
    from lora_fx.cli import main

    model, _, _ = _mlp()
    src, dst = tmp_path / "mlp.onnx", tmp_path / "q.onnx"
    lora_fx.save(model, src)
    assert main(["rewrite", str(src), "-o", str(dst), "--r", "4", "--target-modules", ".*", "--quant", "int4",
                 "--quant-block-size", "32"]) == 0
    out = lora_fx.load(dst)
    ops = [n.op_type for n in out.graph]
    # The default quant targets are all linear sites but the output layer (fc2 here, as find_sites reports it).
    assert ops.count("MatMulNBits") == 1 and "fc1.weight" not in out.graph.initializers and "fc2.weight" in out.graph.initializers
    assert {s.name for s in lora_fx.find_sites(out) if s.kind.value == "linear"} >= {"fc1", "fc2"}
    x = np.random.default_rng(1).standard_normal((3, IN)).astype(np.float32)
    assert np.isfinite(_run(out, x)).all()
