"""Run an onnx_ir graph as a ``torch.nn.Module``, so ONNX models train with torch autograd.

Frozen initializers become buffers, adapter initializers (see ``trainable_initializers``) become
``nn.Parameter``s, and every node is executed by one torch function that follows the ONNX
semantics of its op (broadcasting, integer division, negative Gather indices, attribute defaults
per opset, ...). Inputs are passed by graph input name; outputs come back as a dict keyed by graph
output name. Batch and sequence sizes may differ between calls.

Shape arithmetic (``Shape`` -> ``Gather`` -> ``Concat`` -> ``Reshape``) depends only on the input
shapes, so it is evaluated once per input-shape signature and kept as Python constants
(``Const``): later calls, and ``torch.compile`` traces, see plain ints there instead of
data-dependent tensors.

Training mode: graphs exported in eval mode contain no dropout, so ``set_training_mode`` only
affects ``Dropout`` nodes that are actually present in the graph (they drop with their ratio when
training, and are the identity otherwise).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch._compile
import torch.nn.functional as F

from lora_fx.errors import ConfigError, UnsupportedError
from lora_fx.runtime.int8_linear import Int8Linear, find_int8_linears, run_int8_linear
from lora_fx.runtime.int8_linear import storage as int8_storage

LORA_METADATA_KEY = "lora_fx.lora"
PREFIX_METADATA_KEY = "lora_fx.prefix"
_ADAPTER_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# Constants (shape arithmetic) larger than this stay tensors: they are data, not shapes.
_CONST_LIMIT = 1024
_SHAPE_CACHE_SIZE = 64

_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16, 6: torch.int32,
    7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64, 12: torch.uint32, 13: torch.uint64,
    16: torch.bfloat16, 21: torch.uint8, 22: torch.int8,
}


def torch_dtype(onnx_type: int) -> torch.dtype:
    try:
        return _DTYPES[int(onnx_type)]
    except KeyError:
        raise UnsupportedError(f"ONNX data type {onnx_type} has no torch equivalent here") from None


# ---- which initializers train ------------------------------------------------------------------


def _metadata_json(model: Any, key: str) -> dict:
    raw = model.metadata_props.get(key)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise ConfigError(f"model metadata {key!r} is not valid JSON; re-apply the adapter with lora_fx.apply") from None
    return data if isinstance(data, dict) else {}


def trainable_initializers(model: Any) -> list[str]:
    """Names of the initializers that train: the adapters, everything else stays frozen.

    An initializer is an adapter if the model's ``lora_fx.lora`` metadata names it (``"a"``/``"b"``
    of a site), if its name ends in ``.lora_A.weight`` / ``.lora_B.weight`` (the public naming), or
    if the ``lora_fx.prefix`` metadata names it (any string value of a site entry).
    """
    inits = model.graph.initializers
    names: list[str] = []
    for site in _metadata_json(model, LORA_METADATA_KEY).values():
        if isinstance(site, dict):
            names += [site[k] for k in ("a", "b") if isinstance(site.get(k), str)]
    for site in _metadata_json(model, PREFIX_METADATA_KEY).values():
        if isinstance(site, dict):
            names += [v for v in site.values() if isinstance(v, str) and v in inits]
    names += [n for n in inits if n.endswith(_ADAPTER_SUFFIXES)]
    seen: dict[str, None] = {}
    for n in names:
        if n in inits:
            seen.setdefault(n, None)
    return list(seen)


# ---- constants ---------------------------------------------------------------------------------


class Const:
    """A small value known from the input shapes alone, held as Python numbers."""

    __slots__ = ("value", "dtype", "shape", "_tensor")

    def __init__(self, value: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.value = value
        self.dtype = dtype
        self.shape = shape
        self._tensor: torch.Tensor | None = None

    @classmethod
    def of(cls, t: torch.Tensor) -> "Const":
        t = t.detach()
        return cls(t.cpu().tolist(), t.dtype, tuple(t.shape))

    def tensor(self, device: torch.device) -> torch.Tensor:
        t = self._tensor
        if t is None or t.device != device:
            t = torch.tensor(self.value, dtype=self.dtype, device=device)
            self._tensor = t
        return t

    def ints(self) -> list[int]:
        """The values flattened, as ints."""
        out: list[int] = []
        stack = [self.value]
        while stack:
            v = stack.pop()
            if isinstance(v, list):
                stack.extend(reversed(v))
            else:
                out.append(int(v))
        return out


class Ctx:
    """What an op needs besides its inputs: the opset of its domain, the device, training mode."""

    def __init__(self, opset: int, device: torch.device, training: bool) -> None:
        self.opset = opset
        self.device = device
        self.training = training
        self.n_outputs = 1

    def t(self, v: Any) -> torch.Tensor | None:
        if v is None or isinstance(v, torch.Tensor):
            return v
        return v.tensor(self.device)


def ints(v: Any) -> list[int]:
    """A shape-like input as Python ints (free for constants; a device sync for tensors)."""
    if isinstance(v, Const):
        return v.ints()
    return [int(x) for x in v.reshape(-1).tolist()]


def scalar(v: Any) -> Any:
    if isinstance(v, Const):
        return v.value[0] if isinstance(v.value, list) else v.value
    return v.reshape(-1)[0].item()


OpFn = Callable[[Ctx, list, dict], Any]
OPS: dict[tuple[str, str], OpFn] = {}


def op(*names: str, domain: str = "") -> Callable[[OpFn], OpFn]:
    def register(fn: OpFn) -> OpFn:
        for name in names:
            OPS[(domain, name)] = fn
        return fn

    return register


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


# ---- elementwise ---------------------------------------------------------------------------------


def _binary(fn: Callable) -> OpFn:
    return lambda ctx, x, a: fn(ctx.t(x[0]), ctx.t(x[1]))


for _name, _fn in {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Equal": torch.eq, "Less": torch.lt,
    "LessOrEqual": torch.le, "Greater": torch.gt, "GreaterOrEqual": torch.ge, "And": torch.logical_and,
    "Or": torch.logical_or, "Xor": torch.logical_xor, "BitwiseAnd": torch.bitwise_and,
    "BitwiseOr": torch.bitwise_or,
}.items():
    op(_name)(_binary(_fn))


@op("Div")
def _div(ctx, x, a):
    p, q = ctx.t(x[0]), ctx.t(x[1])
    if p.dtype.is_floating_point:
        return p / q
    return torch.div(p, q, rounding_mode="trunc")  # C-style integer division, as ONNX and ORT


@op("Mod")
def _mod(ctx, x, a):
    p, q = ctx.t(x[0]), ctx.t(x[1])
    if a.get("fmod", 0) or p.dtype.is_floating_point:
        return torch.fmod(p, q)
    return torch.remainder(p, q)  # integer Mod takes the divisor's sign


@op("Pow")
def _pow(ctx, x, a):
    base, exp = ctx.t(x[0]), ctx.t(x[1])
    if isinstance(x[1], Const) and exp.numel() == 1 and base.dtype.is_floating_point:
        e = float(scalar(x[1]))
        if e == 2.0:
            return base * base
        return torch.pow(base, e)
    return torch.pow(base, exp.to(base.dtype) if base.dtype.is_floating_point else exp).to(base.dtype)


for _name, _fn in {
    "Neg": torch.neg, "Abs": torch.abs, "Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log,
    "Tanh": torch.tanh, "Sigmoid": torch.sigmoid, "Relu": torch.relu, "Erf": torch.erf, "Sin": torch.sin,
    "Cos": torch.cos, "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil,
    "Not": torch.logical_not, "IsNaN": torch.isnan, "Sign": torch.sign, "Round": torch.round,
    "Softplus": F.softplus, "Identity": lambda t: t,
}.items():
    op(_name)((lambda f: lambda ctx, x, a: f(ctx.t(x[0])))(_fn))


@op("IsInf")
def _isinf(ctx, x, a):
    t = ctx.t(x[0])
    pos, neg = a.get("detect_positive", 1), a.get("detect_negative", 1)
    return (torch.isposinf(t) & bool(pos)) | (torch.isneginf(t) & bool(neg))


def _variadic_of(name: str) -> OpFn:
    fn = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[name]

    def run(ctx, x, a):
        ts = [ctx.t(v) for v in x if v is not None]
        out = ts[0]
        for t in ts[1:]:
            out = fn(out, t)
        return out / len(ts) if name == "Mean" else out

    return run


for _name in ("Max", "Min", "Sum", "Mean"):
    op(_name)(_variadic_of(_name))


@op("Clip")
def _clip(ctx, x, a):
    t = ctx.t(x[0])
    if ctx.opset < 11:
        return torch.clamp(t, a.get("min", -math.inf), a.get("max", math.inf))
    lo = ctx.t(x[1]) if len(x) > 1 and x[1] is not None else None
    hi = ctx.t(x[2]) if len(x) > 2 and x[2] is not None else None
    return torch.clamp(t, lo, hi)


@op("Where")
def _where(ctx, x, a):
    return torch.where(ctx.t(x[0]), ctx.t(x[1]), ctx.t(x[2]))


@op("Cast")
def _cast(ctx, x, a):
    return ctx.t(x[0]).to(torch_dtype(a["to"]))


@op("CastLike")
def _castlike(ctx, x, a):
    return ctx.t(x[0]).to(ctx.t(x[1]).dtype)


@op("Gelu")
def _gelu(ctx, x, a):
    return F.gelu(ctx.t(x[0]), approximate="tanh" if a.get("approximate", "none") == "tanh" else "none")


@op("Gelu", domain="com.microsoft")
def _ms_gelu(ctx, x, a):
    return F.gelu(ctx.t(x[0]))


@op("BiasGelu", domain="com.microsoft")
def _bias_gelu(ctx, x, a):
    return F.gelu(ctx.t(x[0]) + ctx.t(x[1]))


@op("FastGelu", domain="com.microsoft")
def _fast_gelu(ctx, x, a):
    t = ctx.t(x[0])
    if len(x) > 1 and x[1] is not None:
        t = t + ctx.t(x[1])
    return F.gelu(t, approximate="tanh")


@op("QuickGelu", domain="com.microsoft")
def _quick_gelu(ctx, x, a):
    t = ctx.t(x[0])
    return t * torch.sigmoid(a.get("alpha", 1.702) * t)


@op("Dropout")
def _dropout(ctx, x, a):
    t = ctx.t(x[0])
    ratio = float(scalar(x[1])) if len(x) > 1 and x[1] is not None else a.get("ratio", 0.5)
    training = bool(scalar(x[2])) if len(x) > 2 and x[2] is not None else ctx.training
    if not training or ratio == 0:
        return t, torch.ones_like(t, dtype=torch.bool)
    keep = torch.rand_like(t, dtype=torch.float32) >= ratio
    return t * keep / (1 - ratio), keep


# ---- constants and shapes ------------------------------------------------------------------------


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
    axis = _axis(a.get("axis", 1), t.dim())
    return t.reshape(math.prod(t.shape[:axis]), math.prod(t.shape[axis:]))


@op("Expand")
def _expand(ctx, x, a):
    t = ctx.t(x[0])
    return t.expand(torch.broadcast_shapes(tuple(t.shape), tuple(ints(x[1]))))


@op("Tile")
def _tile(ctx, x, a):
    return ctx.t(x[0]).repeat(ints(x[1]))


def _axes_input(ctx: Ctx, x: list, a: dict, since: int) -> list[int] | None:
    if ctx.opset >= since:
        return ints(x[1]) if len(x) > 1 and x[1] is not None else None
    return a.get("axes")


@op("Unsqueeze")
def _unsqueeze(ctx, x, a):
    t = ctx.t(x[0])
    axes = _axes_input(ctx, x, a, 13)
    rank = t.dim() + len(axes)
    for ax in sorted(_axis(i, rank) for i in axes):
        t = t.unsqueeze(ax)
    return t


@op("Squeeze")
def _squeeze(ctx, x, a):
    t = ctx.t(x[0])
    axes = _axes_input(ctx, x, a, 13)
    if axes is None:
        return t.squeeze()
    return t.squeeze(tuple(_axis(i, t.dim()) for i in axes)) if axes else t


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
    axis = _axis(a.get("axis", 0), t.dim())
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
        ax = _axis(ax, t.dim())
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
    ax = _axis(int(scalar(x[1])), t.dim())
    if a.get("reverse", 0):
        t = t.flip(ax)
    out = torch.cumsum(t, ax)
    if a.get("exclusive", 0):
        out = out - t
    return out.flip(ax) if a.get("reverse", 0) else out.to(t.dtype)


# ---- indexing ------------------------------------------------------------------------------------


def _wrap(idx: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.where(idx < 0, idx + dim, idx)


@op("Gather")
def _gather(ctx, x, a):
    data = ctx.t(x[0])
    axis = _axis(a.get("axis", 0), data.dim())
    if isinstance(x[1], Const):
        idx = [i + data.shape[axis] if i < 0 else i for i in x[1].ints()]
        if not x[1].shape:
            return data.select(axis, idx[0])
        flat = torch.tensor(idx, dtype=torch.int64, device=data.device)
        out = data.index_select(axis, flat)
        return out.reshape(data.shape[:axis] + x[1].shape + data.shape[axis + 1 :])
    idx = _wrap(x[1].to(torch.int64), data.shape[axis])
    if axis == 0 and data.dim() == 2 and data.dtype.is_floating_point:
        return F.embedding(idx, data)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape(data.shape[:axis] + idx.shape + data.shape[axis + 1 :])


@op("GatherElements")
def _gather_elements(ctx, x, a):
    data = ctx.t(x[0])
    axis = _axis(a.get("axis", 0), data.dim())
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
    axis = _axis(a.get("axis", 0), data.dim())
    idx = _wrap(idx, data.shape[axis])
    red = a.get("reduction", "none")
    if red == "none":
        return data.scatter(axis, idx, upd)
    return data.scatter_reduce(axis, idx, upd, {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}[red])


# ---- reductions, normalization, softmax ------------------------------------------------------------


def _reduce_of(fn: Callable, since: int) -> OpFn:
    def run(ctx, x, a):
        t = ctx.t(x[0])
        axes = _axes_input(ctx, x, a, since)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return t
            axes = list(range(t.dim()))
        axes = [_axis(i, t.dim()) for i in axes]
        return fn(t, axes, keep)

    return run


def _amax(t, axes, keep):
    return torch.amax(t, dim=axes, keepdim=keep)


def _amin(t, axes, keep):
    return torch.amin(t, dim=axes, keepdim=keep)


def _prod(t, axes, keep):
    for ax in sorted(axes, reverse=True):
        t = torch.prod(t, dim=ax, keepdim=keep)
    return t


op("ReduceMean")(_reduce_of(lambda t, ax, k: torch.mean(t, dim=ax, keepdim=k), 18))
op("ReduceSum")(_reduce_of(lambda t, ax, k: torch.sum(t, dim=ax, keepdim=k), 13))
op("ReduceMax")(_reduce_of(_amax, 18))
op("ReduceMin")(_reduce_of(_amin, 18))
op("ReduceProd")(_reduce_of(_prod, 18))
op("ReduceL2")(_reduce_of(lambda t, ax, k: torch.sqrt(torch.sum(t * t, dim=ax, keepdim=k)), 18))
op("ReduceSumSquare")(_reduce_of(lambda t, ax, k: torch.sum(t * t, dim=ax, keepdim=k), 18))


def _arg_of(fn: Callable) -> OpFn:
    def run(ctx, x, a):
        t = ctx.t(x[0])
        axis = _axis(a.get("axis", 0), t.dim())
        if a.get("select_last_index", 0):
            flipped = fn(t.flip(axis), dim=axis, keepdim=bool(a.get("keepdims", 1)))
            return t.shape[axis] - 1 - flipped
        return fn(t, dim=axis, keepdim=bool(a.get("keepdims", 1)))

    return run


op("ArgMax")(_arg_of(torch.argmax))
op("ArgMin")(_arg_of(torch.argmin))


def _softmax_of(fn: Callable) -> OpFn:
    def run(ctx, x, a):
        t = ctx.t(x[0])
        if ctx.opset >= 13:
            return fn(t, dim=a.get("axis", -1))
        axis = _axis(a.get("axis", 1), t.dim())  # before 13: flatten to 2-D at axis
        flat = t.reshape(math.prod(t.shape[:axis]), -1)
        return fn(flat, dim=1).reshape(t.shape)

    return run


op("Softmax")(_softmax_of(torch.softmax))
op("LogSoftmax")(_softmax_of(torch.log_softmax))


def _layer_norm(t: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, axis: int, eps: float,
                stash_fp32: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    axis = _axis(axis, t.dim())
    red = list(range(axis, t.dim()))
    h = t.float() if stash_fp32 else t
    mean = h.mean(dim=red, keepdim=True)
    var = ((h - mean) ** 2).mean(dim=red, keepdim=True)
    inv = torch.rsqrt(var + eps)
    return (h - mean) * inv, mean, inv


@op("LayerNormalization")
def _layer_normalization(ctx, x, a):
    t, scale = ctx.t(x[0]), ctx.t(x[1])
    bias = ctx.t(x[2]) if len(x) > 2 else None
    axis, eps = _axis(a.get("axis", -1), t.dim()), a.get("epsilon", 1e-5)
    norm_shape = tuple(t.shape[axis:])
    if ctx.n_outputs == 1 and tuple(scale.shape) == norm_shape and (bias is None or tuple(bias.shape) == norm_shape):
        return F.layer_norm(t, norm_shape, scale, bias, eps)
    y, mean, inv = _layer_norm(t, scale, bias, axis, eps, a.get("stash_type", 1) == 1)
    y = y.to(t.dtype) * scale
    if bias is not None:
        y = y + bias
    return y, mean, inv


@op("RMSNormalization")
def _rms_normalization(ctx, x, a):
    t, scale = ctx.t(x[0]), ctx.t(x[1])
    axis, eps = _axis(a.get("axis", -1), t.dim()), a.get("epsilon", 1e-5)
    h = t.float() if a.get("stash_type", 1) == 1 else t
    red = list(range(axis, t.dim()))
    y = h * torch.rsqrt((h * h).mean(dim=red, keepdim=True) + eps)
    return y.to(t.dtype) * scale


@op("SimplifiedLayerNormalization")
def _simplified_ln(ctx, x, a):
    return _rms_normalization(ctx, x, a)


def _skip_ln_of(simplified: bool) -> OpFn:
    def run(ctx, x, a):
        t, skip, gamma = ctx.t(x[0]), ctx.t(x[1]), ctx.t(x[2])
        rest = [ctx.t(v) if v is not None else None for v in x[3:]]
        beta = None if simplified else (rest[0] if rest else None)
        bias = (rest[0] if simplified else (rest[1] if len(rest) > 1 else None)) if rest else None
        s = t + skip
        if bias is not None:
            s = s + bias
        eps = a.get("epsilon", 1e-12)
        h = s.float()
        if simplified:
            inv = torch.rsqrt((h * h).mean(-1, keepdim=True) + eps)
            mean = torch.zeros_like(inv)
            y = (h * inv).to(s.dtype) * gamma
        else:
            mean = h.mean(-1, keepdim=True)
            inv = torch.rsqrt(((h - mean) ** 2).mean(-1, keepdim=True) + eps)
            y = ((h - mean) * inv).to(s.dtype) * gamma
            if beta is not None:
                y = y + beta
        return y, mean, inv, s

    return run


op("SkipLayerNormalization", domain="com.microsoft")(_skip_ln_of(False))
op("SkipSimplifiedLayerNormalization", domain="com.microsoft")(_skip_ln_of(True))


# ---- matmuls ---------------------------------------------------------------------------------------


@op("MatMul")
def _matmul(ctx, x, a):
    return torch.matmul(ctx.t(x[0]), ctx.t(x[1]))


@op("Gemm")
def _gemm(ctx, x, a):
    p, q = ctx.t(x[0]), ctx.t(x[1])
    if a.get("transA", 0):
        p = p.t()
    c = ctx.t(x[2]) if len(x) > 2 and x[2] is not None else None
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    if a.get("transB", 0) and alpha == 1.0 and c is not None and beta == 1.0:
        return F.linear(p, q, c)  # the common exported nn.Linear, one fused kernel
    q = q.t() if a.get("transB", 0) else q
    y = p @ q
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


@op("FusedMatMul", domain="com.microsoft")
def _fused_matmul(ctx, x, a):
    if a.get("transBatchA", 0) or a.get("transBatchB", 0):
        raise UnsupportedError("com.microsoft.FusedMatMul with transBatchA/transBatchB is not supported")
    p, q = ctx.t(x[0]), ctx.t(x[1])
    if a.get("transA", 0):
        p = p.transpose(-1, -2)
    if a.get("transB", 0):
        q = q.transpose(-1, -2)
    y = torch.matmul(p, q)
    alpha = a.get("alpha", 1.0)
    return y * alpha if alpha != 1.0 else y


@op("Einsum")
def _einsum(ctx, x, a):
    return torch.einsum(a["equation"].replace(" ", ""), *[ctx.t(v) for v in x])


# ---- quantized weights -----------------------------------------------------------------------------


@op("DequantizeLinear")
def _dequantize_linear(ctx, x, a):
    q, s = ctx.t(x[0]), ctx.t(x[1])
    zp = ctx.t(x[2]) if len(x) > 2 and x[2] is not None else None
    out_dtype = s.dtype if not a.get("output_dtype") else torch_dtype(a["output_dtype"])
    h = q.to(torch.float32)
    if zp is not None:
        zp = zp.to(torch.float32)
    sf = s.to(torch.float32)
    if s.numel() > 1:
        axis = _axis(a.get("axis", 1), q.dim())
        block = a.get("block_size", 0)
        if block:
            # blocked: scale has q's shape with ceil(dim/block) along axis
            sf = sf.repeat_interleave(block, dim=axis).narrow(axis, 0, q.shape[axis])
            if zp is not None:
                zp = zp.repeat_interleave(block, dim=axis).narrow(axis, 0, q.shape[axis])
        else:
            shape = [1] * q.dim()
            shape[axis] = -1
            sf = sf.reshape(shape)
            zp = zp.reshape(shape) if zp is not None else None
    if zp is not None:
        h = h - zp
    return (h * sf).to(out_dtype)


# MatMulBnb4 and MatMulNBits in lora_fx's own layouts run as lora_fx's quantized linear ops: W decoded a
# tile at a time and decoded again in backward instead of saved, so training through an ONNX file's
# 4-bit weights keeps no float copy of them alive across the step (torch.matmul on a decoded W would
# save that W for its backward, one per layer). Other layouts take the plain decode below. int8 weights
# (DequantizeLinear -> [Transpose ->] MatMul / Gemm) get the same treatment from runtime/int8_linear.
_TRAINING_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _quant_ops() -> Any:
    import lora_fx.passes.fx.quantize_weights  # noqa: F401  (registers the ops)

    return torch.ops.lora_fx


def _training_int4(inp: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zp: torch.Tensor | None,
                   n: int, k: int, block: int, n_blocks: int) -> torch.Tensor | None:
    """MatMulNBits through ``lora_fx::linear_int4`` where the layouts agree, else None."""
    # Blocks along each row of W [N, K] are lora_fx's blocks over W flattened when K is a whole number
    # of blocks; 4-bit zero points pack the same way when each row holds an even number of blocks.
    if k % block or block % 2 or inp.dtype not in _TRAINING_DTYPES:
        return None
    if zp is not None and (zp.dtype != torch.uint8 or n_blocks % 2):
        return None
    return _quant_ops().linear_int4(inp, packed.reshape(-1), scales.reshape(-1).to(torch.float32),
                                    zp.reshape(-1) if zp is not None else None, None, n, k, block)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 bytes -> 4-bit values, low nibble first (ORT's packing)."""
    p = packed.to(torch.int32)
    return torch.stack((p % 16, p // 16), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


@op("MatMulNBits", domain="com.microsoft")
def _matmul_nbits(ctx, x, a):
    inp = ctx.t(x[0])
    packed, scales = ctx.t(x[1]), ctx.t(x[2])
    zp = ctx.t(x[3]) if len(x) > 3 and x[3] is not None else None
    if len(x) > 4 and any(v is not None for v in x[4:]):
        raise UnsupportedError("com.microsoft.MatMulNBits with g_idx or bias inputs is not supported")
    n, k, bits, block = a["N"], a["K"], a.get("bits", 4), a["block_size"]
    if bits != 4:
        raise UnsupportedError(f"com.microsoft.MatMulNBits with bits={bits} is not supported (only 4)")
    n_blocks = -(-k // block)
    fast = _training_int4(inp, packed, scales, zp, n, k, block, n_blocks)
    if fast is not None:
        return fast
    q = _unpack_nibbles(packed.reshape(n, n_blocks, -1)).to(torch.float32)  # [N, blocks, block]
    sc = scales.reshape(n, n_blocks, 1).to(torch.float32)
    if zp is None:
        z = torch.full_like(sc, 8.0)
    elif zp.dtype == torch.uint8:
        z = _unpack_nibbles(zp.reshape(n, -1))[:, :n_blocks].reshape(n, n_blocks, 1).to(torch.float32)
    else:
        z = zp.reshape(n, n_blocks, 1).to(torch.float32)
    w = ((q - z) * sc).reshape(n, -1)[:, :k]  # [N, K]
    return torch.matmul(inp, w.to(inp.dtype).t())


_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
_FP4 = [0.0, 0.0052083333, 0.6666667, 1.0, 0.3333333, 0.5, 0.1666667, 0.25,
        -0.0, -0.0052083333, -0.6666667, -1.0, -0.3333333, -0.5, -0.1666667, -0.25]


@op("MatMulBnb4", domain="com.microsoft")
def _matmul_bnb4(ctx, x, a):
    inp, packed, absmax = ctx.t(x[0]), ctx.t(x[1]), ctx.t(x[2])
    n, k, block, quant_type = a["N"], a["K"], a["block_size"], a.get("quant_type", 1)
    if quant_type == 1 and a.get("transB", 1) != 0 and block % 2 == 0 and inp.dtype in _TRAINING_DTYPES:
        # W [N, K] flattened in absmax blocks, high nibble first: lora_fx's own nf4 layout.
        n_blocks = -(-(n * k) // block)
        flat = packed.reshape(-1)
        if flat.numel() < n_blocks * block // 2:  # the op's bytes stop at N*K codes; the decode reads whole blocks
            flat = F.pad(flat, (0, n_blocks * block // 2 - flat.numel()))
        return _quant_ops().linear_nf4(inp, flat, absmax.reshape(-1)[:n_blocks].to(torch.float32), None, None, None,
                                       n, k, block, 1)
    table = torch.tensor(_NF4 if quant_type == 1 else _FP4, dtype=torch.float32, device=inp.device)
    p = packed.reshape(-1).to(torch.int32)
    codes = torch.stack((p // 16, p % 16), dim=-1).reshape(-1)[: n * k]  # bnb packs the high nibble first
    vals = table[codes].reshape(-1, block) if (n * k) % block == 0 else None
    if vals is None:
        codes_pad = F.pad(table[codes], (0, (-(n * k)) % block))
        vals = codes_pad.reshape(-1, block)
    w = (vals * absmax.to(torch.float32).reshape(-1, 1)).reshape(-1)[: n * k].reshape(n, k)
    if a.get("transB", 1) == 0:
        w = w.reshape(k, n).t()
    return torch.matmul(inp, w.to(inp.dtype).t())


# ---- attention -------------------------------------------------------------------------------------


def _repeat_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    return k if k.shape[1] == heads else k.repeat_interleave(heads // k.shape[1], dim=1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
            softcap: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v over [B, H, S, D]; a row masked everywhere gives zeros."""
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    if not softcap:
        if bias is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if bias.dtype == torch.bool:
            bias = torch.where(bias, 0.0, float("-inf")).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        return torch.where(torch.isneginf(bias).all(-1, keepdim=True), 0.0, out) if bias.is_floating_point() else out
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s + (torch.where(bias, 0.0, float("-inf")) if bias.dtype == torch.bool else bias)
    p = torch.softmax(s, dim=-1)
    return torch.matmul(torch.nan_to_num(p, nan=0.0), v)


def _causal_bias(q_len: int, kv_len: int, offset: int | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    i = torch.arange(q_len, device=device).view(-1, 1)
    j = torch.arange(kv_len, device=device).view(1, -1)
    return torch.where(j <= i + offset, 0.0, float("-inf")).to(dtype)


def _heads(t: torch.Tensor, n: int) -> torch.Tensor:
    b, s, h = t.shape
    return t.reshape(b, s, n, h // n).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, s, d = t.shape
    return t.transpose(1, 2).reshape(b, s, h * d)


@op("Attention")
def _attention(ctx, x, a):
    q, k, v = (ctx.t(t) for t in x[:3])
    mask = ctx.t(x[3]) if len(x) > 3 else None
    past_k = ctx.t(x[4]) if len(x) > 4 else None
    past_v = ctx.t(x[5]) if len(x) > 5 else None
    nonpad = ctx.t(x[6]) if len(x) > 6 else None  # opset 24: valid keys per batch row, padding after them
    if nonpad is not None and past_k is not None:
        raise UnsupportedError("Attention with both nonpad_kv_seqlen and past_key, which the ONNX spec forbids")
    if a.get("left_window_size", -1) >= 0 or a.get("right_window_size", -1) >= 0:
        raise UnsupportedError("Attention with left_window_size / right_window_size (opset-25 sliding windows) is not "
                               "supported; ONNX Runtime 1.31 does not run it either")
    if a.get("qk_matmul_output_mode", 0) and ctx.n_outputs > 3:
        raise UnsupportedError("Attention with a qk_matmul_output output is not supported")
    three_d = q.dim() == 3
    if three_d:
        q = _heads(q, a["q_num_heads"])
        k = _heads(k, a["kv_num_heads"])
        v = _heads(v, a["kv_num_heads"])
    if past_k is not None:
        k = torch.cat((past_k, k), dim=2)
        v = torch.cat((past_v, v), dim=2)
    present_k, present_v = k, v
    scale = a.get("scale", 1.0 / math.sqrt(q.shape[-1]))
    q_len, kv_len = q.shape[2], k.shape[2]
    bias = mask
    if bias is not None and bias.shape[-1] < kv_len:
        pad = kv_len - bias.shape[-1]
        bias = F.pad(bias, (0, pad), value=False if bias.dtype == torch.bool else float("-inf"))
    extra = []
    if nonpad is not None:
        keys = torch.arange(kv_len, device=q.device).view(1, 1, 1, -1)
        extra.append(torch.where(keys < nonpad.view(-1, 1, 1, 1), 0.0, float("-inf")).to(q.dtype))
    if a.get("is_causal", 0):
        # Bottom-right aligned: query i sees keys j <= i + offset, offset = the keys before the query block
        # (the past, or per row nonpad_kv_seqlen - q_len for an external cache; 0 without either).
        offset: Any = past_k.shape[2] if past_k is not None else 0
        if nonpad is not None:
            offset = nonpad.view(-1, 1, 1, 1) - q_len
        extra.append(_causal_bias(q_len, kv_len, offset, q.dtype, q.device))
    for e in extra:
        if bias is None:
            bias = e
        else:
            bias = (torch.where(bias, 0.0, float("-inf")).to(q.dtype) if bias.dtype == torch.bool else bias) + e
    softmax_dtype = torch_dtype(a["softmax_precision"]) if a.get("softmax_precision") else q.dtype
    if softmax_dtype != q.dtype:
        out = _attend(q.to(softmax_dtype), k.to(softmax_dtype), v.to(softmax_dtype),
                      bias.to(softmax_dtype) if bias is not None and bias.is_floating_point() else bias,
                      scale, a.get("softcap", 0.0)).to(q.dtype)
    else:
        out = _attend(q, k, v, bias, scale, a.get("softcap", 0.0))
    if three_d:
        out = _merge_heads(out)
    return out, present_k, present_v


@op("MultiHeadAttention", domain="com.microsoft")
def _ms_multi_head_attention(ctx, x, a):
    get = lambda i: ctx.t(x[i]) if len(x) > i and x[i] is not None else None  # noqa: E731
    q, k, v, bias, kpm, rel, past_k, past_v = (get(i) for i in range(8))
    n = a["num_heads"]
    if k is None or v is None or k.dim() != 3 or q.dim() != 3:
        raise UnsupportedError("com.microsoft.MultiHeadAttention with packed QKV/KV inputs is not supported")
    if bias is not None:
        d = q.shape[-1]
        q, k, v = q + bias[:d], k + bias[d : 2 * d], v + bias[2 * d :]
    q, k, v = _heads(q, n), _heads(k, n), _heads(v, n)
    if past_k is not None:
        k, v = torch.cat((past_k, k), 2), torch.cat((past_v, v), 2)
    scale = a.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    attn_bias = _ms_key_padding_bias(kpm, q, k.shape[2], a.get("mask_filter_value", -10000.0))
    if rel is not None:
        attn_bias = rel if attn_bias is None else attn_bias + rel
    if a.get("unidirectional", 0):
        c = _causal_bias(q.shape[2], k.shape[2], k.shape[2] - q.shape[2], q.dtype, q.device)
        attn_bias = c if attn_bias is None else attn_bias + c
    out = _merge_heads(_attend(q, k, v, attn_bias, scale))
    return out, k, v


def _ms_key_padding_bias(mask: torch.Tensor | None, q: torch.Tensor, kv_len: int, filter_value: float) -> torch.Tensor | None:
    """com.microsoft masks: 1 keeps, 0 masks (with mask_filter_value, not -inf)."""
    if mask is None:
        return None
    if mask.dim() == 2:  # [B, kv]
        m = mask.view(mask.shape[0], 1, 1, mask.shape[1])
    elif mask.dim() == 3:  # [B, q, kv]
        m = mask.unsqueeze(1)
    else:
        raise UnsupportedError(f"com.microsoft attention mask of rank {mask.dim()} is not supported")
    return torch.where(m.to(torch.bool), 0.0, filter_value).to(q.dtype)


@op("Attention", domain="com.microsoft")
def _ms_attention(ctx, x, a):
    get = lambda i: ctx.t(x[i]) if len(x) > i and x[i] is not None else None  # noqa: E731
    inp, w, bias, mask, past, rel = (get(i) for i in range(6))
    if past is not None or a.get("past_present_share_buffer", 0):
        raise UnsupportedError("com.microsoft.Attention with past state is not supported")
    n = a["num_heads"]
    sizes = a.get("qkv_hidden_sizes") or [w.shape[1] // 3] * 3
    qkv = torch.matmul(inp, w)
    if bias is not None:
        qkv = qkv + bias
    q, k, v = torch.split(qkv, sizes, dim=-1)
    q, k, v = _heads(q, n), _heads(k, n), _heads(v, n)
    scale = a.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    attn_bias = _ms_key_padding_bias(mask, q, k.shape[2], a.get("mask_filter_value", -10000.0))
    if rel is not None:
        attn_bias = rel if attn_bias is None else attn_bias + rel
    if a.get("unidirectional", 0):
        c = _causal_bias(q.shape[2], k.shape[2], 0, q.dtype, q.device)
        attn_bias = c if attn_bias is None else attn_bias + c
    return _merge_heads(_attend(q, k, v, attn_bias, scale))


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, dim: int) -> torch.Tensor:
    """Rotary embedding on [B, S, H, D] with cos/sin [B or 1, S, 1, dim/2]."""
    rot, rest = t[..., :dim], t[..., dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot.chunk(2, dim=-1)
    real = cos * x1 - sin * x2
    imag = sin * x1 + cos * x2
    if interleaved:
        rot = torch.stack((real, imag), dim=-1).reshape(rot.shape)
    else:
        rot = torch.cat((real, imag), dim=-1)
    return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


@op("RotaryEmbedding")
def _rotary_embedding(ctx, x, a):
    t, cos, sin = ctx.t(x[0]), ctx.t(x[1]), ctx.t(x[2])
    pos = ctx.t(x[3]) if len(x) > 3 and x[3] is not None else None
    shape = t.shape
    heads = a.get("num_heads", 0)  # needed for 3-D input only; 4-D carries its heads
    h = t.transpose(1, 2) if t.dim() == 4 else t.reshape(shape[0], shape[1], heads, -1)
    dim = a.get("rotary_embedding_dim", 0) or h.shape[-1]
    if pos is not None:
        cos, sin = cos[pos], sin[pos]
    out = _rotate(h, cos.unsqueeze(2), sin.unsqueeze(2), bool(a.get("interleaved", 0)), dim)
    return out.transpose(1, 2) if t.dim() == 4 else out.reshape(shape)


@op("RotaryEmbedding", domain="com.microsoft")
def _ms_rotary_embedding(ctx, x, a):
    t, pos, cos, sin = ctx.t(x[0]), ctx.t(x[1]), ctx.t(x[2]), ctx.t(x[3])
    shape = t.shape
    n = a.get("num_heads", 0)  # needed for 3-D input only; 4-D carries its heads
    if t.dim() == 4:  # [B, H, S, D]
        h = t.transpose(1, 2)
    else:
        n = n or shape[-1] // (cos.shape[-1] * 2)
        h = t.reshape(shape[0], shape[1], n, -1)
    s = h.shape[1]
    if pos.numel() == 1:
        cos, sin = cos[int(scalar(x[1])) : int(scalar(x[1])) + s].unsqueeze(0), sin[int(scalar(x[1])) : int(scalar(x[1])) + s].unsqueeze(0)
    else:
        cos, sin = cos[pos], sin[pos]
    dim = a.get("rotary_embedding_dim", 0) or cos.shape[-1] * 2
    out = _rotate(h, cos.unsqueeze(2), sin.unsqueeze(2), bool(a.get("interleaved", 0)), dim)
    return out.transpose(1, 2) if t.dim() == 4 else out.reshape(shape)


@op("GroupQueryAttention", domain="com.microsoft")
def _ms_group_query_attention(ctx, x, a):
    get = lambda i: ctx.t(x[i]) if len(x) > i and x[i] is not None else None  # noqa: E731
    q, k, v, past_k, past_v, seqlens_k, total_len, cos, sin = (get(i) for i in range(9))
    n, kv_n = a["num_heads"], a["kv_num_heads"]
    if a.get("smooth_softmax", -1) == 1:  # ONNX Runtime turns it on at 1 only (0 and -1 are off)
        raise UnsupportedError("com.microsoft.GroupQueryAttention with smooth_softmax=1 is not supported")
    if k is None:  # packed QKV
        d = q.shape[-1] // (n + 2 * kv_n)
        q, k, v = torch.split(q, [n * d, kv_n * d, kv_n * d], dim=-1)
    q, k, v = _heads(q, n), _heads(k, kv_n), _heads(v, kv_n)
    b, _, s, d = q.shape
    past_len = past_k.shape[2] if past_k is not None else 0
    if past_len and s != 1:
        raise UnsupportedError("com.microsoft.GroupQueryAttention with a past state and a multi-token query is not supported")
    total = int(scalar(x[6])) if x[6] is not None else past_len + s
    if a.get("do_rotary", 0):
        # each sequence's positions start after its own past
        lengths = seqlens_k.to(torch.int64).view(-1) + 1
        start = (lengths - s).clamp(min=0) if past_len else torch.zeros_like(lengths)
        pos = start.view(-1, 1) + torch.arange(s, device=q.device).view(1, -1)
        inter = bool(a.get("rotary_interleaved", 0))
        dim = cos.shape[-1] * 2
        q = _rotate(q.transpose(1, 2), cos[pos].unsqueeze(2), sin[pos].unsqueeze(2), inter, dim).transpose(1, 2)
        k = _rotate(k.transpose(1, 2), cos[pos].unsqueeze(2), sin[pos].unsqueeze(2), inter, dim).transpose(1, 2)
    if past_k is not None:
        k, v = torch.cat((past_k, k), 2), torch.cat((past_v, v), 2)
    kv_len = k.shape[2]
    lengths = seqlens_k.to(torch.int64).view(-1, 1, 1, 1) + 1  # valid keys per sequence
    j = torch.arange(kv_len, device=q.device).view(1, 1, 1, -1)
    i = torch.arange(s, device=q.device).view(1, 1, -1, 1)
    if past_len:  # decoding: the new tokens sit at the end of each sequence's valid keys
        allowed = (j < lengths) & (j <= i + (lengths - s))
    else:  # prompt: plain causal from the first token (right padding only affects padded rows)
        allowed = (j <= i) & (j < lengths)
    if a.get("local_window_size", -1) > 0:
        allowed = allowed & (j > i + (lengths - s) - a["local_window_size"])
    bias = torch.where(allowed, 0.0, float("-inf")).to(q.dtype)
    scale = a.get("scale") or 1.0 / math.sqrt(d)
    out = _attend(q, k, v, bias, scale, a.get("softcap", 0.0))
    del total
    return _merge_heads(out), k, v


# ---- the module ------------------------------------------------------------------------------------


_DATA_SHAPED_OPS = {"NonZero", "Unique", "Compress", "TopK", "NonMaxSuppression"}
# inputs read as Python ints: when such an input is not a shape constant, the output shape depends on data
_SHAPE_INPUTS = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4), "Split": (1,), "Unsqueeze": (1,), "Squeeze": (1,), "Trilu": (1,), "CumSum": (1,),
}


def _attr_value(attr: Any) -> Any:
    import onnx_ir as ir

    t = attr.type
    if t == ir.AttributeType.TENSOR:
        return _to_torch(attr.value)
    if t in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        return attr.value
    if t == ir.AttributeType.INTS or t == ir.AttributeType.FLOATS or t == ir.AttributeType.STRINGS:
        return list(attr.value)
    return attr.value


def _to_torch(tensor: Any, share: bool = False) -> torch.Tensor:
    """An onnx_ir tensor as a torch tensor (4-bit types unpacked to one int8/uint8 per value).

    ``share``: use the tensor's own memory where it is a writable numpy array (what ``lora_fx.load``
    gives), so a frozen weight is held once, not once by the model and once by torch. Read-only
    memory (a view into a parsed protobuf) is copied: torch cannot share it.
    """
    import onnx_ir as ir

    dtype = tensor.dtype
    if dtype == ir.DataType.STRING:
        raise UnsupportedError(f"string tensor {tensor.name!r} cannot run in torch")
    arr = tensor.numpy()
    share = share and arr.flags.writeable and arr.flags.c_contiguous
    if dtype == ir.DataType.BFLOAT16:
        bits = arr.view(np.uint16) if share else np.ascontiguousarray(arr).view(np.uint16).copy()
        return torch.from_numpy(bits).view(torch.bfloat16)
    if dtype in (ir.DataType.INT4, ir.DataType.UINT4):
        return torch.from_numpy(arr.astype(np.int8 if dtype == ir.DataType.INT4 else np.uint8))
    return torch.from_numpy(arr if share else np.array(arr, copy=True))


def _from_torch(t: torch.Tensor, dtype: Any, name: str) -> Any:
    import onnx_ir as ir

    t = t.detach().cpu().contiguous()
    if dtype == ir.DataType.BFLOAT16:
        import ml_dtypes

        return ir.Tensor(t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16), name=name)
    return ir.Tensor(t.numpy().astype(dtype.numpy(), copy=True), name=name)


def check_supported(model: Any) -> None:
    """Raise ``UnsupportedError`` naming every op that cannot run, before anything runs."""
    missing: dict[tuple[str, str], str] = {}
    for node in model.graph:
        key = (node.domain or "", node.op_type)
        if key[0] == "ai.onnx":
            key = ("", key[1])
        if key not in OPS:
            missing.setdefault(key, node.name or "<unnamed>")
    if missing:
        listed = ", ".join(f"{op_type} (domain {dom or 'ai.onnx'}, node {name!r})" for (dom, op_type), name in missing.items())
        raise UnsupportedError(
            f"the ONNX graph uses ops lora_fx cannot execute in torch: {listed}. "
            "Ways out: re-export the model without these ops, or file an issue naming the op"
        )


def _safe_attr_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", name) or "t"
    if base[0].isdigit():
        base = "t_" + base
    out, i = base, 1
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out


def _lazy_compiler_disable(fn: Callable) -> Callable:
    """``torch.compiler.disable`` without importing torch._dynamo (seconds) when this module loads.

    torch's own lazy variant imports dynamo on the first call, and dynamo runs it eagerly (a graph
    break) when tracing; the pinned torch has it. Without it, the plain decorator is used.
    """
    lazy = getattr(torch._compile, "_disable_dynamo", None)
    return lazy(fn) if lazy is not None else torch.compiler.disable(fn)


class _Node:
    __slots__ = ("fn", "inputs", "outputs", "attrs", "opset", "label", "const_ok", "n_outputs", "op", "domain",
                 "attrs_checked", "free")


class _ReadAttrs(dict):
    """A node's attributes that remember which ones the op function looked at (its first call only)."""

    def __init__(self, attrs: dict) -> None:
        super().__init__(attrs)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.read.add(key)  # type: ignore[arg-type]
        return super().__contains__(key)


def _schema_default(n: "_Node", name: str) -> Any:
    """The schema's default for attribute ``name`` of ``n``'s op (ONNX's, or ONNX Runtime's for its contrib
    ops), or a sentinel when it has none."""
    import onnx

    if n.domain == "com.microsoft":
        return _contrib_defaults().get((n.op, name), _NO_DEFAULT)
    try:
        attr = onnx.defs.get_schema(n.op, n.opset, n.domain).attributes.get(name)
    except onnx.defs.SchemaError:
        return _NO_DEFAULT
    if attr is None or not attr.default_value.name:
        return _NO_DEFAULT
    return _attr_value_proto(attr.default_value)


_NO_DEFAULT = object()
# Attributes that choose how ONNX Runtime computes, not what: a float computation may leave them unread.
# A seed fixes which elements drop, not how dropout computes; torch draws from its own generator.
_HINTS = {("com.microsoft", "MatMulNBits", "accuracy_level"), ("com.microsoft", "MatMulBnb4", "training_mode"),
          ("", "Dropout", "seed")}


def _contrib_defaults() -> dict[tuple[str, str], Any]:
    global _CONTRIB_DEFAULTS
    if _CONTRIB_DEFAULTS is None:
        import onnx
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

        _CONTRIB_DEFAULTS = {}
        for schema in ort_c.get_all_operator_schema():
            if schema.domain != "com.microsoft":
                continue
            for name, attr in schema.attributes.items():
                proto = onnx.AttributeProto()
                proto.ParseFromString(attr._default_value)
                if proto.name:
                    _CONTRIB_DEFAULTS[(schema.name, name)] = _attr_value_proto(proto)
    return _CONTRIB_DEFAULTS


_CONTRIB_DEFAULTS: dict[tuple[str, str], Any] | None = None


def _attr_value_proto(proto: Any) -> Any:
    import onnx

    value = onnx.helper.get_attribute_value(proto)
    if isinstance(value, bytes):
        return value.decode()
    return list(value) if isinstance(value, (list, tuple)) else value


def _check_ignored_attrs(n: "_Node", attrs: _ReadAttrs) -> None:
    """Refuse an attribute the op's torch function never read unless it holds the schema's default: the
    function would otherwise compute the op without it, silently."""
    for name in set(attrs) - attrs.read:
        if (n.domain, n.op, name) in _HINTS:
            continue
        value, default = dict.__getitem__(attrs, name), _schema_default(n, name)
        if default is _NO_DEFAULT or value != default:
            raise UnsupportedError(
                f"{n.label}: lora_fx's torch execution of {n.op} does not implement its attribute {name}={value!r}, "
                "so it would compute the op without it. Re-export without it, or file an issue naming the op and attribute"
            )


class OnnxModule(torch.nn.Module):
    """An onnx_ir Model executed by torch. Call with graph inputs by name; returns ``{output name: tensor}``.

    Keyword arguments that name no graph input are ignored, so a training batch holding labels
    can be passed as it is.
    """

    def __init__(self, model: Any, trainable: Iterable[str] | None = None) -> None:
        import onnx_ir as ir

        super().__init__()
        check_supported(model)
        graph = model.graph
        for node in graph:
            for attr in node.attributes.values():
                if attr.type.name.startswith("GRAPH"):
                    raise UnsupportedError(
                        f"{node.op_type} node {node.name!r} holds a subgraph (control flow); lora_fx runs only "
                        "straight-line graphs. Way out: export with static control flow"
                    )
        self._model = model
        self._opsets = {("" if k == "ai.onnx" else k): v for k, v in model.opset_imports.items()}
        self.input_names = [v.name for v in graph.inputs if v.name not in graph.initializers]
        self.output_names = [v.name for v in graph.outputs]
        self.trainable_names = list(trainable_initializers(model) if trainable is None else trainable)
        taken: set[str] = set(dir(self))
        self._attr_of: dict[str, str] = {}
        init_consts: dict[str, Const] = {}
        for name, value in graph.initializers.items():
            if value.const_value is None:
                raise UnsupportedError(f"initializer {name!r} has no value; the model needs its data (the .onnx.data file) beside it")
            t = _to_torch(value.const_value, share=name not in self.trainable_names)  # adapters: copies, trained in place
            if isinstance(value.const_value, ir.ExternalTensor):
                # A read-only mapping of the data file, so t is a copy; unmapping the file's pages keeps them out
                # of the process's memory (the tensor maps the file again if it is read later).
                try:
                    value.const_value.release()
                except BufferError:  # another view of the mapping is alive: the pages stay
                    pass
            attr = _safe_attr_name(name, taken)
            self._attr_of[name] = attr
            if name in self.trainable_names:
                self.register_parameter(attr, torch.nn.Parameter(t))
            else:
                # frozen weights are not part of state_dict(): checkpoints hold only what trains
                self.register_buffer(attr, t, persistent=False)
                if not t.dtype.is_floating_point and t.numel() <= _CONST_LIMIT:
                    init_consts[name] = Const.of(t)
        missing = [n for n in self.trainable_names if n not in graph.initializers]
        if missing:
            raise ConfigError(f"trainable initializers not in the graph: {missing}")
        self._init_consts = init_consts
        self.int8_linears = find_int8_linears(graph)
        if self.int8_linears.refused:
            import warnings

            (first, why), more = next(iter(self.int8_linears.refused.items())), len(self.int8_linears.refused) - 1
            warnings.warn(
                f"{len(self.int8_linears.refused)} DequantizeLinear weight(s) of this graph are dequantized whole, so "
                f"training keeps a float copy of each for backward (lora_fx's int8 op takes 2-D int8 weights with one "
                f"scale per output channel and zero point 0): {first!r}: {why}" + (f" (and {more} more)" if more else ""),
                stacklevel=2,
            )
        fused = {}
        for hit in self.int8_linears.matched:
            # The op's own storage: q itself for lora_fx's [N, K] layout, else one int8 transposed copy.
            names = []
            for part, t in zip(("qweight", "qscale"), int8_storage(hit, self.tensor(hit.qweight), self.tensor(hit.scale))):
                name = f"{hit.consumer.name or hit.consumer.outputs[0].name}::int8_{part}"
                self._attr_of[name] = _safe_attr_name(name, taken)
                self.register_buffer(self._attr_of[name], t, persistent=False)
                names.append(name)
            fused[id(hit.consumer)] = (hit, names)
        self._nodes = self._compile(graph, set(init_consts), fused)
        self._shape_cache: dict[tuple, dict[str, Const]] = {}
        self._training_mode = False

    def _compile(self, graph: Any, const_inits: set[str], fused: dict[int, tuple[Int8Linear, list[str]]]) -> list[_Node]:
        candidates: set[str] = set(const_inits)  # values computable from input shapes alone
        data_shaped: set[str] = set()  # values whose shape depends on input data
        absorbed = {id(s) for hit, _ in fused.values() for s in hit.skipped}
        nodes = []
        for node in graph:
            if id(node) in absorbed:
                continue
            n = _Node()
            domain = "" if node.domain in ("", "ai.onnx") else node.domain
            n.fn = OPS[(domain, node.op_type)]
            n.inputs = [v.name if v is not None else None for v in node.inputs]
            if id(node) in fused:
                hit, storage = fused[id(node)]
                n.fn = run_int8_linear
                n.inputs = [hit.x.name, *storage] + ([hit.bias.name] if hit.bias is not None else [])
            while n.inputs and n.inputs[-1] is None:
                n.inputs.pop()
            n.outputs = [v.name if v is not None else "" for v in node.outputs]
            n.n_outputs = len(n.outputs)
            n.attrs = {k: _attr_value(v) for k, v in node.attributes.items()}
            if id(node) in fused:
                hit = fused[id(node)][0]
                n.attrs = {"N": hit.out_features, "K": hit.in_features}
            n.opset = self._opsets.get(domain, 1)
            n.label = f"{node.op_type} node {node.name!r}"
            n.op, n.domain, n.attrs_checked = node.op_type, domain, False
            real = [i for i in n.inputs if i]
            if node.op_type in ("Shape", "Size") and domain == "":
                ok = bool(real) and real[0] not in data_shaped
            elif node.op_type in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Dropout", "Multinomial", "Bernoulli"):
                ok = False
            else:
                ok = all(i in candidates for i in real)
            n.const_ok = ok
            if ok:
                candidates.update(o for o in n.outputs if o)
            shape_ins = _SHAPE_INPUTS.get(node.op_type, ())
            if (node.op_type in _DATA_SHAPED_OPS or any(i in data_shaped for i in real)
                    or any(j < len(n.inputs) and n.inputs[j] and n.inputs[j] not in candidates for j in shape_ins)):
                data_shaped.update(o for o in n.outputs if o)
            nodes.append(n)
        # Each value leaves the run's environment after its last reader (or, never read, right after it is made),
        # as the code torch.fx generates deletes dead values: a forward would otherwise hold every intermediate
        # tensor of the graph until it returns, not only those autograd saves.
        last: dict[str, int] = {}
        for k, n in enumerate(nodes):
            for name in n.outputs:
                if name:
                    last.setdefault(name, k)
            for name in n.inputs:
                if name:
                    last[name] = k
        for n in nodes:
            n.free = []
        keep = set(self.output_names)
        for name, k in last.items():
            if name not in keep:
                nodes[k].free.append(name)
        return nodes

    # ---- modes and write-back --------------------------------------------------------------
    def set_training_mode(self, training: bool) -> None:
        """Dropout nodes present in the graph drop when training; exported eval graphs have none."""
        self._training_mode = bool(training)
        self.train(training)

    def tensor(self, name: str) -> torch.Tensor:
        """The parameter or buffer holding initializer ``name``."""
        return getattr(self, self._attr_of[name])

    def named_adapters(self) -> dict[str, torch.nn.Parameter]:
        return {n: getattr(self, self._attr_of[n]) for n in self.trainable_names}

    def write_back(self) -> list[str]:
        """Copy the trained parameters into the onnx_ir Model's initializers; returns their names."""
        inits = self._model.graph.initializers
        for name, param in self.named_adapters().items():
            value = inits[name]
            value.const_value = _from_torch(param, value.const_value.dtype, name)
        return list(self.trainable_names)

    # ---- execution -------------------------------------------------------------------------
    def forward(self, **inputs: Any) -> dict[str, torch.Tensor]:
        feeds = self._feeds(inputs)
        key = tuple((n, tuple(t.shape)) for n, t in feeds.items())
        if torch.compiler.is_compiling():
            consts = self._consts_for(key, feeds)
            return self._run(feeds, consts, None)
        consts = self._shape_cache.get(key)
        if consts is None:
            record: dict[str, Const] = {}
            out = self._run(feeds, None, record)
            self._remember(key, record)
            return out
        return self._run(feeds, consts, None)

    def _remember(self, key: tuple, consts: dict[str, Const]) -> None:
        if len(self._shape_cache) >= _SHAPE_CACHE_SIZE:  # unpadded data: many shapes; keep the newest
            self._shape_cache.pop(next(iter(self._shape_cache)))
        self._shape_cache[key] = consts

    @_lazy_compiler_disable
    def _consts_for(self, key: tuple, feeds: dict[str, torch.Tensor]) -> dict[str, Const]:
        consts = self._shape_cache.get(key)
        if consts is None:
            consts = {}
            with torch.no_grad():
                self._run(feeds, None, consts)
            self._remember(key, consts)
        return consts

    def _feeds(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ConfigError(f"missing graph inputs {missing}; the graph takes {self.input_names}")
        out = {}
        for n in self.input_names:
            v = inputs[n]
            out[n] = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
        return out

    def _run(self, feeds: dict[str, torch.Tensor], consts: dict[str, Const] | None,
             record: dict[str, Const] | None) -> dict[str, torch.Tensor]:
        env: dict[str, Any] = {n: getattr(self, a) for n, a in self._attr_of.items()}
        env.update(self._init_consts)
        env.update(feeds)
        if consts:
            env.update(consts)
        device = next(iter(feeds.values())).device if feeds else torch.device("cpu")
        ctx = Ctx(0, device, self._training_mode)
        for n in self._nodes:
            if consts is not None and n.const_ok and all((not o) or o in consts for o in n.outputs):
                continue
            args = [env[i] if i else None for i in n.inputs]
            ctx.opset = n.opset
            ctx.n_outputs = n.n_outputs
            if record is not None and n.const_ok and (
                    n.fn is _shape or n.fn is _size or not any(isinstance(v, torch.Tensor) for v in args)):
                with torch.no_grad():
                    outs = self._call(n, ctx, args)
                for name, t in zip(n.outputs, outs):
                    if name and isinstance(t, torch.Tensor) and t.numel() <= _CONST_LIMIT:
                        c = Const.of(t)
                        record[name] = c
                        env[name] = c
                    elif name:
                        env[name] = t
                for name in n.free:
                    env.pop(name, None)
                continue
            outs = self._call(n, ctx, args)
            del args
            for name, t in zip(n.outputs, outs):
                if name:
                    env[name] = t
            for name in n.free:
                env.pop(name, None)
        return {n: ctx.t(env[n]) for n in self.output_names}

    @staticmethod
    def _call(n: _Node, ctx: Ctx, args: list) -> Sequence[Any]:
        if n.attrs_checked:
            out = n.fn(ctx, args, n.attrs)
        else:  # first call: which attributes does the op function read?
            attrs = _ReadAttrs(n.attrs)
            out = n.fn(ctx, args, attrs)
            _check_ignored_attrs(n, attrs)
            n.attrs_checked = True
        return out if isinstance(out, (tuple, list)) else (out,)


def trainable_module(model: Any) -> OnnxModule:
    """The torch module that trains ``model``'s adapters; ``write_back()`` stores them in ``model``."""
    module = OnnxModule(model)
    if not module.trainable_names:
        raise ConfigError(
            "the ONNX model has no adapter initializers to train; apply one first: "
            "lora_fx.apply(model, lora_fx.LoraConfig(...))"
        )
    return module


__all__ = ["Const", "OnnxModule", "OPS", "check_supported", "trainable_initializers", "trainable_module"]
