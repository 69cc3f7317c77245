"""Float matrix products: MatMul, Gemm, com.microsoft FusedMatMul, Einsum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_fx.errors import UnsupportedError
from lora_fx.runtime.onnx_ops.registry import op


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
