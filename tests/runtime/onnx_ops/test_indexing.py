"""Indexing ops (lora_fx.runtime.onnx_ops.indexing) against ONNX Runtime: negative indices wrap,
batch_dims, scatters; Gather indices out of range are refused naming the node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import helper

from lora_fx.errors import ConfigError
from lora_fx.runtime.onnx_torch import OnnxModule
from tests.runtime import onnx_models as om
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


EMBED = rng.standard_normal((10, 4)).astype(np.float32)  # a 10-row table, as an embedding of a 10-token vocabulary


@pytest.mark.parametrize("axis, data, const", [(0, EMBED, False), (1, X3, False), (2, X3, True)])
def test_gather_in_range_edges_run_as_onnxruntime(axis: int, data: np.ndarray, const: bool, tmp_path: Path) -> None:
    """The edges of ONNX's range, -size and size - 1, still run (they are what the range check lets through)."""
    size = data.shape[axis]
    i = np.array([[-size, size - 1], [0, -1]], dtype=np.int64)
    node = helper.make_node("Gather", ["x", "i"], ["y"], name="edges", axis=axis)
    inputs, inits = ({"x": data}, {"i": i}) if const else ({"x": data, "i": i}, {})
    check_against_ort(single_op_model(node, inputs, inits=inits), inputs, tmp_path)


@pytest.mark.parametrize("axis, data, bad, const", [(0, EMBED, 10, False), (0, EMBED, -11, False),
                                                    (1, X3, 3, False), (2, X3, -6, True)])
def test_gather_out_of_range_names_the_node_the_range_and_the_size(axis: int, data: np.ndarray, bad: int, const: bool,
                                                                   tmp_path: Path) -> None:
    """An index outside [-size, size - 1] (a token id at or above the vocabulary size) is a ConfigError naming the
    node, the indices found and the axis size, where torch said only "index out of range in self". ONNX Runtime
    refuses the same indices (the reference that they are out of range)."""
    size = data.shape[axis]
    i = np.array([[1, bad], [0, 2]], dtype=np.int64)
    node = helper.make_node("Gather", ["x", "i"], ["y"], name="embed_lookup", axis=axis)
    inputs, inits = ({"x": data}, {"i": i}) if const else ({"x": data, "i": i}, {})
    model = single_op_model(node, inputs, inits=inits)
    path = tmp_path / "op.onnx"
    ir.save(model, str(path))
    with pytest.raises(Exception, match="out of data bounds|indices"):
        om.ort_run(path, inputs)
    lo, hi = min(0, bad), max(2, bad)
    with pytest.raises(ConfigError) as info:
        OnnxModule(model, trainable=[])(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    msg = str(info.value)
    assert msg.startswith("Gather node 'embed_lookup': ")
    assert f"indices range from {lo} to {hi}" in msg and f"axis {axis} of its data has size {size}" in msg
    assert f"{-size}..{size - 1}" in msg
