"""Constants and shape ops (lora_fx.runtime.onnx_ops.shapes) against ONNX Runtime: negative and
clamped slices, Reshape's 0 and -1, uneven Split, bidirectional Expand, axes given as inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.runtime.onnx_ops.single_op import check_against_ort, rng, single_op_model

X3 = rng.standard_normal((2, 3, 5)).astype(np.float32)

OP_CASES = {
    "slice-negative-step": (helper.make_node("Slice", ["x", "s", "e", "ax", "st"], ["y"]), {"x": X3},
                            {"s": np.array([-1, 10], np.int64), "e": np.array([-100, 0], np.int64),
                             "ax": np.array([2, 1], np.int64), "st": np.array([-2, -1], np.int64)}, 18),
    "slice-clamped": (helper.make_node("Slice", ["x", "s", "e"], ["y"]), {"x": X3},
                      {"s": np.array([1, -2], np.int64), "e": np.array([2**62, 2**62], np.int64)}, 18),
    "reshape-zero-minus-one": (helper.make_node("Reshape", ["x", "s"], ["y"]), {"x": X3},
                               {"s": np.array([0, -1], np.int64)}, 18),
    "split-num-outputs-uneven": (helper.make_node("Split", ["x"], ["a", "b", "c"], axis=2, num_outputs=3), {"x": X3}, {}, 18),
    "expand-bidirectional": (helper.make_node("Expand", ["x", "s"], ["y"]), {"x": rng.standard_normal((3, 1)).astype(np.float32)},
                             {"s": np.array([2, 1, 4], np.int64)}, 18),
    "trilu-lower-k": (helper.make_node("Trilu", ["x", "k"], ["y"], upper=0), {"x": X3}, {"k": np.array(-1, np.int64)}, 18),
    "unsqueeze-axes": (helper.make_node("Unsqueeze", ["x", "ax"], ["y"]), {"x": X3}, {"ax": np.array([-1, 0], np.int64)}, 18),
    "squeeze-axes": (helper.make_node("Squeeze", ["x", "ax"], ["y"]), {"x": X3[:, :1]}, {"ax": np.array([1], np.int64)}, 18),
    "cumsum-exclusive-reverse": (helper.make_node("CumSum", ["x", "ax"], ["y"], exclusive=1, reverse=1), {"x": X3},
                                 {"ax": np.array(2, np.int64)}, 18),
    "range-float": (helper.make_node("Range", ["a", "b", "c"], ["y"]), {},
                    {"a": np.array(0.5, np.float32), "b": np.array(3.2, np.float32), "c": np.array(0.7, np.float32)}, 18),
    "constant-of-shape": (helper.make_node("ConstantOfShape", ["s"], ["y"], value=helper.make_tensor("v", TensorProto.INT64, [1], [3])),
                          {}, {"s": np.array([2, 3], np.int64)}, 18),
    "shape-start-end": (helper.make_node("Shape", ["x"], ["y"], start=1, end=-1), {"x": X3}, {}, 18),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_matches_onnxruntime(case: str, tmp_path: Path) -> None:
    node, inputs, inits, opset = OP_CASES[case]
    check_against_ort(single_op_model(node, inputs, opset=opset, inits=inits), inputs, tmp_path)
