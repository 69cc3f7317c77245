"""Elementwise ops (lora_fx.runtime.onnx_ops.elementwise) against ONNX Runtime: integer division and
modulo, broadcasting Where, integer exponents, casts, the com.microsoft Gelu family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.runtime.onnx_ops.single_op import check_against_ort, ms_node, randn, rng, single_op_model

X3 = rng.standard_normal((2, 3, 5)).astype(np.float32)
I64 = np.array([-7, 7, -7, 7, -8, 9], dtype=np.int64)
D64 = np.array([2, -2, -2, 2, 3, -4], dtype=np.int64)

OP_CASES = {
    "div-int-truncates": (helper.make_node("Div", ["a", "b"], ["y"]), {"a": I64, "b": D64}, {}, 18),
    "mod-int-divisor-sign": (helper.make_node("Mod", ["a", "b"], ["y"]), {"a": I64, "b": D64}, {}, 18),
    "mod-fmod": (helper.make_node("Mod", ["a", "b"], ["y"], fmod=1), {"a": I64, "b": D64}, {}, 18),
    "where-broadcast": (helper.make_node("Where", ["c", "x", "z"], ["y"]),
                        {"c": rng.random((3, 1)) > 0.5, "x": X3, "z": np.float32(-1.0) * np.ones(5, np.float32)}, {}, 18),
    "pow-int-exponent": (helper.make_node("Pow", ["x", "e"], ["y"]), {"x": X3}, {"e": np.array(3, np.int64)}, 18),
    "cast-bool": (helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BOOL), {"x": X3}, {}, 18),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_matches_onnxruntime(case: str, tmp_path: Path) -> None:
    node, inputs, inits, opset = OP_CASES[case]
    check_against_ort(single_op_model(node, inputs, opset=opset, inits=inits), inputs, tmp_path)


MS_CASES = {
    "fast-gelu-bias": (ms_node("FastGelu", ["x", "b"], ["y"]), {"x": randn(2, 3, 8), "b": randn(8)}),
    "bias-gelu": (ms_node("BiasGelu", ["x", "b"], ["y"]), {"x": randn(2, 3, 8), "b": randn(8)}),
}


@pytest.mark.parametrize("case", list(MS_CASES))
def test_contrib_op_matches_onnxruntime(case: str, tmp_path: Path) -> None:
    node, inputs = MS_CASES[case]
    check_against_ort(single_op_model(node, inputs), inputs, tmp_path, tol=1e-5)
