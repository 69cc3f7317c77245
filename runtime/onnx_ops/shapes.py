"""Constants and shape ops: Constant, Shape, Reshape, Expand, Concat, Slice, Squeeze and the rest.

Where a shape input is a ``Const`` (known from the input shapes alone) these ops read Python ints, so
shape arithmetic costs no tensor work and ``torch.compile`` sees plain numbers.
"""

from __future__ import annotations

import math

import torch

from lora_fx.errors import UnsupportedError
from lora_fx.runtime.onnx_ops.registry import Ctx, ints, norm_axis, op, scalar


@op("Constant")
def _constant(ctx, x, a):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in a:
            v = a[key]
            if isinstance(v, torch.Tensor):
                return v.to(ctx.device)
            dtype = torch.float32 if "float" in key else torch.int64
            return torch.tensor(v, dtype=dtype, device=ctx.device)
    raise UnsupportedError(f"Constant with attributes {sorted(a)} is not supported (strings, sparse tensors)")


@op("ConstantOfShape")
def _constant_of_shape(ctx, x, a):
    value = a.get("value")
    shape = ints(x[0])
    if value is None:
        return torch.zeros(shape, dtype=torch.float32, device=ctx.device)
    return torch.full(shape, value.reshape(-1)[0].item(), dtype=value.dtype, device=ctx.device)


@op("Shape")
def _shape(ctx, x, a):
    dims = list(x[0].shape)
    start, end = a.get("start", 0), a.get("end", None)
    return torch.tensor(dims[start:end] if end is not None else dims[start:], dtype=torch.int64, device=ctx.device)


@op("Size")
def _size(ctx, x, a):
    return torch.tensor(math.prod(x[0].shape), dtype=torch.int64, device=ctx.device)


@op("Range")
def _range(ctx, x, a):
    start, limit, delta = (scalar(v) for v in x)
    dtype = ctx.t(x[0]).dtype
    return torch.arange(start, limit, delta, dtype=dtype, device=ctx.device)


@op("Reshape")
def _reshape(ctx, x, a):
    t = ctx.t(x[0])
    shape = ints(x[1])
    if not a.get("allowzero", 0):
        shape = [t.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return t.reshape(shape)


@op("Flatten")
def _flatten(ctx, x, a):
    t = ctx.t(x[0])
    axis = norm_axis(a.get("axis", 1), t.dim())
    return t.reshape(math.prod(t.shape[:axis]), math.prod(t.shape[axis:]))


@op("Expand")
def _expand(ctx, x, a):
    t = ctx.t(x[0])
    return t.expand(torch.broadcast_shapes(tuple(t.shape), tuple(ints(x[1]))))


@op("Tile")
def _tile(ctx, x, a):
    return ctx.t(x[0]).repeat(ints(x[1]))


def axes_input(ctx: Ctx, x: list, a: dict, since: int) -> list[int] | None:
    if ctx.opset >= since:
        return ints(x[1]) if len(x) > 1 and x[1] is not None else None
    return a.get("axes")


@op("Unsqueeze")
def _unsqueeze(ctx, x, a):
    t = ctx.t(x[0])
    axes = axes_input(ctx, x, a, 13)
    rank = t.dim() + len(axes)
    for ax in sorted(norm_axis(i, rank) for i in axes):
        t = t.unsqueeze(ax)
    return t


@op("Squeeze")
def _squeeze(ctx, x, a):
    t = ctx.t(x[0])
    axes = axes_input(ctx, x, a, 13)
    if axes is None:
        return t.squeeze()
    return t.squeeze(tuple(norm_axis(i, t.dim()) for i in axes)) if axes else t


@op("Transpose")
def _transpose(ctx, x, a):
    t = ctx.t(x[0])
    perm = a.get("perm") or list(reversed(range(t.dim())))
    return t.permute(perm)


@op("Concat")
def _concat(ctx, x, a):
    ts = [ctx.t(v) for v in x if v is not None]
    ts = [t for t in ts if t.numel() or t.dim() != 1 or len(ts) == 1] or ts  # ONNX allows empty 1-D pieces
    return torch.cat(ts, dim=a["axis"])


@op("Split")
def _split(ctx, x, a):
    t = ctx.t(x[0])
    axis = norm_axis(a.get("axis", 0), t.dim())
    sizes = ints(x[1]) if len(x) > 1 and x[1] is not None else a.get("split")
    if sizes is None:
        n = a.get("num_outputs") or ctx.n_outputs
        chunk = -(-t.shape[axis] // n)  # opset 18: equal chunks, a smaller last one
        sizes = [min(chunk, t.shape[axis] - i * chunk) for i in range(n)]
    return tuple(torch.split(t, sizes, dim=axis))


@op("Slice")
def _slice(ctx, x, a):
    t = ctx.t(x[0])
    if ctx.opset < 10:
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts, ends = ints(x[1]), ints(x[2])
        axes = ints(x[3]) if len(x) > 3 and x[3] is not None else None
        steps = ints(x[4]) if len(x) > 4 and x[4] is not None else None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    for start, end, ax, step in zip(starts, ends, axes, steps):
        ax = norm_axis(ax, t.dim())
        dim = t.shape[ax]
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
            if step == 1:
                t = t.narrow(ax, start, max(end - start, 0))
            else:
                index = [slice(None)] * ax + [slice(start, end, step)]
                t = t[tuple(index)]
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            idx = list(range(start, end, step))
            t = t.index_select(ax, torch.tensor(idx, dtype=torch.int64, device=t.device))
    return t


@op("Trilu")
def _trilu(ctx, x, a):
    t = ctx.t(x[0])
    k = int(scalar(x[1])) if len(x) > 1 and x[1] is not None else 0
    return torch.triu(t, k) if a.get("upper", 1) else torch.tril(t, k)


@op("CumSum")
def _cumsum(ctx, x, a):
    t = ctx.t(x[0])
    ax = norm_axis(int(scalar(x[1])), t.dim())
    if a.get("reverse", 0):
        t = t.flip(ax)
    out = torch.cumsum(t, ax)
    if a.get("exclusive", 0):
        out = out - t
    return out.flip(ax) if a.get("reverse", 0) else out.to(t.dtype)
