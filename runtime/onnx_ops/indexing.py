"""Indexing ops: Gather, GatherElements, GatherND, ScatterND, ScatterElements (negative indices wrap).
Gather refuses indices outside [-size, size - 1] with a ConfigError (the executor prefixes the node), as ONNX Runtime refuses them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lora_fx.errors import ConfigError
from lora_fx.runtime.onnx_ops.registry import Const, norm_axis, op


def _wrap(idx: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.where(idx < 0, idx + dim, idx)


def _check_gather_range(lo: int, hi: int, size: int, axis: int) -> None:
    """ONNX Gather takes indices in [-size, size - 1]; torch would fail with a bare IndexError ("index out of
    range in self"), or read garbage on some devices. Out-of-range ids mostly come from the data (a token id
    at or above the vocabulary size), so the message names the range found and the one allowed."""
    if lo >= -size and hi < size:
        return
    raise ConfigError(
        f"indices range from {lo} to {hi}, but axis {axis} of its data has size {size} (valid "
        f"indices: {-size}..{size - 1}); an input holds an index outside it, such as a token id at or above the "
        f"vocabulary size: check the data (ids must be below {size})"
    )


@op("Gather")
def _gather(ctx, x, a):
    data = ctx.t(x[0])
    axis = norm_axis(a.get("axis", 0), data.dim())
    if isinstance(x[1], Const):
        ints = x[1].ints()
        if ints:
            _check_gather_range(min(ints), max(ints), data.shape[axis], axis)
        idx = [i + data.shape[axis] if i < 0 else i for i in ints]
        if not x[1].shape:
            return data.select(axis, idx[0])
        flat = torch.tensor(idx, dtype=torch.int64, device=data.device)
        out = data.index_select(axis, flat)
        return out.reshape(data.shape[:axis] + x[1].shape + data.shape[axis + 1 :])
    if x[1].numel() and not torch.compiler.is_compiling():  # a compiled graph keeps no data-dependent check
        lo, hi = torch.aminmax(x[1].detach())  # one device sync per data-dependent Gather (embedding lookups)
        _check_gather_range(int(lo), int(hi), data.shape[axis], axis)
    idx = _wrap(x[1].to(torch.int64), data.shape[axis])
    if axis == 0 and data.dim() == 2 and data.dtype.is_floating_point:
        return F.embedding(idx, data)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape(data.shape[:axis] + idx.shape + data.shape[axis + 1 :])


@op("GatherElements")
def _gather_elements(ctx, x, a):
    data = ctx.t(x[0])
    axis = norm_axis(a.get("axis", 0), data.dim())
    return torch.gather(data, axis, _wrap(ctx.t(x[1]).to(torch.int64), data.shape[axis]))


@op("GatherND")
def _gather_nd(ctx, x, a):
    data, idx = ctx.t(x[0]), ctx.t(x[1]).to(torch.int64)
    b = a.get("batch_dims", 0)
    k = idx.shape[-1]
    batch = data.shape[:b]
    nb = math.prod(batch)
    d = data.reshape((nb,) + tuple(data.shape[b:]))
    i = idx.reshape(nb, -1, k)
    dims = torch.tensor(data.shape[b : b + k], device=idx.device)
    i = torch.where(i < 0, i + dims, i)
    bidx = torch.arange(nb, device=idx.device).view(nb, 1).expand(nb, i.shape[1])
    out = d[(bidx,) + tuple(i[..., j] for j in range(k))]
    return out.reshape(tuple(idx.shape[:-1]) + tuple(data.shape[b + k :]))


@op("ScatterND")
def _scatter_nd(ctx, x, a):
    data, idx, upd = ctx.t(x[0]), ctx.t(x[1]).to(torch.int64), ctx.t(x[2])
    k = idx.shape[-1]
    i = idx.reshape(-1, k)
    dims = torch.tensor(data.shape[:k], device=idx.device)
    i = torch.where(i < 0, i + dims, i)
    u = upd.reshape((i.shape[0],) + tuple(data.shape[k:]))
    key = tuple(i[:, j] for j in range(k))
    red = a.get("reduction", "none")
    if red == "none":
        return data.index_put(key, u)
    if red == "add":
        return data.index_put(key, u, accumulate=True)
    out = data.clone()
    for n in range(i.shape[0]):  # rare reductions: a loop keeps ONNX's sequential semantics
        pos = tuple(int(v) for v in i[n])
        out[pos] = out[pos] * u[n] if red == "mul" else (torch.maximum if red == "max" else torch.minimum)(out[pos], u[n])
    return out


@op("ScatterElements")
def _scatter_elements(ctx, x, a):
    data, idx, upd = ctx.t(x[0]), ctx.t(x[1]).to(torch.int64), ctx.t(x[2])
    axis = norm_axis(a.get("axis", 0), data.dim())
    idx = _wrap(idx, data.shape[axis])
    red = a.get("reduction", "none")
    if red == "none":
        return data.scatter(axis, idx, upd)
    return data.scatter_reduce(axis, idx, upd, {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}[red])
