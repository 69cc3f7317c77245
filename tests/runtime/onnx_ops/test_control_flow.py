"""Control flow (lora_fx.runtime.onnx_ops.control_flow) against ONNX Runtime: If with branches that read
outer-scope weights and activations, a nested If whose condition is shape arithmetic, an If on input shapes
in the main graph (the shape cache must not keep the branch of an earlier call), Loop with a trip count, an
early-stopping condition, scan outputs and a sequence carried through iterations. Gradients through the
branch that ran equal ONNX Runtime's finite differences; weights only the other branch reads get none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from lora_fx.errors import UnsupportedError
from lora_fx.runtime.onnx_torch import OnnxModule
from tests.runtime.onnx_ops.single_op import check_against_ort, graph_model, rng

node = helper.make_node


def _const(name: str, value: np.ndarray):
    return node("Constant", [], [name], value=helper.make_tensor(name + "_v", helper.np_dtype_to_tensor_dtype(value.dtype),
                                                                 value.shape, value.reshape(-1).tolist()))


def _branch(name: str, nodes: list, outputs: list[str]):
    return helper.make_graph(nodes, name, [], [helper.make_empty_tensor_value_info(o) for o in outputs])


def if_model(dtype: type = np.float32) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """h = x @ W; y = If(sum(h) > 0): tanh(h @ V) + h, else: If(dim 1 of x == 4) of h * U, else h - U
    (outer-scope h, V, U read from inside the branches); z = If(batch > 1): x * 2, else: x + 1; k = If(batch > 1):
    batch * 2, else: batch + 1."""
    inits = {"W": np.abs(rng.standard_normal((4, 3))).astype(dtype), "V": rng.standard_normal((3, 3)).astype(dtype),
             "U": rng.standard_normal(3).astype(dtype)}
    then_branch = _branch("then", [node("MatMul", ["h", "V"], ["hv"]), node("Tanh", ["hv"], ["t"]),
                                   node("Add", ["t", "h"], ["y_then"])], ["y_then"])
    inner_then = _branch("inner_then", [node("Mul", ["h", "U"], ["y_inner_then"])], ["y_inner_then"])
    inner_else = _branch("inner_else", [node("Sub", ["h", "U"], ["y_inner_else"])], ["y_inner_else"])
    else_branch = _branch("else", [
        node("Shape", ["x"], ["xs"]), _const("one", np.array(1, np.int64)), node("Gather", ["xs", "one"], ["d1"]),
        _const("four", np.array(4, np.int64)), node("Equal", ["d1", "four"], ["is4"]),
        node("If", ["is4"], ["y_else"], then_branch=inner_then, else_branch=inner_else),
    ], ["y_else"])
    nodes = [
        node("MatMul", ["x", "W"], ["h"]), node("ReduceSum", ["h"], ["s"], keepdims=0),
        _const("zero", np.array(0, dtype)), node("Greater", ["s", "zero"], ["c"]),
        node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch),
        node("Shape", ["x"], ["shape"]), _const("i0", np.array(0, np.int64)), node("Gather", ["shape", "i0"], ["batch"]),
        _const("one_b", np.array(1, np.int64)), node("Greater", ["batch", "one_b"], ["many"]),
        node("If", ["many"], ["z"],
             then_branch=_branch("twice", [_const("two", np.array(2, dtype)), node("Mul", ["x", "two"], ["z2"])], ["z2"]),
             else_branch=_branch("plus", [_const("onef", np.array(1, dtype)), node("Add", ["x", "onef"], ["z1"])], ["z1"])),
        # shape arithmetic alone: cached per input shape like any other
        node("If", ["many"], ["k"],
             then_branch=_branch("k2", [_const("two_i", np.array(2, np.int64)), node("Mul", ["batch", "two_i"], ["k_2"])], ["k_2"]),
             else_branch=_branch("k1", [node("Add", ["batch", "one_b"], ["k_1"])], ["k_1"])),
    ]
    return graph_model(nodes, {"x": np.zeros((1, 4), dtype)}, ["y", "z", "k"], inits=inits), inits


def _x(batch: int, sign: float, dtype: type = np.float32) -> np.ndarray:
    return (sign * np.abs(rng.standard_normal((batch, 4)))).astype(dtype)


@pytest.mark.parametrize("batch,sign", [(3, 1.0), (3, -1.0), (1, 1.0), (1, -1.0)])
def test_if_branches_read_outer_values_like_onnxruntime(batch: int, sign: float, tmp_path: Path) -> None:
    model, _ = if_model()
    check_against_ort(model, {"x": _x(batch, sign)}, tmp_path)


def test_if_on_input_shapes_follows_each_call(tmp_path: Path) -> None:
    """The branch of an If on shapes is cached per input shape: a later call with another batch size takes the
    other branch, and the first shape's branch is taken again when it comes back."""
    model, _ = if_model()
    module = OnnxModule(model, trainable=[])
    for batch in (3, 1, 3, 1):
        x = _x(batch, 1.0)
        out = module(x=torch.from_numpy(x))
        np.testing.assert_allclose(out["z"].numpy(), x * 2 if batch > 1 else x + 1, rtol=1e-6)
        assert int(out["k"]) == (batch * 2 if batch > 1 else batch + 1)
    assert len(module._shape_cache) == 2 and all("k" in consts for consts in module._shape_cache.values())


