"""Reductions, softmax and normalizations (lora_fx.runtime.onnx_ops.reductions) against ONNX Runtime:
axes as inputs, empty axes, opset-11 Softmax flattening, every LayerNormalization output, the
com.microsoft skip normalizations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import helper

from tests.runtime.onnx_ops.single_op import check_against_ort, ms_node, randn, rng, single_op_model

X3 = rng.standard_normal((2, 3, 5)).astype(np.float32)

OP_CASES = {
    "softmax-opset11-flattens": (helper.make_node("Softmax", ["x"], ["y"], axis=1), {"x": X3}, {}, 11),
    "softmax-default-axis": (helper.make_node("Softmax", ["x"], ["y"]), {"x": X3}, {}, 18),
    "reduce-mean-axes-input": (helper.make_node("ReduceMean", ["x", "ax"], ["y"], keepdims=0), {"x": X3},
                               {"ax": np.array([-1, 0], np.int64)}, 18),
    "reduce-sum-empty-noop": (helper.make_node("ReduceSum", ["x"], ["y"], noop_with_empty_axes=0), {"x": X3}, {}, 18),
    "layer-norm-axis1-all-outputs": (helper.make_node("LayerNormalization", ["x", "g", "b"], ["y", "m", "s"], axis=1),
                                     {"x": X3}, {"g": rng.standard_normal((3, 5)).astype(np.float32),
                                                 "b": rng.standard_normal((3, 5)).astype(np.float32)}, 18),
    "rms-normalization": (helper.make_node("RMSNormalization", ["x", "g"], ["y"], epsilon=1e-3), {"x": X3},
                          {"g": rng.standard_normal(5).astype(np.float32)}, 23),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_matches_onnxruntime(case: str, tmp_path: Path) -> None:
    node, inputs, inits, opset = OP_CASES[case]
    check_against_ort(single_op_model(node, inputs, opset=opset, inits=inits), inputs, tmp_path)


MS_CASES = {
    "skip-layer-norm": (ms_node("SkipLayerNormalization", ["x", "s", "g", "b", "bias"], ["y", "", "", "sum"], epsilon=1e-5),
                        {"x": randn(2, 3, 8), "s": randn(2, 3, 8), "g": randn(8), "b": randn(8), "bias": randn(8)}),
    "skip-simplified-layer-norm": (ms_node("SkipSimplifiedLayerNormalization", ["x", "s", "g"], ["y"], epsilon=1e-5),
                                   {"x": randn(2, 3, 8), "s": randn(2, 3, 8), "g": randn(8)}),
}


@pytest.mark.parametrize("case", list(MS_CASES))
def test_contrib_op_matches_onnxruntime(case: str, tmp_path: Path) -> None:
    node, inputs = MS_CASES[case]
    check_against_ort(single_op_model(node, inputs), inputs, tmp_path, tol=1e-5)
