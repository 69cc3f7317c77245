"""fold_lora on quantized (QLoRA) bases: merged W kept in float, or requantized with its error reported."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import lora_fx
from lora_fx.config import QuantConfig
from lora_fx.errors import AdapterError, UnsupportedError
from lora_fx.kernels.quant_formats import NF4_CODE
from lora_fx.passes.onnx.fold_lora import QuantMerge, fold_lora
from tests.passes.onnx.test_quantize_weights import IN, _mlp

DQ_BLOCK = 16  # absmaxes a double-quantization factor: fc1 has 256 blocks of 32 weights, so 16 factors
QUANTS = {
    "nf4": QuantConfig(dtype="nf4", block_size=32, double_quant=False, target_modules=".*"),
    "nf4-dq": QuantConfig(dtype="nf4", block_size=32, double_quant=True, double_quant_block_size=DQ_BLOCK, target_modules=".*"),
    "int4": QuantConfig(dtype="int4", block_size=32, target_modules=".*"),
    "int4-affine": QuantConfig(dtype="int4", block_size=32, symmetric=False, target_modules=".*"),
    "int8": QuantConfig(dtype="int8", target_modules=".*"),
}
QUANT_OPS = {"MatMulBnb4", "MatMulNBits", "DequantizeLinear"}
X = np.random.default_rng(1).standard_normal((3, IN)).astype(np.float32)


def _session(model_or_path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    src = model_or_path if isinstance(model_or_path, str) else ir.to_proto(model_or_path).SerializeToString()
    return ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])


def _run(model) -> np.ndarray:
    return _session(model).run(None, {"x": X})[0]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _copy(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def _qlora(name: str) -> ir.Model:
    """The two-layer MLP with quantized W and random (non-zero) LoRA adapters on both sites."""
    model, _, _ = _mlp()
    torch.manual_seed(0)
    return lora_fx.apply(model, lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=".*", init_lora_weights=False), quant=QUANTS[name])


# ---- an independent decoder of the stored formats (numpy, from the format definitions) -------------
def _nibbles(packed: np.ndarray, high_first: bool) -> np.ndarray:
    packed = packed.reshape(-1).astype(np.int64)
    hi, lo = packed >> 4, packed & 15
    return np.stack([hi, lo] if high_first else [lo, hi], axis=1).reshape(-1)


def _absmax(q: np.ndarray, factor: np.ndarray, mean: np.ndarray, n_blocks: int, dq_block: int) -> np.ndarray:
    """QLoRA's double quantization: absmax = int8 code / the factor of its group of ``dq_block`` + the mean."""
    return q.reshape(-1).astype(np.float64) / np.repeat(factor.reshape(-1).astype(np.float64), dq_block)[:n_blocks] \
        + float(mean.reshape(-1)[0])


