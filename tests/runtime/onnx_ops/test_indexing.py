"""Indexing ops (lora_fx.runtime.onnx_ops.indexing) against ONNX Runtime: negative indices wrap,
batch_dims, scatters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import helper

from tests.runtime.onnx_ops.single_op import check_against_ort, rng, single_op_model

X3 = rng.standard_normal((2, 3, 5)).astype(np.float32)

OP_CASES = {
    "gather-negative": (helper.make_node("Gather", ["x", "i"], ["y"], axis=1),
                        {"x": X3, "i": np.array([[-1, 0], [1, -3]], dtype=np.int64)}, {}, 18),
    "gather-negative-const": (helper.make_node("Gather", ["x", "i"], ["y"], axis=2), {"x": X3},
                              {"i": np.array([-1, 2, -5], dtype=np.int64)}, 18),
    "gather-elements-negative": (helper.make_node("GatherElements", ["x", "i"], ["y"], axis=2),
                                 {"x": X3, "i": rng.integers(-5, 5, (2, 3, 4)).astype(np.int64)}, {}, 18),
    "gather-nd-batch": (helper.make_node("GatherND", ["x", "i"], ["y"], batch_dims=1),
                        {"x": X3, "i": np.array([[[0, 1], [2, -1]], [[1, 4], [0, 0]]], dtype=np.int64)}, {}, 18),
    "scatter-nd": (helper.make_node("ScatterND", ["x", "i", "u"], ["y"]),
                   {"x": X3, "i": np.array([[0, 2], [1, 0]], dtype=np.int64), "u": np.ones((2, 5), np.float32)}, {}, 18),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_matches_onnxruntime(case: str, tmp_path: Path) -> None:
    node, inputs, inits, opset = OP_CASES[case]
    check_against_ort(single_op_model(node, inputs, opset=opset, inits=inits), inputs, tmp_path)
