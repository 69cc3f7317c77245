"""Elementwise ONNX ops in torch: arithmetic with ONNX's integer semantics, comparisons, casts,
activations (the com.microsoft Gelu family too) and Dropout.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from lora_fx.runtime.onnx_ops.registry import Const, OpFn, op, scalar, torch_dtype


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