def _decode(model: ir.Model, site: str, dq_block: int = DQ_BLOCK) -> np.ndarray:
    """W ``[out, in]`` of ``site`` from its stored initializers (names from quantize_weights; MatMulNBits bits 8
    files of other tools: the node named ``<site>/…``); double-quantized nf4 absmaxes with ``dq_block`` a factor."""
    init = {n: v.const_value.numpy() for n, v in model.graph.initializers.items()}
    node = next(n for n in model.graph if n.op_type in QUANT_OPS and (
        any(v is not None and v.name == f"{site}.weight_q" for v in n.inputs) or (n.name or "").startswith(f"{site}/")))
    if node.op_type == "MatMulNBits" and node.attributes["bits"].value == 8:
        from tests.passes.onnx.test_int8_plain_ort import spec_decode_nbits8

        return spec_decode_nbits8(node)
    q, scale = init[f"{site}.weight_q"], init[f"{site}.weight_scale"].astype(np.float64)
    if node.op_type == "DequantizeLinear":
        return q.astype(np.float64) * scale[:, None]
    n, k, bs = (node.attributes[a].value for a in ("N", "K", "block_size"))
    if node.op_type == "MatMulBnb4":
        if f"{site}.weight_scale_factor" in init:
            scale = _absmax(init[f"{site}.weight_scale"], init[f"{site}.weight_scale_factor"],
                            init[f"{site}.weight_scale_mean"], -(-n * k // bs), dq_block)
        codes = np.asarray(NF4_CODE, np.float64)[_nibbles(q, True)][: n * k]
        return (codes * np.repeat(scale, bs)[: n * k]).reshape(n, k)
    codes = _nibbles(q, False).astype(np.float64)
    zero = _nibbles(init[f"{site}.weight_zero"], False)[: scale.size] if f"{site}.weight_zero" in init else np.full(scale.size, 8)
    return ((codes - np.repeat(zero, bs)) * np.repeat(scale.reshape(-1), bs)).reshape(n, k)


def _merged_float(model: ir.Model, site: str, dq_block: int = DQ_BLOCK) -> np.ndarray:
    a = model.graph.initializers[f"{site}.lora_A.weight"].const_value.numpy().astype(np.float64)
    b = model.graph.initializers[f"{site}.lora_B.weight"].const_value.numpy().astype(np.float64)
    return _decode(model, site, dq_block) + (a @ b).T


def _storage(model: ir.Model) -> dict[str, tuple]:
    return {n: (v.const_value.dtype, tuple(v.const_value.shape), v.const_value.nbytes)
            for n, v in model.graph.initializers.items() if ".weight_" in n}


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph if "lora" not in (n.name or "")]


# ---- FLOAT ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(QUANTS))
def test_float_merge_equals_the_unmerged_qlora_model_in_ort(name):
    lora = _qlora(name)
    want = _run(lora)
    base = _copy(lora)
    for site in ("fc1", "fc2"):  # the adapters matter, so the comparison below can fail
        b = base.graph.initializers[f"{site}.lora_B.weight"]
        b.const_value = ir.tensor(np.zeros_like(b.const_value.numpy()), name=b.name)
    assert _rel(_run(base), want) > 1e-2

    result = fold_lora(lora, QuantMerge.FLOAT)
    assert result.modified and sorted(result.changed) == ["fc1", "fc2"]
    assert [n.op_type for n in lora.graph] == ["MatMul", "Add", "Relu", "MatMul"]  # plain float model, bias kept
    assert not [n for n in lora.graph.initializers if ".weight_" in n or ".lora_" in n]
    assert _rel(_run(lora), want) <= 1e-4


# ---- REQUANTIZE -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(QUANTS))
def test_requantize_keeps_the_format_and_reports_the_error_it_adds(name):
    lora = _qlora(name)
    ops, storage = _ops(lora), _storage(lora)
    merged = {site: _merged_float(lora, site) for site in ("fc1", "fc2")}
    floated = _copy(lora)
    fold_lora(floated, QuantMerge.FLOAT)

    from lora_fx.passes.onnx.fold_lora import FoldLora

    folder = FoldLora(QuantMerge.REQUANTIZE)
    size = sum(v.const_value.nbytes for n, v in lora.graph.initializers.items() if ".lora_" not in n)
    result = folder(lora)
    assert _ops(lora) == ops and _storage(lora) == storage  # same ops, same W bytes (shapes, dtypes)
    assert sum(v.const_value.nbytes for v in lora.graph.initializers.values()) == size
    assert not [n for n in lora.graph.initializers if ".lora_" in n]
    errors = {e.site: e for e in folder.errors}
    assert sorted(errors) == ["fc1", "fc2"]
    for site, w in merged.items():
        deq = _decode(lora, site)
        diff = deq - w
        assert errors[site].max_abs == pytest.approx(np.abs(diff).max(), rel=1e-4, abs=1e-7)
        assert errors[site].relative == pytest.approx(np.linalg.norm(diff) / np.linalg.norm(w), rel=1e-4)
        assert 0 < errors[site].relative < (0.02 if name == "int8" else 0.15)
        assert any(line.startswith(f"{site}: requantized") and "max abs error" in line for line in result.changed)
    # ORT runs exactly the requantized weights, and they stay close to the float merge.
    b1 = lora.graph.initializers["fc1.bias"].const_value.numpy()
    expect = np.maximum(X @ _decode(lora, "fc1").T + b1, 0) @ _decode(lora, "fc2").T
    got = _run(lora)
    assert _rel(got, expect) <= 1e-4
    assert _rel(got, _run(floated)) <= (0.03 if name == "int8" else 0.3)


# ---- refusals ---------------------------------------------------------------------------------------
def test_no_choice_is_refused_and_nothing_changes():
    lora = _qlora("int4")
    before = ir.to_proto(lora).SerializeToString()
    with pytest.raises(UnsupportedError, match=r"site fc1: .*quantized \(MatMulNBits int4.*--float.*--requantize"):
        fold_lora(lora)
    assert ir.to_proto(lora).SerializeToString() == before


@pytest.mark.parametrize("mode", list(QuantMerge))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_adapter_is_refused_before_anything_changes(mode, bad):
    lora = _qlora("nf4")
    b = lora.graph.initializers["fc2.lora_B.weight"]
    arr = b.const_value.numpy().copy()
    arr[0, 0] = bad
    b.const_value = ir.tensor(arr, name=b.name)
    before = ir.to_proto(lora).SerializeToString()
    with pytest.raises(AdapterError, match="site fc2: .*non-finite"):
        fold_lora(lora, mode)
    assert ir.to_proto(lora).SerializeToString() == before


def test_quant_merge_parses_strings_at_the_boundary_only():
    assert QuantMerge.parse("Requantize") is QuantMerge.REQUANTIZE and QuantMerge.parse(None) is None
    with pytest.raises(ValueError, match="'float'.*'requantize'"):
        QuantMerge.parse("int8")


# ---- CLI --------------------------------------------------------------------------------------------
def test_cli_export_merge_quantized(tmp_path, capsys):
    from lora_fx.cli import main

    src = tmp_path / "q.onnx"
    lora = _qlora("int4")
    lora_fx.save(lora, src)
    want = _run(lora)
    merged = {site: _merged_float(lora, site) for site in ("fc1", "fc2")}

    out = tmp_path / "merged.onnx"
    assert main(["export", str(src), "-o", str(out), "--merge"]) != 0
    err = capsys.readouterr().err
    assert "--float" in err and "--requantize" in err and not out.exists()
    assert main(["export", str(src), "-o", str(out), "--adapters", "--float"]) != 0 and not out.exists()
    capsys.readouterr()

    assert main(["export", str(src), "-o", str(out), "--merge", "--float"]) == 0
    assert "requantized" not in capsys.readouterr().out
    assert {n.op_type for n in lora_fx.load(out).graph} == {"MatMul", "Add", "Relu"}
    assert _rel(_session(str(out)).run(None, {"x": X})[0], want) <= 1e-4

    req = tmp_path / "requant.onnx"
    assert main(["export", str(src), "-o", str(req), "--merge", "--requantize"]) == 0
    text = capsys.readouterr().out
    assert "fc1: requantized (MatMulNBits int4, block 32), max abs error" in text and "fc2: requantized" in text
    assert main(["export", str(src), "-o", str(req), "--merge", "--requantize", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["quant_merge"] == "requantize"
    written = lora_fx.load(req)
    assert [n.op_type for n in written.graph].count("MatMulNBits") == 2
    for e in summary["requant_errors"]:
        diff = _decode(written, e["site"]) - merged[e["site"]]
        assert e["max_abs_error"] == pytest.approx(np.abs(diff).max(), rel=1e-4)
        assert e["relative_error"] == pytest.approx(np.linalg.norm(diff) / np.linalg.norm(merged[e["site"]]), rel=1e-4)
    assert sorted(e["site"] for e in summary["requant_errors"]) == ["fc1", "fc2"]


# ---- FX front end: export_onnx(mode="merged", quant_merge=...) of a QLoRA GraphModule -------------------
class _MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(64, 64), torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def captured():
    torch.manual_seed(0)
    kwargs = {"x": torch.randn(2, 3, 64)}
    return lora_fx.capture(_MLP().eval(), kwargs=kwargs), kwargs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nf4", "int4", "int8"])
def test_export_onnx_merged_qlora_graph_module(tmp_path, captured, name):
    import copy

    from lora_fx.export import export_onnx

    gm0, kwargs = captured
    torch.manual_seed(1)
    gm = lora_fx.apply(copy.deepcopy(gm0), lora_fx.LoraConfig(r=4, target_modules=".*", init_lora_weights=False), quant=QUANTS[name])
    with torch.no_grad():
        want = gm(**kwargs)
    want = (want[0] if isinstance(want, (tuple, list)) else want).numpy()
    feeds = {"x": kwargs["x"].numpy()}

    refused = tmp_path / "refused.onnx"
    with pytest.raises(UnsupportedError, match="--float.*--requantize"):
        export_onnx(gm, refused, kwargs=kwargs, mode="merged")
    assert not refused.exists()

    path = tmp_path / "float.onnx"
    result = export_onnx(gm, path, kwargs=kwargs, mode="merged", quant_merge=QuantMerge.FLOAT)
    assert not result.requant_errors
    assert not {n.op_type for n in lora_fx.load(path).graph} & QUANT_OPS
    assert _rel(_session(str(path)).run(None, feeds)[0], want) <= 1e-4

    path = tmp_path / "requant.onnx"
    result = export_onnx(gm, path, kwargs=kwargs, mode="merged", quant_merge="requantize")
    assert sorted(e.site for e in result.requant_errors) == ["fc1", "fc2"]
    assert {"nf4": "MatMulBnb4", "int4": "MatMulNBits", "int8": "DequantizeLinear"}[name] in {n.op_type for n in lora_fx.load(path).graph}
    got = _session(str(path)).run(None, feeds)[0]
    assert _rel(got, want) <= (0.03 if name == "int8" else 0.3)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_cli_rewrite_quant_then_merge(tmp_path, capsys, quant):
    """lora-fx rewrite --quant (both layers: fc2 reaches the output but is no vocabulary projection, so it is
    quantized as on the FX side) then export --merge --float/--requantize."""
    from lora_fx.cli import main

    base, _, _ = _mlp()
    src, q = tmp_path / "mlp.onnx", tmp_path / "q.onnx"
    lora_fx.save(base, src)
    assert main(["rewrite", str(src), "-o", str(q), "--r", "4", "--target-modules", ".*", "--init", "random",
                 "--quant", quant, *(["--quant-block-size", "32"] if quant == "nf4" else [])]) == 0  # int8: per channel
    want = _session(str(q)).run(None, {"x": X})[0]
    op = {"nf4": "MatMulBnb4", "int8": "DequantizeLinear"}[quant]
    assert op in {n.op_type for n in lora_fx.load(q).graph}
    capsys.readouterr()
    out = tmp_path / "float.onnx"
    assert main(["export", str(q), "-o", str(out), "--merge", "--float"]) == 0
    assert not {n.op_type for n in lora_fx.load(out).graph} & QUANT_OPS
    assert _rel(_session(str(out)).run(None, {"x": X})[0], want) <= 1e-4
    capsys.readouterr()
    req = tmp_path / "requant.onnx"
    assert main(["export", str(q), "-o", str(req), "--merge", "--requantize", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [e["site"] for e in summary["requant_errors"]] == ["fc1", "fc2"]
    assert op in {n.op_type for n in lora_fx.load(req).graph}


# ---- double quantization survives requantization, on both routes -----------------------------------------
def _dq_storage(model: ir.Model, names: dict[str, str]) -> dict[str, tuple]:
    init = model.graph.initializers
    return {key: (init[name].const_value.dtype, tuple(init[name].const_value.shape), init[name].const_value.nbytes)
            for key, name in names.items()}


def test_cli_rewrite_double_quant_then_merge_requantize_keeps_double_quantization(tmp_path, capsys):
    """lora-fx rewrite --quant nf4 --double-quant, export --merge --requantize: int8 absmaxes, one factor per 256
    (the default) and their mean, decoded in front of MatMulBnb4, as in the source; the file no larger."""
    from lora_fx.cli import main

    base, _, _ = _mlp()
    src, q, req = tmp_path / "mlp.onnx", tmp_path / "q.onnx", tmp_path / "requant.onnx"
    lora_fx.save(base, src)
    assert main(["rewrite", str(src), "-o", str(q), "--r", "4", "--target-modules", ".*", "--init", "random",
                 "--quant", "nf4", "--double-quant", "--quant-block-size", "32"]) == 0
    source = lora_fx.load(q)
    names = {f"{site}.{suffix}": f"{site}.weight_{suffix}" for site in ("fc1", "fc2") for suffix in ("q", "scale", "scale_factor", "scale_mean")}
    storage = _dq_storage(source, names)
    assert storage["fc1.scale"][0] == ir.DataType.INT8 and storage["fc1.scale_factor"][1] == (1,)
    merged = {site: _merged_float(source, site, 256) for site in ("fc1", "fc2")}
    for site in merged:  # the reference decoder reads the source as ORT does, so it can judge the requantized file
        b = source.graph.initializers[f"{site}.lora_B.weight"]
        b.const_value = ir.tensor(np.zeros_like(b.const_value.numpy()), name=b.name)
    b1 = source.graph.initializers["fc1.bias"].const_value.numpy()
    assert _rel(_run(source), np.maximum(X @ _decode(source, "fc1", 256).T + b1, 0) @ _decode(source, "fc2", 256).T) <= 1e-4
    capsys.readouterr()

    assert main(["export", str(q), "-o", str(req), "--merge", "--requantize", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    written = lora_fx.load(req)
    assert _dq_storage(written, names) == storage
    assert _ops(written) == _ops(source)  # the decode nodes, MatMulBnb4, bias Add, Relu
    assert sum(v[2] for v in _dq_storage(written, names).values()) == sum(v[2] for v in storage.values())
    # The optimizer export runs shares the equal shape constants of the two decodes: a few bytes fewer, never more.
    assert sum(v.const_value.nbytes for v in written.graph.initializers.values()) <= sum(
        v.const_value.nbytes for n, v in source.graph.initializers.items() if ".lora_" not in n)
    errors = {e["site"]: e for e in summary["requant_errors"]}
    for site, w in merged.items():
        diff = _decode(written, site, 256) - w
        assert errors[site]["max_abs_error"] == pytest.approx(np.abs(diff).max(), rel=1e-4)
        assert errors[site]["relative_error"] == pytest.approx(np.linalg.norm(diff) / np.linalg.norm(w), rel=1e-4)
        assert 0 < errors[site]["relative_error"] < 0.15
    expect = np.maximum(X @ _decode(written, "fc1", 256).T + b1, 0) @ _decode(written, "fc2", 256).T
    got = _session(str(req)).run(None, {"x": X})[0]
    assert _rel(got, expect) <= 1e-4
    floated = np.maximum(X @ merged["fc1"].T + b1, 0) @ merged["fc2"].T
    assert _rel(got, floated) <= 0.3


def test_export_onnx_merged_requantize_of_a_double_quantized_graph_module_keeps_double_quantization(tmp_path, captured):
    """The FX route: the file holds the GraphModule's storage, requantized in its own shapes and dtypes (int8
    absmaxes, DQ_BLOCK to a factor), and ONNX Runtime computes x times the spec-decoded requantized W."""
    import copy

    from lora_fx.export import export_onnx

    gm0, kwargs = captured
    torch.manual_seed(1)
    gm = lora_fx.apply(copy.deepcopy(gm0), lora_fx.LoraConfig(r=4, target_modules=".*", init_lora_weights=False),
                       quant=QUANTS["nf4-dq"])
    buffers = {name: buf for name, buf in gm.named_buffers() if name.split(".")[-1].startswith("q")}
    assert sorted(buffers) == sorted(f"{s}.{k}" for s in ("fc1", "fc2") for k in ("qweight", "qscale", "qscale_factor", "qscale_mean"))
    feeds = {"x": kwargs["x"].numpy()}

    floated = tmp_path / "float.onnx"
    export_onnx(gm, floated, kwargs=kwargs, mode="merged", quant_merge=QuantMerge.FLOAT)
    float_model = lora_fx.load(floated)
    merged = {site: float_model.graph.initializers[f"{site}.weight"].const_value.numpy().T.astype(np.float64)
              for site in ("fc1", "fc2")}

    path = tmp_path / "requant.onnx"
    result = export_onnx(gm, path, kwargs=kwargs, mode="merged", quant_merge="requantize")
    model = lora_fx.load(path)
    init = {n: v.const_value.numpy() for n, v in model.graph.initializers.items()}
    for name, buf in buffers.items():
        assert (init[name].dtype, init[name].shape) == (buf.numpy().dtype, tuple(buf.shape)), name
    assert sum(init[name].nbytes for name in buffers) == sum(buf.numpy().nbytes for buf in buffers.values())
    assert {n.op_type for n in model.graph} >= {"MatMulBnb4", "Cast", "Div", "Expand"}
    errors = {e.site: e for e in result.requant_errors}
    decoded = {}
    for site, w in merged.items():
        n, k = w.shape
        absmax = _absmax(init[f"{site}.qscale"], init[f"{site}.qscale_factor"], init[f"{site}.qscale_mean"], n * k // 32, DQ_BLOCK)
        codes = np.asarray(NF4_CODE, np.float64)[_nibbles(init[f"{site}.qweight"], True)][: n * k]
        decoded[site] = (codes * np.repeat(absmax, 32)[: n * k]).reshape(n, k)
        diff = decoded[site] - w
        assert errors[site].max_abs == pytest.approx(np.abs(diff).max(), rel=1e-4, abs=1e-7)
        assert errors[site].relative == pytest.approx(np.linalg.norm(diff) / np.linalg.norm(w), rel=1e-4)
        assert "double quant block 16" in errors[site].format
    x = feeds["x"].astype(np.float64)
    b1, b2 = init["fc1.bias"], init["fc2.bias"]
    got = _session(str(path)).run(None, feeds)[0]
    assert _rel(got, np.maximum(x @ decoded["fc1"].T + b1, 0) @ decoded["fc2"].T + b2) <= 1e-4
    assert _rel(got, _session(str(floated)).run(None, feeds)[0]) <= 0.3


# ---- padded int4 rows, float16 bases, sites without an adapter -------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("fmt", ["int4-affine", "nf4-dq", "int8"])
def test_merges_of_padded_and_half_precision_storage_follow_the_spec_decoded_weight(fmt, dtype):
    """K = 72 with blocks of 32: MatMulNBits rows of 3 blocks (padded, a padding nibble in each row's zero points).
    FLOAT gives W_deq + A @ B; REQUANTIZE stores it again in the same shapes, reporting the error it adds."""
    from lora_fx.passes.onnx.fold_lora import FoldLora
    from tests.passes.onnx.test_quantize_weights_parity import DTYPES, FORMATS, _model, _session, _spec_decode

    def qlora() -> ir.Model:
        model, _, _ = _model("matmul", dtype)
        torch.manual_seed(0)
        return lora_fx.apply(model, lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=["fc"], init_lora_weights=False),
                             quant=QuantConfig(**{**FORMATS[fmt].to_dict(), "target_modules": ".*"}))

    lora = qlora()
    a = lora.graph.initializers["fc.lora_A.weight"].const_value.numpy().astype(np.float64)
    b = lora.graph.initializers["fc.lora_B.weight"].const_value.numpy().astype(np.float64)
    bias = lora.graph.initializers["fc.bias"].const_value.numpy().astype(np.float64)
    merged = _spec_decode(lora) + (a @ b).T
    x = np.random.default_rng(3).standard_normal((2, 3, 72)).astype(DTYPES[dtype][0])
    tol = 1e-5 if dtype == "float32" else 4e-3
    want = x.astype(np.float64) @ merged.T + bias
    assert _rel(_session(lora).run(None, {"x": x})[0], want) <= tol  # the unmerged QLoRA model

    floated = qlora()
    fold_lora(floated, QuantMerge.FLOAT)
    w = floated.graph.initializers["fc.weight"].const_value.numpy()
    assert w.dtype == DTYPES[dtype][0] and w.shape == (72, 20)
    # W_deq + A @ B, rounded once to the model's dtype (float32 decoding, so a float32 rounding or two apart).
    np.testing.assert_allclose(w.astype(np.float64), merged.T, rtol=1e-5 if dtype == "float32" else 1e-3, atol=1e-7)
    assert _rel(_session(floated).run(None, {"x": x})[0], want) <= tol

    storage = _storage(lora)
    folder = FoldLora(QuantMerge.REQUANTIZE)
    folder(lora)
    assert _storage(lora) == storage  # nf4-dq: int8 absmaxes, factors and mean, as the source had them
    requant = _spec_decode(lora)
    (error,) = folder.errors
    diff = requant - merged.astype(DTYPES[dtype][0]).astype(np.float64)
    assert error.max_abs == pytest.approx(np.abs(diff).max(), rel=1e-3, abs=1e-6)
    assert 0 < error.relative < (0.02 if fmt == "int8" else 0.15)
    assert _rel(_session(lora).run(None, {"x": x})[0], x.astype(np.float64) @ requant.T + bias) <= tol


@pytest.mark.parametrize("name", list(QUANTS))
@pytest.mark.parametrize("mode", list(QuantMerge))
def test_a_quantized_site_without_adapter_stays_byte_identical(name, mode):
    model, _, _ = _mlp()
    torch.manual_seed(0)
    lora_fx.apply(model, lora_fx.LoraConfig(r=4, target_modules=["fc1"], init_lora_weights=False), quant=QUANTS[name])
    fc2 = {n: v.const_value.tobytes() for n, v in model.graph.initializers.items() if n.startswith("fc2.")}
    assert fc2
    fold_lora(model, mode)
    assert {n: v.const_value.tobytes() for n, v in model.graph.initializers.items() if n.startswith("fc2.")} == fc2


# ---- int8 in MatMulNBits bits 8, as other tools write it (ONNX Runtime's MatMulNBitsQuantizer) ---------------
@pytest.mark.parametrize("block_size", [32, 128])
def test_another_tool_s_int8_matmul_nbits_file_is_folded_to_float_or_requantized_in_its_own_layout(block_size):
    """Blocks of 32: a scale per block, requantized per block; 128: one block (one scale) a row, requantized
    per row, fc2's K = 64 padded. FLOAT gives W_deq + A @ B; REQUANTIZE keeps op, shapes and bytes."""
    from lora_fx.passes.onnx.quantized_weight import quantized_weight
    from tests.passes.onnx.test_int8_plain_ort import ort_int8_mlp

    model = ort_int8_mlp(block_size)
    sites = {s.name: s for s in lora_fx.find_sites(model) if s.kind.value == "linear"}
    assert {n: (s.in_features, s.out_features, s.has_bias) for n, s in sites.items()} == {"fc1": (IN, 64, True), "fc2": (64, 64, False)}
    assert quantized_weight("fc1", sites["fc1"].handle).describe() == f"MatMulNBits int8, block {block_size}"
    torch.manual_seed(0)
    lora_fx.apply(model, lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=".*", init_lora_weights=False))
    want = _run(model)
    merged = {site: _merged_float(model, site) for site in ("fc1", "fc2")}
    b1 = model.graph.initializers["fc1.bias"].const_value.numpy()
    assert _rel(want, np.maximum(X @ merged["fc1"].T + b1, 0) @ merged["fc2"].T) <= 1e-5

    floated = _copy(model)
    fold_lora(floated, QuantMerge.FLOAT)
    assert [n.op_type for n in floated.graph] == ["MatMul", "Add", "Relu", "MatMul"]
    assert _rel(_run(floated), want) <= 1e-4

    ops, storage = _ops(model), _storage(model)
    result = fold_lora(model, QuantMerge.REQUANTIZE)
    assert f"fc1: requantized (MatMulNBits int8, block {block_size}), max abs error" in "\n".join(result.changed)
    assert _ops(model) == ops and _storage(model) == storage
    for site, w in merged.items():
        assert 0 < np.abs(_decode(model, site) - w).max() <= np.abs(w).max() * 0.01
    fc1 = next(n for n in model.graph if n.op_type == "MatMulNBits" and n.name.startswith("fc1/"))
    scales = fc1.inputs[2].const_value.numpy().reshape(64, -1)
    assert scales.shape[1] == IN // block_size and (block_size == 128 or not np.all(scales == scales[:, :1]))
    expect = np.maximum(X @ _decode(model, "fc1").T + b1, 0) @ _decode(model, "fc2").T
    assert _rel(_run(model), expect) <= 1e-5
