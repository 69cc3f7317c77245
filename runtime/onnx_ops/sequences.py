"""Sequence ops: SplitToSequence, SequenceAt, SequenceConstruct, SequenceEmpty, SequenceInsert, SequenceErase,
SequenceLength, ConcatFromSequence.

A sequence value is a Python list of tensors. Ops never change a list they are given (ONNX values are
immutable; the executor may still hold the input list under its own name): inserting or erasing makes a
new list. Gradients flow through the tensors in it as through any other value.
"""

from __future__ import annotations

import torch

from lora_fx.errors import UnsupportedError
from lora_fx.runtime.onnx_ops.registry import ints, norm_axis, op, scalar


def _seq(label: str, v) -> list:
    if not isinstance(v, list):
        raise UnsupportedError(f"{label} got a {type(v).__name__} where ONNX requires a sequence; the graph is malformed")
    return v


def _position(label: str, pos, n: int, *, inclusive: bool) -> int:
    """ONNX's position: negative counts from the back; ``inclusive`` admits ``n`` (insert at the end)."""
    p = int(scalar(pos))
    q = p + n if p < 0 else p
    if not 0 <= q < n + (1 if inclusive else 0):
        raise UnsupportedError(f"{label}: position {p} is out of range for a sequence of {n} tensors")
    return q


@op("SequenceEmpty")
def _sequence_empty(ctx, x, a):
    a.get("dtype")  # the element type of an empty list: nothing to hold it, it only types later inserts
    return []


@op("SequenceConstruct")
def _sequence_construct(ctx, x, a):
    return [ctx.t(v) for v in x]


@op("SequenceLength")
def _sequence_length(ctx, x, a):
    return torch.tensor(len(_seq("SequenceLength", x[0])), dtype=torch.int64, device=ctx.device)


@op("SequenceAt")
def _sequence_at(ctx, x, a):
    seq = _seq("SequenceAt", x[0])
    return seq[_position("SequenceAt", x[1], len(seq), inclusive=False)]


@op("SequenceInsert")
def _sequence_insert(ctx, x, a):
    seq = list(_seq("SequenceInsert", x[0]))
    at = _position("SequenceInsert", x[2], len(seq), inclusive=True) if len(x) > 2 and x[2] is not None else len(seq)
    seq.insert(at, ctx.t(x[1]))
    return seq


@op("SequenceErase")
def _sequence_erase(ctx, x, a):
    seq = list(_seq("SequenceErase", x[0]))
    at = _position("SequenceErase", x[1], len(seq), inclusive=False) if len(x) > 1 and x[1] is not None else len(seq) - 1
    del seq[at]
    return seq


@op("SplitToSequence")
def _split_to_sequence(ctx, x, a):
    t = ctx.t(x[0])
    axis = norm_axis(a.get("axis", 0), t.dim())
    keepdims = a.get("keepdims", 1)
    split = x[1] if len(x) > 1 and x[1] is not None else None
    if split is None:  # pieces of one, squeezed unless keepdims
        pieces = torch.split(t, 1, dim=axis)
        return list(pieces) if keepdims else [p.squeeze(axis) for p in pieces]
    sizes = ints(split)
    rank = len(split.shape) if hasattr(split, "shape") else 0
    if rank == 0:  # one size: equal pieces, a smaller last one
        return list(torch.split(t, sizes[0], dim=axis))
    return list(torch.split(t, sizes, dim=axis))


@op("ConcatFromSequence")
def _concat_from_sequence(ctx, x, a):
    seq = [ctx.t(v) for v in _seq("ConcatFromSequence", x[0])]
    if not seq:
        raise UnsupportedError("ConcatFromSequence of an empty sequence: ONNX leaves its shape undefined")
    axis = a["axis"]
    if a.get("new_axis", 0):
        return torch.stack(seq, dim=axis)
    return torch.cat(seq, dim=axis)
