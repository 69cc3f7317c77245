"""Graph-building blocks for prefix-tuning in ONNX: each appends the nodes it makes to a list (the
caller inserts them where they belong) and marks them as inserted by lora_fx, so ``find_sites``
never mistakes them for the model's own."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from lora_fx.passes.onnx.find_sites import INSERTED, const_tensor


def emit_const(graph_nodes: list[ir.Node], array: np.ndarray, name: str) -> ir.Value:
    node = ir.node("Constant", [], attributes={"value": ir.tensor(array, name=name)}, metadata_props={INSERTED: "prefix"})
    node.outputs[0].name = name
    graph_nodes.append(node)
    return node.outputs[0]


def emit(graph_nodes: list[ir.Node], op: str, inputs: list[ir.Value], name: str, **attributes: Any) -> ir.Value:
    node = ir.node(op, inputs, attributes=attributes or None, name=name, metadata_props={INSERTED: "prefix"})
    node.outputs[0].name = name
    graph_nodes.append(node)
    return node.outputs[0]


def input_at(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def set_input(node: ir.Node, i: int, value: ir.Value) -> None:
    """Input ``i`` of ``node`` becomes ``value``; optional inputs the node left out are added (as absent) first."""
    if len(node.inputs) <= i:
        node.resize_inputs(i + 1)
    node.replace_input_with(i, value)


def is_used(value: ir.Value | None) -> bool:
    return value is not None and (bool(value.uses()) or value.is_graph_output())


def rank_of(value: ir.Value | None) -> int | None:
    return len(value.shape) if value is not None and value.shape is not None else None


def static_dim(value: ir.Value | None, axis: int) -> int | None:
    if value is None or value.shape is None or not -len(value.shape) <= axis < len(value.shape):
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None


def batched(nodes: list[ir.Node], p: ir.Value, kv: int, reps: int, T: int, hd: int, like: ir.Value, layout: str,
             tag: str) -> ir.Value:
    """Prefix ``p`` ``[kv, T, hd]`` as a batch of ``like``'s size, each kv head repeated ``reps`` times (in
    repeat_kv's order: head h uses kv head h // reps), in ``layout``: ``bnsh`` [B, H, T, hd], ``bnhs`` [B, H, hd, T]
    (a transposed key) or ``bsh`` [B, T, H*hd]."""
    heads = kv * reps
    if reps > 1:
        p = emit(nodes, "Unsqueeze", [p, emit_const(nodes, np.array([1], np.int64), f"{tag}/axis1")], f"{tag}/unsq1")
        p = emit(nodes, "Expand", [p, emit_const(nodes, np.array([kv, reps, T, hd], np.int64), f"{tag}/rep_shape")], f"{tag}/rep")
        p = emit(nodes, "Reshape", [p, emit_const(nodes, np.array([heads, T, hd], np.int64), f"{tag}/heads_shape")], f"{tag}/heads")
    if layout == "bnhs":
        p = emit(nodes, "Transpose", [p], f"{tag}/t", perm=[0, 2, 1])
    elif layout == "bsh":
        p = emit(nodes, "Transpose", [p], f"{tag}/t", perm=[1, 0, 2])
        p = emit(nodes, "Reshape", [p, emit_const(nodes, np.array([T, heads * hd], np.int64), f"{tag}/flat_shape")], f"{tag}/flat")
    p = emit(nodes, "Unsqueeze", [p, emit_const(nodes, np.array([0], np.int64), f"{tag}/axis0")], f"{tag}/unsq0")
    batch = emit(nodes, "Shape", [like], f"{tag}/batch", start=0, end=1)
    ones = emit_const(nodes, np.ones(2 if layout == "bsh" else 3, np.int64), f"{tag}/ones")
    shape = emit(nodes, "Concat", [batch, ones], f"{tag}/shape", axis=0)
    # Expand broadcasts [1, ...] against [B, 1, ...]: the prefix for every batch row.
    return emit(nodes, "Expand", [p, shape], f"{tag}/batched")


def merged_batched(nodes: list[ir.Node], p: ir.Value, heads: int, like: ir.Value, transpose: bool, tag: str) -> ir.Value:
    """Prefix ``p`` ``[heads, T, hd]`` for attention with the heads merged into the batch axis: ``[batch*heads, T,
    hd]`` (``[batch*heads, hd, T]`` transposed), row ``b*heads + h`` holding head h as a ``[batch, heads]`` merge
    orders them; ``batch*heads`` is the first dim of ``like``."""
    if transpose:
        p = emit(nodes, "Transpose", [p], f"{tag}/t", perm=[0, 2, 1])
    rows = emit(nodes, "Shape", [like], f"{tag}/rows", start=0, end=1)
    batch = emit(nodes, "Div", [rows, emit_const(nodes, np.array([heads], np.int64), f"{tag}/heads")], f"{tag}/batch")
    reps = emit(nodes, "Concat", [batch, emit_const(nodes, np.ones(2, np.int64), f"{tag}/ones")], f"{tag}/reps", axis=0)
    return emit(nodes, "Tile", [p, reps], f"{tag}/batched")


def visible_fill(dtype: ir.DataType | None) -> np.ndarray | None:
    """What a visible mask entry holds: True for boolean masks, 1 for integer padding masks, 0 (additive) else."""
    if dtype == ir.DataType.BOOL:
        return np.array([True])
    if dtype is not None and dtype.is_integer():
        return np.array([1], dtype=dtype.numpy())
    return None


def causal_visible(nodes: list[ir.Node], q: ir.Value, q_axis: int, k: ir.Value, k_axis: int, T: int, tag: str) -> ir.Value:
    """Boolean ``[S_q, T + S_kv]``: query i sees the T prefix keys and real keys 0..i (key column j <= i + T)."""
    def length(value: ir.Value, axis: int, which: str) -> ir.Value:
        dim = emit(nodes, "Shape", [value], f"{tag}/{which}_len", start=axis, end=axis + 1)
        return emit(nodes, "Squeeze", [dim], f"{tag}/{which}_n")

    zero = emit_const(nodes, np.array(0, np.int64), f"{tag}/zero")
    one = emit_const(nodes, np.array(1, np.int64), f"{tag}/one")
    t = emit_const(nodes, np.array(T, np.int64), f"{tag}/T")
    rows = emit(nodes, "Range", [zero, length(q, q_axis, "q"), one], f"{tag}/rows")
    rows = emit(nodes, "Unsqueeze", [rows, emit_const(nodes, np.array([1], np.int64), f"{tag}/axis1")], f"{tag}/rows_col")
    last = emit(nodes, "Add", [rows, t], f"{tag}/last_visible")
    total = emit(nodes, "Add", [length(k, k_axis, "kv"), t], f"{tag}/total")
    cols = emit(nodes, "Range", [zero, total, one], f"{tag}/cols")
    return emit(nodes, "LessOrEqual", [cols, last], f"{tag}/visible")


def additive_mask(nodes: list[ir.Node], visible: ir.Value, like: ir.Value, tag: str) -> ir.Value:
    """0 where ``visible``, -inf elsewhere, in ``like``'s dtype."""
    zero = emit_const(nodes, np.array(0.0, np.float32), f"{tag}/zero_f")
    hidden = emit_const(nodes, np.array(-np.inf, np.float32), f"{tag}/hidden_f")
    add = emit(nodes, "Where", [visible, zero, hidden], f"{tag}/additive_f")
    return emit(nodes, "CastLike", [add, like], f"{tag}/additive")


