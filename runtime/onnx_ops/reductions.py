"""Reductions, ArgMax/ArgMin, Softmax and the normalizations (LayerNormalization, RMSNormalization,
the com.microsoft SkipLayerNormalization family).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from lora_fx.runtime.onnx_ops.registry import OpFn, norm_axis, op
from lora_fx.runtime.onnx_ops.shapes import axes_input


def _reduce_of(fn: Callable, since: int) -> OpFn:
    def run(ctx, x, a):
        t = ctx.t(x[0])
        axes = axes_input(ctx, x, a, since)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return t
            axes = list(range(t.dim()))
        axes = [norm_axis(i, t.dim()) for i in axes]
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
        axis = norm_axis(a.get("axis", 0), t.dim())
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
        axis = norm_axis(a.get("axis", 1), t.dim())  # before 13: flatten to 2-D at axis
        flat = t.reshape(math.prod(t.shape[:axis]), -1)
        return fn(flat, dim=1).reshape(t.shape)

    return run


op("Softmax")(_softmax_of(torch.softmax))
op("LogSoftmax")(_softmax_of(torch.log_softmax))


def _layer_norm(t: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, axis: int, eps: float,
                stash_fp32: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    axis = norm_axis(axis, t.dim())
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
    axis, eps = norm_axis(a.get("axis", -1), t.dim()), a.get("epsilon", 1e-5)
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
    axis, eps = norm_axis(a.get("axis", -1), t.dim()), a.get("epsilon", 1e-5)
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