def _ort_loss(path: Path, x: np.ndarray, g: np.ndarray, overrides: dict[str, np.ndarray]) -> float:
    opts = ort.SessionOptions()
    values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in overrides.items()}
    for k, v in values.items():
        opts.add_initializer(k, v)
    y = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    return float((y * g).sum())


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_if_gradients_flow_through_the_chosen_branch(sign: float, tmp_path: Path) -> None:
    """d(sum(y * g)) along a random direction for each weight equals ONNX Runtime's central difference
    (float64); V is read only by the then-branch and U only by the else-branch, so the other one gets none."""
    model, inits = if_model(np.float64)
    path = tmp_path / "if64.onnx"
    ir.save(model, str(path))
    x = _x(3, sign, np.float64)
    g = rng.standard_normal((3, 3))
    module = OnnxModule(model, trainable=["W", "V", "U"])
    (module(x=torch.from_numpy(x))["y"] * torch.from_numpy(g)).sum().backward()
    eps = 1e-6
    for name, value in inits.items():
        grad = module.tensor(name).grad
        d = rng.standard_normal(value.shape)
        fd = (_ort_loss(path, x, g, {name: value + eps * d}) - _ort_loss(path, x, g, {name: value - eps * d})) / (2 * eps)
        got = 0.0 if grad is None else float((grad.numpy() * d).sum())
        assert abs(got - fd) <= 1e-6 * max(1.0, abs(fd)), (name, got, fd)
    unused = "U" if sign > 0 else "V"
    assert module.tensor(unused).grad is None or not module.tensor(unused).grad.any()
    assert module.tensor("W").grad.abs().max() > 0


def _loop_model(with_cond: bool) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """carried h <- tanh(h @ W) * (i + 1) for M iterations (stopping once i >= 1 when with_cond); scan output the
    row sums of each step's h; a sequence carried along collects every step's h."""
    body_nodes = [
        node("MatMul", ["h_in", "W"], ["hw"]), node("Tanh", ["hw"], ["th"]),
        node("Cast", ["i"], ["fi"], to=TensorProto.FLOAT), _const("onef", np.array(1.0, np.float32)),
        node("Add", ["fi", "onef"], ["fi1"]), node("Mul", ["th", "fi1"], ["h_out"]),
        node("ReduceSum", ["h_out", "ax"], ["row"], keepdims=0),
        node("SequenceInsert", ["seq_in", "h_out"], ["seq_out"]),
    ]
    if with_cond:
        body_nodes += [_const("lim", np.array(1, np.int64)), node("Less", ["i", "lim"], ["cond_out"])]
    else:
        body_nodes += [node("Identity", ["cond_in"], ["cond_out"])]
    body = helper.make_graph(
        body_nodes, "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, None),
         helper.make_tensor_sequence_value_info("seq_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("h_out", TensorProto.FLOAT, None),
         helper.make_tensor_sequence_value_info("seq_out", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("row", TensorProto.FLOAT, None)],
    )
    nodes = [
        node("SequenceEmpty", [], ["seq0"], dtype=TensorProto.FLOAT),
        node("Loop", ["M", "c0", "x", "seq0"], ["h_final", "seq_final", "rows"], body=body),
        node("ConcatFromSequence", ["seq_final"], ["all_h"], axis=0, new_axis=1),
    ]
    inits = {"W": rng.standard_normal((4, 4)).astype(np.float32), "ax": np.array([1], np.int64),
             "c0": np.array(True)}
    return graph_model(nodes, {"x": rng.standard_normal((2, 4)).astype(np.float32), "M": np.array(3, np.int64)},
                       ["h_final", "rows", "all_h"], inits=inits), inits


@pytest.mark.parametrize("with_cond", [False, True])
def test_loop_matches_onnxruntime(with_cond: bool, tmp_path: Path) -> None:
    model, _ = _loop_model(with_cond)
    for trips in (3, 1):
        check_against_ort(model, {"x": rng.standard_normal((2, 4)).astype(np.float32), "M": np.array(trips, np.int64)},
                          tmp_path, tol=1e-5)


def test_loop_gradients_reach_a_weight_every_iteration_reads() -> None:
    model, inits = _loop_model(False)
    module = OnnxModule(model, trainable=["W"])
    x = torch.from_numpy(rng.standard_normal((2, 4)).astype(np.float32))
    module(x=x, M=torch.tensor(3))["h_final"].sum().backward()
    w = torch.from_numpy(inits["W"]).requires_grad_()
    h = x
    for i in range(3):
        h = torch.tanh(h @ w) * (i + 1)
    h.sum().backward()
    torch.testing.assert_close(module.tensor("W").grad, w.grad)


def test_unsupported_ops_inside_a_branch_and_scan_are_refused_by_name() -> None:
    bad = _branch("bad", [node("Hardmax", ["x"], ["hm"], name="vendor_hardmax")], ["hm"])
    ok = _branch("ok", [node("Identity", ["x"], ["same"])], ["same"])
    model = graph_model([node("If", ["c"], ["y"], then_branch=ok, else_branch=bad)],
                        {"x": np.zeros((2, 3), np.float32), "c": np.array(True)}, ["y"])
    with pytest.raises(UnsupportedError, match="Hardmax.*vendor_hardmax"):
        OnnxModule(model, trainable=[])
    scan_body = helper.make_graph([node("Add", ["s_in", "e"], ["s_out"]), node("Identity", ["s_out"], ["e_out"])], "scan_body",
                                  [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, None),
                                   helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
                                  [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, None),
                                   helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    scan = graph_model([node("Scan", ["s0", "xs"], ["s", "ys"], body=scan_body, num_scan_inputs=1, name="cumulative")],
                       {"s0": np.zeros(3, np.float32), "xs": np.zeros((4, 3), np.float32)}, ["s", "ys"])
    with pytest.raises(UnsupportedError, match="Scan.*cumulative"):
        OnnxModule(scan, trainable=[])
