"""Convolutions: Conv and ConvTranspose over 1, 2 or 3 spatial dims, with every attribute (auto_pad
NOTSET / SAME_UPPER / SAME_LOWER / VALID, dilations, group, kernel_shape, pads, strides; ConvTranspose's
output_padding and output_shape too) and the optional bias.

ONNX pads may differ between the two ends of a dim, torch's ``padding`` may not: uneven pads are applied
with ``F.pad`` (negative amounts crop), so the convolution itself always runs with torch's own kernels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lora_fx.errors import UnsupportedError
from lora_fx.runtime.onnx_ops.registry import op

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _geometry(label: str, x: torch.Tensor, w: torch.Tensor, a: dict) -> tuple[int, list[int], list[int], list[int]]:
    """Spatial rank, kernel shape, strides and dilations, with kernel_shape checked against the weight."""
    n = x.dim() - 2
    if n not in _CONV:
        raise UnsupportedError(f"{label} over {n} spatial dims: lora_fx runs 1-D, 2-D and 3-D convolutions only")
    kernel = list(w.shape[2:])
    given = a.get("kernel_shape")
    if given is not None and list(given) != kernel:
        raise UnsupportedError(f"{label} has kernel_shape={list(given)} but its weight's kernel is {kernel}; re-export the model")
    return n, kernel, list(a.get("strides") or [1] * n), list(a.get("dilations") or [1] * n)


def _torch_pad(begin: list[int], end: list[int]) -> list[int]:
    """ONNX per-dim (begin, end) pads as ``F.pad``'s list: last dim first."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


def _explicit_pads(op_type: str, auto_pad: str, pads: Any, n: int) -> tuple[list[int], list[int]]:
    """Begin and end pads per spatial axis for ``auto_pad`` VALID (none) or NOTSET (the ``pads`` attribute)."""
    if auto_pad == "VALID":
        return [0] * n, [0] * n
    if auto_pad == "NOTSET":
        pads = list(pads) if pads is not None else [0] * (2 * n)
        return pads[:n], pads[n:]
    raise UnsupportedError(f"{op_type} with auto_pad={auto_pad!r}: ONNX defines NOTSET, SAME_UPPER, SAME_LOWER and VALID")


@op("Conv")
def _conv(ctx, x, a):
    t, w = ctx.t(x[0]), ctx.t(x[1])
    bias = ctx.t(x[2]) if len(x) > 2 and x[2] is not None else None
    n, kernel, strides, dilations = _geometry("Conv", t, w, a)
    auto_pad = a.get("auto_pad", "NOTSET")
    pads = a.get("pads")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(t.shape[2:], kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else big)
            end.append(big if auto_pad == "SAME_UPPER" else small)
    else:
        begin, end = _explicit_pads("Conv", auto_pad, pads, n)
    fn, groups = _CONV[n], a.get("group", 1)
    if begin == end:
        return fn(t, w, bias, strides, begin, dilations, groups)
    return fn(F.pad(t, _torch_pad(begin, end)), w, bias, strides, 0, dilations, groups)


@op("ConvTranspose")
def _conv_transpose(ctx, x, a):
    t, w = ctx.t(x[0]), ctx.t(x[1])
    bias = ctx.t(x[2]) if len(x) > 2 and x[2] is not None else None
    n, kernel, strides, dilations = _geometry("ConvTranspose", t, w, a)
    groups = a.get("group", 1)
    out_pad = list(a.get("output_padding") or [0] * n)
    auto_pad = a.get("auto_pad", "NOTSET")
    output_shape = a.get("output_shape")
    pads = a.get("pads")
    # Without padding, a transposed convolution covers stride * (in - 1) + dilated kernel positions.
    full = [s * (size - 1) + (k - 1) * d + 1 for size, k, s, d in zip(t.shape[2:], kernel, strides, dilations)]
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if output_shape is not None:
            target = list(output_shape)[-n:]
        else:
            target = [size * s for size, s in zip(t.shape[2:], strides)]
        begin, end = [], []
        for f, op_, want in zip(full, out_pad, target):
            total = f + op_ - want
            small, big = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else big)
            end.append(big if auto_pad == "SAME_UPPER" else small)
    else:
        begin, end = _explicit_pads("ConvTranspose", auto_pad, pads, n)
    fn = _CONV_T[n]
    if begin == end and all(p < max(s, d) for p, s, d in zip(out_pad, strides, dilations)) and min(begin) >= 0:
        return fn(t, w, bias, strides, begin, out_pad, groups, dilations)
    # Uneven pads: run unpadded, then add output_padding's zeros at the end and crop (F.pad with negative
    # amounts) each end; the bias goes on after, as it covers the padded positions too.
    y = fn(t, w, None, strides, 0, 0, groups, dilations)
    y = F.pad(y, _torch_pad([-b for b in begin], [p - e for p, e in zip(out_pad, end)]))
    if bias is not None:
        y = y + bias.reshape((1, -1) + (1,) * n)
    return y
