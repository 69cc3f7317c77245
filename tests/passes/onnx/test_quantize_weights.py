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
from lora_fx.kernels import quant_formats as formats
from lora_fx.passes.onnx.quantize_weights import quantize_weights

IN, OUT = 128, 64


def _mlp(dtype: type = np.float32, opset: int = 21) -> tuple[ir.Model, np.ndarray, np.ndarray]:
    """x [b, 128] @ W1 [128, 64] + b1 -> Relu -> @ W2 [64, 64] (torch's [in, out] MatMul layout), in ``dtype``,
    importing ``opset`` of the default domain."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((IN, OUT)) * 0.1).astype(dtype)
    w2 = (rng.standard_normal((OUT, OUT)) * 0.1).astype(dtype)
    b1 = rng.standard_normal(OUT).astype(dtype)
    float_type = ir.DataType.from_numpy(np.dtype(dtype))
    x = ir.Value(name="x", shape=ir.Shape(["batch", IN]), type=ir.TensorType(float_type))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": opset}, name="mlp")
    inits = {}
    for name, arr in (("fc1.weight", w1), ("fc1.bias", b1), ("fc2.weight", w2)):
        v = ir.Value(name=name, shape=ir.Shape(list(arr.shape)), type=ir.TensorType(float_type), const_value=ir.Tensor(arr, name=name))
        graph.register_initializer(v)
        inits[name] = v
    m1 = ir.node("MatMul", [x, inits["fc1.weight"]], name="fc1/MatMul")
    a1 = ir.node("Add", [m1.outputs[0], inits["fc1.bias"]], name="fc1/Add")
    r = ir.node("Relu", [a1.outputs[0]])
    m2 = ir.node("MatMul", [r.outputs[0], inits["fc2.weight"]], name="fc2/MatMul")
    for n in (m1, a1, r, m2):
        graph.append(n)
    m2.outputs[0].name = "y"
    m2.outputs[0].dtype = float_type
    m2.outputs[0].shape = ir.Shape(["batch", OUT])  # a graph output's type has a shape (onnx.checker)
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
        s = formats.quantize_nf4(wt, cfg.block_size, cfg.double_quant, cfg.double_quant_block_size)
        d = formats.dequantize_nf4(s["qweight"], s["qscale"], s.get("qscale_factor"), s.get("qscale_mean"), n, k,
                               cfg.block_size, cfg.double_quant_block_size)
    elif cfg.dtype.value == "int4":
        s = formats.quantize_int4(wt, cfg.block_size, cfg.symmetric)
        d = formats.dequantize_int4(s["qweight"], s["qscale"], s.get("qzero"), n, k, cfg.block_size)
    else:
        s = formats.quantize_int8(wt)
        d = formats.dequantize_int8(s["qweight"], s["qscale"])
    return d.t().numpy()


@pytest.mark.parametrize("cfg, op, limit", [
    (QuantConfig(dtype="nf4"), "MatMulBnb4", 0.141),
    # Double quantization: absmaxes stored int8 (one float factor per 256 blocks), decoded in the graph.
    (QuantConfig(dtype="nf4", double_quant=True), "MatMulBnb4", 0.13),
    (QuantConfig(dtype="nf4", double_quant=True, double_quant_block_size=16), "MatMulBnb4", 0.131),
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
    # The site keeps its shape and its bias, whatever op now holds the weight (as through FX).
    sites = {s.name: s for s in lora_fx.find_sites(model) if s.kind.value == "linear"}
    assert {n: (s.in_features, s.out_features, s.has_bias) for n, s in sites.items()} == {"fc1": (IN, OUT, True), "fc2": (OUT, OUT, False)}
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


def test_double_quantized_onnx_model_takes_lora_and_merges(tmp_path):
    """A double-quantized base through lora_fx.apply, saved and reloaded, folds like any quantized base."""
    from lora_fx.passes.onnx.fold_lora import FoldLora, QuantMerge, fold_lora

    model, _, _ = _mlp()
    torch.manual_seed(0)  # the random adapter: without a seed the bound below depends on which tests ran first
    lora_fx.apply(model, lora_fx.LoraConfig(r=2, target_modules=["fc1", "fc2"], init_lora_weights=False),
                  quant=QuantConfig(dtype="nf4", double_quant=True, target_modules=".*"))
    path = lora_fx.save(model, tmp_path / "qlora.onnx")
    x = np.random.default_rng(2).standard_normal((3, IN)).astype(np.float32)
    want = _run(lora_fx.load(path), x)
    merged = fold_lora(lora_fx.load(path), QuantMerge.FLOAT).model
    assert "MatMulBnb4" not in {n.op_type for n in merged.graph}
    assert np.abs(_run(merged, x) - want).max() / np.abs(want).max() <= 1e-5
    # Requantized: still MatMulBnb4 (absmaxes then plain float), the error it adds reported per site and
    # the outputs as close to the float merge as test_fold_lora_quantized asks of NF4 on these tiny weights.
    folder = FoldLora(QuantMerge.REQUANTIZE)
    requant = folder(lora_fx.load(path)).model
    assert [n.op_type for n in requant.graph].count("MatMulBnb4") == 2
    assert sorted(e.site for e in folder.errors) == ["fc1", "fc2"] and all(0 < e.relative < 0.15 for e in folder.errors)
    assert np.abs(_run(requant, x) - want).max() / np.abs(want).max() <= 0.3


def test_cli_rewrite_with_double_quantized_nf4(tmp_path):
    from lora_fx.cli import main

    model, _, _ = _mlp()
    src, dst = tmp_path / "mlp.onnx", tmp_path / "q.onnx"
    lora_fx.save(model, src)
    assert main(["rewrite", str(src), "-o", str(dst), "--r", "4", "--target-modules", ".*", "--quant", "nf4",
                 "--double-quant", "--quant-block-size", "32"]) == 0
    out = lora_fx.load(dst)
    assert out.graph.initializers["fc1.weight_scale"].const_value.dtype == ir.DataType.INT8
    x = np.random.default_rng(1).standard_normal((3, IN)).astype(np.float32)
    assert np.isfinite(_run(out, x)).all()


def test_cli_rewrite_with_quant(tmp_path):
    from lora_fx.cli import main

    model, _, _ = _mlp()
    src, dst = tmp_path / "mlp.onnx", tmp_path / "q.onnx"
    lora_fx.save(model, src)
    assert main(["rewrite", str(src), "-o", str(dst), "--r", "4", "--target-modules", ".*", "--quant", "int4",
                 "--quant-block-size", "32"]) == 0
    out = lora_fx.load(dst)
    ops = [n.op_type for n in out.graph]
    # The default quant targets are all linear sites but the output layer, the vocabulary projection (lm_head):
    # this MLP has none, so fc2 is quantized too, as the FX side does for a module without output embeddings.
    assert ops.count("MatMulNBits") == 2 and not {"fc1.weight", "fc2.weight"} & set(out.graph.initializers)
    assert {s.name for s in lora_fx.find_sites(out) if s.kind.value == "linear"} >= {"fc1", "fc2"}
    x = np.random.default_rng(1).standard_normal((3, IN)).astype(np.float32)
    assert np.isfinite(_run(out, x)).all()


def _gemm_mlp(beta: float = 1.0) -> tuple[ir.Model, np.ndarray, np.ndarray, np.ndarray]:
    """x [b, 128] -> Gemm(W1 [64, 128], b1, transB=1) -> Relu -> Gemm(W2 [64, 64], alpha=0.5): the nn.Linear and
    plain-matmul forms torch's exporter and others write; returns the model and W1, W2 in [in, out], b1."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((OUT, IN)).astype(np.float32) * 0.1  # [out, in]
    w2 = rng.standard_normal((OUT, OUT)).astype(np.float32) * 0.1  # [in, out]
    b1 = rng.standard_normal(OUT).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], name="fc1/Gemm", transB=1, beta=beta),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "fc2.weight"], ["y"], name="fc2/Gemm", alpha=0.5)]
    graph = helper.make_graph(nodes, "gemm_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT])],
                              [numpy_helper.from_array(v, n) for n, v in (("fc1.weight", w1), ("fc1.bias", b1), ("fc2.weight", w2))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return ir.serde.deserialize_model(proto), np.ascontiguousarray(w1.T), w2, b1


@pytest.mark.parametrize("cfg, op", [(QuantConfig(dtype="nf4"), "MatMulBnb4"), (QuantConfig(dtype="int4", block_size=32), "MatMulNBits"),
                                     (QuantConfig(dtype="int8"), "DequantizeLinear")])
def test_gemm_sites_quantize_with_bias_and_alpha_and_take_lora(cfg, op, tmp_path):
    model, w1, w2, b1 = _gemm_mlp()
    result = quantize_weights(model, QuantConfig(**{**cfg.to_dict(), "target_modules": ".*"}))
    assert len(result.changed) == 2 and "Gemm" not in {n.op_type for n in model.graph} and op in {n.op_type for n in model.graph}
    sites = {s.name: s for s in lora_fx.find_sites(model) if s.kind.value == "linear"}
    assert {n: (s.in_features, s.out_features, s.has_bias) for n, s in sites.items()} == {"fc1": (IN, OUT, True), "fc2": (OUT, OUT, False)}
    x = np.random.default_rng(1).standard_normal((3, IN)).astype(np.float32)
    want = np.maximum(x @ _dequantized(cfg, w1) + b1, 0) @ _dequantized(cfg, w2 * 0.5)
    got = _run(model, x)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4
    exact = np.maximum(x @ w1 + b1, 0) @ w2 * 0.5
    assert np.abs(exact - want).max() / np.abs(want).max() > 1e-4  # quantization did change the weights
    # The quantized sites take LoRA like any other: with B = 0 the outputs stay those of the quantized model.
    lora_fx.apply(model, lora_fx.LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    np.testing.assert_allclose(_run(model, x), got, rtol=1e-6, atol=1e-6)


def test_gemm_with_a_scaled_bias_is_refused_before_anything_changes():
    model, *_ = _gemm_mlp(beta=2.0)
    before = [n.op_type for n in model.graph]
    with pytest.raises(lora_fx.errors.UnsupportedError, match=r"site fc1: quantize_weights handles Gemm with beta = 1 only.*exclude_modules"):
        quantize_weights(model, QuantConfig(dtype="int8", target_modules=["fc1"]))
    assert [n.op_type for n in model.graph] == before


def _stored_int8_weight(model: ir.Model, site: str, dtype: type) -> np.ndarray:
    """W [in, out] as the file holds it: the stored int8 codes times their per-output-channel scales, in the model's type
    (read from the initializers, not from lora_fx's decoder)."""
    q = model.graph.initializers[f"{site}.weight_q"].const_value.numpy().astype(np.float64)
    scale = model.graph.initializers[f"{site}.weight_scale"].const_value.numpy().astype(np.float64)
    return (q * scale[:, None]).astype(dtype).T


# DequantizeLinear takes a per-channel axis from opset 13 and a float16 scale from opset 19; CastLike exists from 15.
INT8_FORMS = [(np.float16, 13), (np.float16, 14), (np.float16, 17), (np.float16, 19), (np.float16, 21), (np.float32, 13)]


@pytest.mark.parametrize("dtype, opset", INT8_FORMS, ids=[f"{np.dtype(d).name}-opset{o}" for d, o in INT8_FORMS])
def test_int8_writes_valid_onnx_at_the_model_s_opset_and_runs_like_its_stored_weights(dtype, opset):
    """Below opset 19 a float16 model's int8 scales are stored float32 and W is cast back to float16 (DequantizeLinear
    takes no float16 scale there): the file passes onnx.checker, and ONNX Runtime and lora_fx's torch runtime compute
    x times the weights the file stores."""
    import onnx

    from lora_fx.runtime.onnx_torch import OnnxModule

    model, w1, w2 = _mlp(dtype, opset)
    quantize_weights(model, QuantConfig(dtype="int8", target_modules=".*"))
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    narrow = dtype is np.float16 and opset < 19
    scale_type = np.float32 if narrow else dtype
    assert {model.graph.initializers[f"{s}.weight_scale"].const_value.numpy().dtype for s in ("fc1", "fc2")} == {np.dtype(scale_type)}
    casts = [n.op_type for n in model.graph if n.op_type in ("Cast", "CastLike")]
    assert casts == ([] if not narrow else ["CastLike" if opset >= 15 else "Cast"] * 2)
    d1, d2 = _stored_int8_weight(model, "fc1", dtype), _stored_int8_weight(model, "fc2", dtype)
    assert np.abs(d1.astype(np.float64) - w1).max() > 1e-4  # quantized for real, so the comparisons can fail
    x = np.random.default_rng(1).standard_normal((3, IN)).astype(dtype)
    b1 = model.graph.initializers["fc1.bias"].const_value.numpy().astype(np.float64)
    want = np.maximum(x.astype(np.float64) @ d1 + b1, 0) @ d2.astype(np.float64)
    tol = 4e-3 if dtype is np.float16 else 1e-5
    got = _run(model, x)
    assert got.dtype == dtype and np.abs(got - want).max() / np.abs(want).max() <= tol
    module = OnnxModule(model, trainable=[])
    assert len(module.int8_linears.matched) == 2 and not module.int8_linears.refused  # fused: no float W kept
    ours = module(x=torch.from_numpy(x))["y"].double().numpy()
    assert np.abs(ours - want).max() / np.abs(want).max() <= tol


@pytest.mark.parametrize("opset", [14, 17, 21])
def test_float16_int8_trains_and_merges(opset, tmp_path):
    """The cast int8 form (Cast at opset 14, CastLike at 17) takes LoRA as the float16-scale form (21) does: the
    adapters' gradients are those of the float model holding the stored weights, a float merge computes what the
    adapted file computed (in float16, though fc2's input, a Relu's output, has no recorded type), and a requantizing
    merge keeps the form (float32 scales below opset 19) and stays valid ONNX."""
    import onnx

    from lora_fx.passes.onnx.fold_lora import FoldLora, QuantMerge, fold_lora
    from lora_fx.runtime.onnx_torch import trainable_module

    lora = lora_fx.LoraConfig(r=2, target_modules=["fc1", "fc2"], init_lora_weights=False)
    model, _, _ = _mlp(np.float16, opset)
    torch.manual_seed(0)
    lora_fx.apply(model, lora, quant=QuantConfig(dtype="int8", target_modules=".*"))
    path = lora_fx.save(model, tmp_path / "qlora.onnx")
    onnx.checker.check_model(onnx.load(path), full_check=True)
    plain, _, _ = _mlp(np.float16, opset)
    for site in ("fc1", "fc2"):
        w = np.ascontiguousarray(_stored_int8_weight(model, site, np.float16))
        plain.graph.initializers[f"{site}.weight"].const_value = ir.tensor(w, name=f"{site}.weight")
    lora_fx.apply(plain, lora)
    mq, mf = trainable_module(lora_fx.load(path)), trainable_module(plain)
    assert len(mq.int8_linears.matched) == 2
    with torch.no_grad():
        for name, p in mf.named_adapters().items():
            p.copy_(mq.named_adapters()[name])
    x = np.random.default_rng(2).standard_normal((3, IN)).astype(np.float16)
    for module in (mq, mf):
        module(x=torch.from_numpy(x))["y"].float().pow(2).mean().backward()
    for name, p in mq.named_adapters().items():
        assert p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, mf.named_adapters()[name].grad, rtol=2e-2, atol=1e-4)
    want = _run(lora_fx.load(path), x).astype(np.float64)
    merged = fold_lora(lora_fx.load(path), QuantMerge.FLOAT).model
    assert "DequantizeLinear" not in {n.op_type for n in merged.graph}
    assert np.abs(_run(merged, x) - want).max() / np.abs(want).max() <= 4e-3
    folder = FoldLora(QuantMerge.REQUANTIZE)
    requant = folder(lora_fx.load(path)).model
    onnx.checker.check_model(ir.to_proto(requant), full_check=True)
    assert [n.op_type for n in requant.graph].count("DequantizeLinear") == 2
    scale_type = ir.DataType.FLOAT if opset < 19 else ir.DataType.FLOAT16
    assert {requant.graph.initializers[f"{s}.weight_scale"].const_value.dtype for s in ("fc1", "fc2")} == {scale_type}
    assert sorted(e.site for e in folder.errors) == ["fc1", "fc2"] and all(0 < e.relative < 0.05 for e in folder.errors)
    assert np.abs(_run(requant, x) - want).max() / np.abs(want).max() <= 0.05


def test_int8_below_opset_13_is_refused_with_the_way_out_before_anything_changes(tmp_path):
    """DequantizeLinear's per-channel axis is opset 13: an opset-12 model is refused (naming its opset, nf4/int4 and
    re-exporting), left as it was, and nf4 and int4, com.microsoft ops, quantize it into a valid file."""
    import onnx

    from lora_fx.errors import UnsupportedError

    model, _, _ = _mlp(np.float32, 12)
    before = [(n.op_type, [v.name for v in n.inputs]) for n in model.graph]
    with pytest.raises(UnsupportedError, match=r"opset 13; this model imports opset 12 .*nf4 or int4.*opset 13 or later"):
        lora_fx.apply(model, lora_fx.LoraConfig(r=2, target_modules=["fc1"]), quant=QuantConfig(dtype="int8", target_modules=".*"))
    assert [(n.op_type, [v.name for v in n.inputs]) for n in model.graph] == before
    assert {"fc1.weight", "fc2.weight"} <= set(model.graph.initializers)
    x = np.random.default_rng(1).standard_normal((3, IN)).astype(np.float32)
    for cfg in (QuantConfig(dtype="nf4"), QuantConfig(dtype="int4", block_size=32)):
        model, w1, w2 = _mlp(np.float32, 12)
        quantize_weights(model, QuantConfig(**{**cfg.to_dict(), "target_modules": ".*"}))
        onnx.checker.check_model(ir.to_proto(model), full_check=True)
        b1 = model.graph.initializers["fc1.bias"].const_value.numpy()
        want = np.maximum(x @ _dequantized(cfg, w1) + b1, 0) @ _dequantized(cfg, w2)
        assert np.abs(_run(model, x) - want).max() / np.abs(want).max() <= 1e-4


def test_cli_rewrite_int8_of_an_opset_12_file_fails_and_writes_nothing(tmp_path, capsys):
    from lora_fx.cli import main

    model, _, _ = _mlp(np.float32, 12)
    src, dst = tmp_path / "mlp.onnx", tmp_path / "q.onnx"
    lora_fx.save(model, src)
    assert main(["rewrite", str(src), "-o", str(dst), "--target-modules", ".*", "--quant", "int8"]) != 0
    assert "opset 12" in capsys.readouterr().err and not dst.exists()
