"""Quantized weights: DequantizeLinear, com.microsoft MatMulNBits (bits 4 and 8) and MatMulBnb4.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lora_fx.errors import UnsupportedError
from lora_fx.runtime.onnx_ops.registry import norm_axis, op, torch_dtype


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
        axis = norm_axis(a.get("axis", 1), q.dim())
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
# (MatMulNBits bits 8, DequantizeLinear -> [Transpose ->] MatMul / Gemm) get the same treatment from
# runtime/int8_linear, which gives OnnxModule lora_fx's int8 storage once, at load; an int8 MatMulNBits
# run outside it still goes through lora_fx::linear_int8 (saving an int8 copy of W, not a float one).
_TRAINING_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _quant_ops() -> Any:
    import lora_fx.kernels.quantized_linear  # noqa: F401  (registers the ops)

    return torch.ops.lora_fx


def _training_int4(inp: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zp: torch.Tensor | None,
                   n: int, k: int, block: int, n_blocks: int) -> torch.Tensor | None:
    """MatMulNBits through ``lora_fx::linear_int4`` where the layouts agree, else None."""
    # lora_fx's int4 storage is MatMulNBits' layout (rows padded to whole blocks, zero points packed per row).
    if block % 2 or inp.dtype not in _TRAINING_DTYPES or packed.numel() != n * n_blocks * block // 2 or scales.numel() != n * n_blocks:
        return None
    if zp is not None and (zp.dtype != torch.uint8 or zp.numel() != n * ((n_blocks + 1) // 2)):
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
    if len(x) > 4 and x[4] is not None:
        raise UnsupportedError("com.microsoft.MatMulNBits with a g_idx input is not supported")
    n, k, bits, block = a["N"], a["K"], a.get("bits", 4), a["block_size"]
    if bits not in (4, 8):
        raise UnsupportedError(f"com.microsoft.MatMulNBits with bits={bits} is not supported (only 4 and 8)")
    y = _nbits_product(inp, packed, scales, zp, n, k, bits, block)
    return y + ctx.t(x[5]) if len(x) > 5 and x[5] is not None else y


def _nbits_product(inp: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zp: torch.Tensor | None,
                   n: int, k: int, bits: int, block: int) -> torch.Tensor:
    n_blocks = -(-k // block)
    if bits == 8:
        return _matmul_nbits8(inp, packed, scales, zp, n, k, block)
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


def _matmul_nbits8(inp: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zp: torch.Tensor | None,
                   n: int, k: int, block: int) -> torch.Tensor:
    """MatMulNBits bits 8: one uint8 code per weight, zero point 128 unless given (uint8, or float, per block)."""
    from lora_fx.kernels import quant_formats as formats

    if packed.numel() != n * -(-k // block) * block or scales.numel() != n * -(-k // block):
        raise UnsupportedError(f"com.microsoft.MatMulNBits bits=8: B has {packed.numel()} codes and {scales.numel()} scales, "
                               f"not N={n} rows of {-(-k // block)} blocks of {block}")
    if inp.dtype in _TRAINING_DTYPES:
        own = formats.int8_from_nbits(packed, scales.reshape(-1), zp.reshape(-1) if zp is not None else None, n, k, block)
        if own is not None:  # lora_fx's int8: the op the FX front end trains with, same float32 W
            return _quant_ops().linear_int8(inp, own[0], own[1], None, n, k)
    w = formats.dequantize_int8_nbits(packed, scales.reshape(-1), zp.reshape(-1) if zp is not None else None, n, k, block)
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
    if a.get("transB", 1) == 0:
        # ONNX Runtime accepts x [..., N] then and gives y [..., K], but its values are no product with the
        # decoded W that lora_fx could reproduce (checked against onnxruntime 1.32): refuse rather than guess.
        raise UnsupportedError("com.microsoft.MatMulBnb4 with transB=0 is not supported (only the default transB=1, "
                               "y = x @ W.T with W [N, K]); re-quantize the weight with transB=1")
    if quant_type == 1 and block % 2 == 0 and inp.dtype in _TRAINING_DTYPES:
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
    return torch.matmul(inp, w.to(inp.dtype).t())
