"""Move the real tokens' positions to ``T .. T+n-1`` after T prefix tokens (as PEFT's KV-cache prefix
does): finds the values holding positions (a ``Range`` reaching ``Cos``/``Sin`` or a position-embedding
``Gather``, a slice of a constant ``position_ids`` table, a ``position_ids`` input) and adds T on the
edges that lead to positions only, never on those of a causal mask built from the same ``Range``, nor on an
encoder's positions (``keep``) in an encoder-decoder model."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lora_fx.passes.onnx.find_sites import INSERTED, const_tensor
from lora_fx.passes.onnx.prefix_nodes import emit_const


_STOP = {"MatMul", "Gemm", "Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention"}


_MASK_OPS = {"LessOrEqual", "Less", "Greater", "GreaterOrEqual", "GatherND", "And", "Equal", "Where"}


def _reaches_position_use(value: ir.Value, limit: int = 40) -> bool:
    seen: set[int] = set()
    stack, hit = [value], False
    while stack and len(seen) < limit:
        v = stack.pop()
        for user, idx in v.uses():
            if id(user) in seen:
                continue
            seen.add(id(user))
            if user.op_type in ("Cos", "Sin"):
                hit = True
            elif user.op_type == "Gather" and idx == 1 and const_tensor(user.inputs[0]) is not None:
                hit = True
            elif user.op_type in _STOP:
                continue
            elif user.op_type in _MASK_OPS:
                return False
            else:
                stack.extend(o for o in user.outputs)
    return hit


def _position_edges(value: ir.Value, depth: int = 0) -> list[tuple[ir.Value, ir.Node, int]]:
    """The edges ``(value, user, input index)`` at or below ``value`` to offset: those whose
    downstream is position-only.

    Exporters share one ``Range`` between the positions and the causal mask (common subexpression
    elimination), so the offset goes on the edges that lead to positions alone, never on the mask's.
    """
    edges = []
    for user, idx in list(value.uses()):
        if user.op_type in _STOP or user.op_type in _MASK_OPS or user.metadata_props.get(INSERTED):
            continue
        if user.op_type in ("Cos", "Sin") or (user.op_type == "Gather" and idx == 1 and const_tensor(user.inputs[0]) is not None):
            edges.append((value, user, idx))
        elif user.op_type not in ("Shape", "Size") and all(_reaches_position_use(o) for o in user.outputs):
            edges.append((value, user, idx))
        elif depth < 8:
            for o in user.outputs:
                edges += _position_edges(o, depth + 1)
    return edges


def _is_index_table(value: ir.Value | None) -> bool:
    """A constant integer tensor: a ``position_ids`` buffer, whatever the exporter named it."""
    tensor = const_tensor(value)
    return tensor is not None and tensor.dtype in (ir.DataType.INT64, ir.DataType.INT32)


def position_sources(graph: ir.Graph) -> list[tuple[ir.Value, list[tuple[ir.Node, int]]]]:
    """Each value holding real-token positions (below a ``Range``, a slice of a constant index
    table such as BERT's ``position_ids`` buffer, a ``position_ids`` input) with the uses of it
    that lead to positions only."""
    found: list[tuple[ir.Value, ir.Node, int]] = []
    for node in list(graph):
        if node.metadata_props.get(INSERTED):
            continue
        if node.op_type == "Range" or (node.op_type == "Slice" and _is_index_table(node.inputs[0])):
            found += _position_edges(node.outputs[0])
    for value in graph.inputs:
        if value.name == "position_ids":
            found += [(value, u, i) for u, i in value.uses()]
    grouped: dict[int, tuple[ir.Value, list[tuple[ir.Node, int]]]] = {}
    for value, user, idx in found:
        grouped.setdefault(id(value), (value, []))[1].append((user, idx))
    return list(grouped.values())


def offset_positions(graph: ir.Graph, T: int, keep: set[int] | frozenset = frozenset()) -> list[str]:
    """Add T to the positions (see the FX pass: PEFT's cache of T prefixes does this), but to those of values whose
    id is in ``keep`` (an encoder's, which PEFT's cache never reaches)."""
    changed = []
    for value, edges in position_sources(graph):
        if id(value) in keep:
            continue
        nodes: list[ir.Node] = []
        dtype = value.dtype or ir.DataType.INT64
        t = emit_const(nodes, np.array(T, dtype=dtype.numpy()), f"{value.name}/prefix_offset/T")
        add = ir.node("Add", [value, t], name=f"{value.name}/prefix_offset", metadata_props={INSERTED: "prefix"})
        add.outputs[0].name = f"{value.name}/prefix_offset"
        if value.dtype is not None:  # TorchScript exports often carry no type here; leave it to inference
            add.outputs[0].dtype, add.outputs[0].shape = value.dtype, value.shape
        nodes.append(add)
        producer = value.producer()
        if producer is None:
            graph.insert_before(next(iter(graph)), nodes)
        else:
            graph.insert_after(producer, nodes)
        for user, i in edges:
            user.replace_input_with(i, add.outputs[0])
        changed.append(f"positions:{value.name}")
    return changed