def pad_front(nodes: list[ir.Node], mask: ir.Value, T: int, tag: str, fill: np.ndarray | None = None) -> ir.Value:
    """``mask`` with T visible columns in front of its last axis: zeros (additive masks) or ``fill``.

    Built from the mask's runtime shape (Shape → ConstantOfShape → Concat), so it needs neither the
    rank nor (for additive masks, cast like the mask) the dtype in the graph's type information
    (TorchScript exports often lack both).
    """
    shape = emit(nodes, "Shape", [mask], f"{tag}/shape")
    lead = emit(nodes, "Slice", [shape, emit_const(nodes, np.array([0], np.int64), f"{tag}/start"),
                                emit_const(nodes, np.array([-1], np.int64), f"{tag}/end")], f"{tag}/lead")
    zeros_shape = emit(nodes, "Concat", [lead, emit_const(nodes, np.array([T], np.int64), f"{tag}/T")], f"{tag}/zeros_shape", axis=0)
    if fill is None:
        zeros = emit(nodes, "ConstantOfShape", [zeros_shape], f"{tag}/zeros_f")
        visible = emit(nodes, "CastLike", [zeros, mask], f"{tag}/zeros")
    else:
        visible = emit(nodes, "ConstantOfShape", [zeros_shape], f"{tag}/visible", value=ir.tensor(fill))
    return emit(nodes, "Concat", [visible, mask], f"{tag}/padded", axis=-1)


