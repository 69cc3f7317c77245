"""Sequence ops (lora_fx.runtime.onnx_ops.sequences) against ONNX Runtime, in the small graphs they need
(a sequence is made, changed and read back as tensors): SplitToSequence with and without split sizes and
keepdims, SequenceAt with negative positions, SequenceConstruct / Insert / Erase / Length / Empty,
ConcatFromSequence with and without new_axis; a sequence as a graph output; gradients through a sequence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from lora_fx.runtime.onnx_torch import OnnxModule
from tests.runtime.onnx_ops.single_op import check_against_ort, graph_model, randn

X = randn(2, 6, 4)
node = helper.make_node
I64 = lambda *v: np.array(v if len(v) != 1 else v[0], np.int64)  # noqa: E731


# (nodes, graph inputs, initializers, outputs)
CASES = {
    # the form the unoptimized dynamo export of Phi3 / GPT-NeoX writes: split, then read pieces back
    "split-equal-at": ([node("SplitToSequence", ["x", "n"], ["s"], axis=-1), node("SequenceAt", ["s", "i0"], ["a"]),
                        node("SequenceAt", ["s", "i1"], ["b"])],
                       {"x": X}, {"n": I64(2), "i0": I64(0), "i1": I64(-1)}, ["a", "b"]),
    "split-scalar-uneven": ([node("SplitToSequence", ["x", "n"], ["s"], axis=1), node("SequenceAt", ["s", "i"], ["a"]),
                             node("SequenceLength", ["s"], ["len"])],
                            {"x": X}, {"n": I64(4), "i": I64(1)}, ["a", "len"]),
    "split-sizes": ([node("SplitToSequence", ["x", "sizes"], ["s"], axis=1), node("SequenceAt", ["s", "i"], ["a"]),
                     node("ConcatFromSequence", ["s"], ["c"], axis=-2)],
                    {"x": X}, {"sizes": I64(1, 3, 2), "i": I64(-2)}, ["a", "c"]),
    "split-ones-no-keepdims-stack": ([node("SplitToSequence", ["x"], ["s"], axis=2, keepdims=0),
                                      node("ConcatFromSequence", ["s"], ["c"], axis=-1, new_axis=1),
                                      node("SequenceAt", ["s", "i"], ["a"])],
                                     {"x": X}, {"i": I64(3)}, ["c", "a"]),
    "split-ones-keepdims": ([node("SplitToSequence", ["x"], ["s"], axis=0), node("SequenceAt", ["s", "i"], ["a"])],
                            {"x": X}, {"i": I64(1)}, ["a"]),
    "construct-insert-erase": ([node("SequenceConstruct", ["x", "y"], ["s"]),
                                node("SequenceInsert", ["s", "z", "p"], ["s2"]),
                                node("SequenceInsert", ["s2", "y"], ["s3"]),
                                node("SequenceErase", ["s3", "e"], ["s4"]),
                                node("SequenceErase", ["s4"], ["s5"]),
                                node("ConcatFromSequence", ["s5"], ["c"], axis=0),
                                node("SequenceLength", ["s3"], ["len"]),
                                node("SequenceAt", ["s3", "p"], ["z_back"])],
                               {"x": X, "y": randn(1, 6, 4), "z": randn(3, 6, 4)}, {"p": I64(-1), "e": I64(0)},
                               ["c", "len", "z_back"]),
    "empty-then-insert": ([node("SequenceEmpty", [], ["s"], dtype=TensorProto.FLOAT), node("SequenceInsert", ["s", "x"], ["s2"]),
                           node("SequenceInsert", ["s2", "y", "p"], ["s3"]),
                           node("ConcatFromSequence", ["s3"], ["c"], axis=1, new_axis=1)],
                          {"x": X, "y": randn(2, 6, 4)}, {"p": I64(0)}, ["c"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sequence_ops_match_onnxruntime(case: str, tmp_path: Path) -> None:
    nodes, inputs, inits, outputs = CASES[case]
    check_against_ort(graph_model(nodes, inputs, outputs, inits=inits), inputs, tmp_path)


def test_a_sequence_graph_output_is_a_list_of_tensors(tmp_path: Path) -> None:
    model = graph_model([node("SplitToSequence", ["x", "n"], ["s"], axis=1)], {"x": X}, ["s"], inits={"n": I64(2)})
    path = tmp_path / "seq.onnx"
    import onnx_ir as ir

    ir.save(model, str(path))
    (ref,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": X})
    got = OnnxModule(model, trainable=[])(x=torch.from_numpy(X))["s"]
    assert isinstance(got, list) and len(got) == len(ref) == 3
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g.numpy(), r)


def test_gradients_flow_through_a_sequence() -> None:
    """A weight split into a sequence and read back trains: its gradient is that of the same slices in torch."""
    w = randn(6, 4)
    nodes = [node("SplitToSequence", ["w", "n"], ["s"], axis=0), node("SequenceAt", ["s", "i"], ["piece"]),
             node("MatMul", ["x", "piece"], ["y"])]
    model = graph_model(nodes, {"x": randn(3, 2)}, ["y"], inits={"w": w, "n": I64(2), "i": I64(-1)})
    module = OnnxModule(model, trainable=["w"])
    x = torch.from_numpy(randn(3, 2))
    (module(x=x)["y"] ** 2).sum().backward()
    ref = torch.from_numpy(w).requires_grad_()
    ((x @ ref[4:6]) ** 2).sum().backward()
    torch.testing.assert_close(module.tensor("w").grad, ref.grad)
    assert module.tensor("w").grad[:4].abs().max() == 0 and ref.grad[4:].abs().max() > 0
