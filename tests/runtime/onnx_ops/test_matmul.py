"""Float matrix products (lora_fx.runtime.onnx_ops.matmul) against ONNX Runtime: Gemm with transposes,
alpha and beta, FusedMatMul, Einsum."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import helper

from tests.runtime.onnx_ops.single_op import check_against_ort, ms_node, randn, rng, single_op_model

X3 = rng.standard_normal((2, 3, 5)).astype(np.float32)

OP_CASES = {
    "einsum": (helper.make_node("Einsum", ["x", "w"], ["y"], equation="bij,kj->bik"),
               {"x": X3, "w": rng.standard_normal((4, 5)).astype(np.float32)}, {}, 18),
    "gemm-trans-alpha-beta": (helper.make_node("Gemm", ["a", "b", "c"], ["y"], transA=1, alpha=0.5, beta=2.0),
                              {"a": rng.standard_normal((4, 3)).astype(np.float32)},
                              {"b": rng.standard_normal((4, 5)).astype(np.float32), "c": rng.standard_normal(5).astype(np.float32)}, 18),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_matches_onnxruntime(case: str, tmp_path: Path) -> None:
    node, inputs, inits, opset = OP_CASES[case]
    check_against_ort(single_op_model(node, inputs, opset=opset, inits=inits), inputs, tmp_path)


MS_CASES = {
    "fused-matmul": (ms_node("FusedMatMul", ["a", "b"], ["y"], alpha=0.5, transA=1, transB=1), {"a": randn(2, 5, 3), "b": randn(2, 4, 5)}),
}


@pytest.mark.parametrize("case", list(MS_CASES))
def test_contrib_op_matches_onnxruntime(case: str, tmp_path: Path) -> None:
    node, inputs = MS_CASES[case]
    check_against_ort(single_op_model(node, inputs), inputs, tmp_path, tol=1e-5)
