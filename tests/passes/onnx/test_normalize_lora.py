"""normalize_lora: the exporter's LoRA branch (Transpose/Gemm, Mul by the scale) becomes the contract layout."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from lora_fx.errors import UnsupportedError
from lora_fx.passes.onnx.lora_layout import find_branch, read_records
from lora_fx.passes.onnx.normalize_lora import normalize_lora
from tests.exported import TMP, ort_run, rel

RNG = np.random.default_rng(0)
IN, OUT, R, SCALE = 8, 6, 3, 2.5


def _exported_style(path, gemm: bool, scale_first: bool = False) -> dict:
    """y = x W^T + b, plus s * ((x A^T) B^T) written as the dynamo exporter writes it (optimize=False)."""
    w = lambda *s: RNG.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(w(OUT, IN), "lin.weight"), numpy_helper.from_array(w(OUT), "lin.bias"),
             numpy_helper.from_array(w(R, IN), "lin.lora_A.weight"), numpy_helper.from_array(w(OUT, R), "lin.lora_B.weight"),
             numpy_helper.from_array(np.array(SCALE, np.float32), "scale")]
    nodes = [helper.make_node("Transpose", ["lin.weight"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["xw"]), helper.make_node("Add", ["xw", "lin.bias"], ["y"])]
    if gemm:
        nodes += [helper.make_node("Gemm", ["x", "lin.lora_A.weight"], ["h"], transB=1),
                  helper.make_node("Gemm", ["h", "lin.lora_B.weight"], ["d"], transB=1)]
    else:
        nodes += [helper.make_node("Transpose", ["lin.lora_A.weight"], ["at"], perm=[1, 0]), helper.make_node("MatMul", ["x", "at"], ["h"]),
                  helper.make_node("Transpose", ["lin.lora_B.weight"], ["bt"], perm=[1, 0]), helper.make_node("MatMul", ["h", "bt"], ["d"])]
    nodes += [helper.make_node("Mul", ["scale", "d"] if scale_first else ["d", "scale"], ["ds"]),
              helper.make_node("Add", ["ds", "y"], ["out"]), helper.make_node("Relu", ["out"], ["z"])]
    shape = ["n", IN] if gemm else ["n", 5, IN]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    import onnx

    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    return {"x": RNG.standard_normal((2, IN) if gemm else (2, 5, IN)).astype(np.float32)}


RECORD = {"lin": {"r": R, "alpha": SCALE * R, "scale": SCALE, "in_features": IN, "out_features": OUT}}


@pytest.mark.parametrize("gemm, scale_first", [(False, False), (True, False), (True, True)])
def test_exported_branch_becomes_the_contract_layout_with_equal_outputs(gemm, scale_first):
    src = TMP / f"norm-{gemm}-{scale_first}.onnx"
    feeds = _exported_style(src, gemm, scale_first)
    want = ort_run(src, feeds)
    model = ir.load(str(src))
    a_peft = model.graph.initializers["lin.lora_A.weight"].const_value.numpy().copy()
    b_peft = model.graph.initializers["lin.lora_B.weight"].const_value.numpy().copy()
    result = normalize_lora(model, RECORD)
    assert result.changed == ["lin"]
    branch = find_branch(model.graph, "lin", read_records(model)["lin"])
    np.testing.assert_allclose(branch.a.const_value.numpy(), a_peft.T)
    np.testing.assert_allclose(branch.b.const_value.numpy(), SCALE * b_peft.T, rtol=1e-6)
    assert branch.y.name == "y"
    assert sorted(n.op_type for n in model.graph) == ["Add", "Add", "MatMul", "MatMul", "MatMul", "Relu", "Transpose"]
    assert read_records(model)["lin"]["a"] == "lin.lora_A.weight"
    out = TMP / f"norm-{gemm}-{scale_first}-out.onnx"
    ir.save(model, str(out))
    assert rel(ort_run(out, feeds), want) <= 1e-6
    assert not normalize_lora(model, RECORD).modified  # already in contract layout


def test_an_unrecognised_branch_is_refused_with_the_reason():
    src = TMP / "norm-bad.onnx"
    _exported_style(src, gemm=False)
    model = ir.load(str(src))
    mul = next(n for n in model.graph if n.op_type == "Mul")
    mul.op_type = "Div"
    with pytest.raises(UnsupportedError, match="site lin: expected the branch to be added"):
        normalize_lora(model, RECORD)