# ---- older opsets ----------------------------------------------------------------------------------
# The builders above write opset-15 ops. Models exported at opsets 11-14 (TorchScript's older defaults) get
# the equivalent spelling of their own opset instead: a node of a newer signature is invalid in an older model.
MIN_OPSET = 11  # Range, which the causal mask and positions need
_INT64_MAX = np.iinfo(np.int64).max


def _replace(graph: ir.Graph, node: ir.Node, nodes: list[ir.Node], new: ir.Value) -> None:
    """``nodes`` (ending in ``new``) take the place of ``node``; ``new`` keeps the old output's name."""
    old = node.outputs[0]
    name = old.name
    graph.insert_before(node, nodes)
    old.name = None
    ir.convenience.replace_all_uses_with(old, new)
    graph.remove(node, safe=True)
    new.name = name


def _lower_shape(graph: ir.Graph, node: ir.Node, opset: int, dtype: ir.DataType) -> None:
    """Shape's ``start``/``end`` (opset 15) as a Slice of the whole shape."""
    if opset >= 15 or not ({"start", "end"} & set(node.attributes)):
        return
    start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", _INT64_MAX)
    nodes: list[ir.Node] = []
    whole = emit(nodes, "Shape", [node.inputs[0]], f"{node.name}/whole")
    part = emit(nodes, "Slice", [whole, emit_const(nodes, np.array([start], np.int64), f"{node.name}/start"),
                                 emit_const(nodes, np.array([end], np.int64), f"{node.name}/end")], f"{node.name}/slice")
    _replace(graph, node, nodes, part)


def _lower_cast_like(graph: ir.Graph, node: ir.Node, opset: int, dtype: ir.DataType) -> None:
    """CastLike (opset 15) as Cast to the target's dtype; where the graph does not record it, the dtype
    the attention computes in (the prefixes', which the masks and scores they join share)."""
    if opset >= 15:
        return
    to = node.inputs[1].dtype or dtype
    nodes: list[ir.Node] = []
    cast = emit(nodes, "Cast", [node.inputs[0]], f"{node.name}/cast", to=to)
    _replace(graph, node, nodes, cast)


def _lower_axes_input(graph: ir.Graph, node: ir.Node, opset: int, dtype: ir.DataType) -> None:
    """Unsqueeze/Squeeze ``axes`` and Split ``split`` became inputs in opset 13: attributes before."""
    if opset >= 13 or len(node.inputs) < 2 or node.inputs[1] is None:
        return
    attr = "split" if node.op_type == "Split" else "axes"
    values, constant = const_tensor(node.inputs[1]), node.inputs[1].producer()
    node.resize_inputs(1)
    node.attributes[attr] = ir.AttrInt64s(attr, [int(v) for v in np.asarray(values.numpy()).reshape(-1)])
    if constant is not None and not constant.outputs[0].uses():
        graph.remove(constant, safe=True)


def _lower_less_or_equal(graph: ir.Graph, node: ir.Node, opset: int, dtype: ir.DataType) -> None:
    """LessOrEqual (opset 12) as Not(Greater)."""
    if opset >= 12:
        return
    nodes: list[ir.Node] = []
    greater = emit(nodes, "Greater", list(node.inputs), f"{node.name}/greater")
    _replace(graph, node, nodes, emit(nodes, "Not", [greater], f"{node.name}/not"))


_LOWER = {"Shape": _lower_shape, "CastLike": _lower_cast_like, "Unsqueeze": _lower_axes_input,
          "Squeeze": _lower_axes_input, "Split": _lower_axes_input, "LessOrEqual": _lower_less_or_equal}


def lower_to_opset(graph: ir.Graph, opset: int, dtype: ir.DataType) -> None:
    """Rewrite the nodes prefix-tuning inserted into ``graph`` in the ops of ``opset`` (11 to 14; from 15 on
    nothing changes). ``dtype`` is the attention's compute dtype, for CastLike targets of unrecorded type."""
    if opset >= 15:
        return
    for node in [n for n in graph if n.metadata_props.get(INSERTED) == "prefix" and n.domain in ("", "ai.onnx")]:
        lower = _LOWER.get(node.op_type)
        if lower is not None:
            lower(graph, node, opset, dtype)
