"""The QLoRA storage formats of a frozen W: quantize it, and decode it a range of rows at a time.

Formats (``QuantDType``):

* nf4: torchao's ``to_nf4`` / bitsandbytes' algorithm. W flattened row-major in blocks of
  ``block_size``; each block scaled by its absmax and every weight replaced by the index of the
  nearest of QLoRA's 16 normal-float values; two indices a byte, the first in the high nibble.
  ``double_quant``: the block absmaxes minus their mean are stored as int8, one float factor per
  ``double_quant_block_size`` absmaxes (torchao's ``double_quantize_scalers``).
* int4: ONNX Runtime's MatMulNBits layout: blocks of ``block_size`` along each row of W, a row
  that is not a whole number of blocks zero-padded to one (``[N, ceil(K / block), block / 2]``
  bytes), fp16 scale per block; symmetric (``round(w / (absmax/7))`` + 8) or affine (min/max scale
  and a 4-bit zero point, packed per row: ``[N, ceil(blocks_per_row / 2)]`` bytes). Low nibble
  first, so the bytes move into an ONNX file unchanged.
* int8: one fp32 scale per output channel, ``round(w / (absmax/127))``; in ONNX files the same
  ``[N, K]`` int8 codes and ``[N]`` scales behind a ``DequantizeLinear``. ``com.microsoft.MatMulNBits``
  bits 8, which other tools write, holds codes + 128 as uint8 in rows padded to whole blocks with a
  scale per block: ``int8_to_nbits`` / ``int8_from_nbits`` move lora_fx's int8 into and out of that
  layout (each row's scale repeated per block), ``dequantize_int8_nbits`` decodes any of it.

Decoding writes float32 rows into a per-thread scratch buffer through ``lora_fx.kernels.dequant``
(native C where the machine builds it, else torch ops). Both front ends use these numerics: the FX
pass stores them, the ONNX passes write the same bytes and read them back for folding.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional

import torch

from lora_fx.errors import ConfigError
from lora_fx.kernels.dequant import dequant4, dequant8

Tensor = torch.Tensor


# QLoRA's NF4 code book (Dettmers et al. 2023, appendix E; bitsandbytes' get_4bit_type("nf4")).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)

# Element-wise nearest-code search works on this many weights at a time (16 distances each).
_CHUNK = 1 << 20


def _finite(w: Tensor, what: str) -> Tensor:
    """``w`` as float32, or ConfigError when it holds NaN or infinity (a scale would be NaN and every
    weight of its block garbage)."""
    w = w.detach().float()
    bad = int((~torch.isfinite(w)).sum())
    if bad:
        raise ConfigError(
            f"{what}: {bad} of {w.numel()} weights are NaN or infinite and cannot be quantized; load a checkpoint "
            f"with finite weights, or leave this site in float with QuantConfig(exclude_modules=[...])"
        )
    return w


def _blocks(w: Tensor, block: int, pad: bool, what: str) -> tuple[Tensor, int]:
    """W flattened and cut into rows of ``block``; the last block zero-padded when needed."""
    flat = _finite(w, what).reshape(-1)
    rest = flat.numel() % block
    if rest:
        if not pad:
            raise ConfigError(
                f"{what}: {flat.numel()} weights ({'x'.join(map(str, w.shape))}) is not a multiple of block_size={block}; "
                f"use a block size that divides it or QuantConfig(pad=True) to zero-pad the last block"
            )
        flat = torch.cat([flat, flat.new_zeros(block - rest)])
    return flat.view(-1, block), block - rest if rest else 0


def _safe(scale: Tensor) -> Tensor:
    # An all-zero block has scale 0; dividing by 1 instead keeps its codes at zero, not NaN.
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _pack_high_first(codes: Tensor) -> Tensor:
    codes = codes.reshape(-1, 2).to(torch.uint8)
    return (codes[:, 0] << 4) | codes[:, 1]


def _pack_low_first(codes: Tensor) -> Tensor:
    codes = codes.reshape(-1, 2).to(torch.uint8)
    return codes[:, 0] | (codes[:, 1] << 4)


def _nearest(values: Tensor, code: Tensor) -> Tensor:
    """Index of the nearest code value, the lower index on a tie: torchao's argmin over |v - c|.

    A midpoint search picks the neighbourhood; the final choice compares the same |v - c| distances
    argmin would among the three codes around it (rounding of |v - c| is monotone in c, so a code
    farther off can never win), which keeps the result bit-identical at a fraction of the cost.
    """
    flat = values.reshape(-1)
    mids = (code[1:] + code[:-1]) / 2
    out = torch.empty(flat.numel(), dtype=torch.uint8)
    last = code.numel() - 1
    for start in range(0, flat.numel(), _CHUNK):
        v = flat[start : start + _CHUNK]
        k = torch.bucketize(v, mids)
        best = (k - 1).clamp(min=0)
        best_d = (v - code[best]).abs()
        for cand in (k, (k + 1).clamp(max=last)):  # in code order; strict < keeps the lower index on ties
            d = (v - code[cand]).abs()
            closer = d < best_d
            best = torch.where(closer, cand, best)
            best_d = torch.where(closer, d, best_d)
        out[start : start + _CHUNK] = best.to(torch.uint8)
    return out


def quantize_nf4(w: Tensor, block_size: int = 64, double_quant: bool = False, scaler_block_size: int = 256,
                 pad: bool = True, what: str = "weight") -> dict[str, Tensor]:
    """NF4 storage of ``w``: ``qweight`` (packed codes), ``qscale`` (absmax, or its int8 codes), and with
    double quantization ``qscale_factor`` / ``qscale_mean``."""
    blocks, _ = _blocks(w, block_size, pad, what)
    absmax = blocks.abs().amax(dim=1)
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    codes = _nearest(blocks / _safe(absmax).unsqueeze(1), code)
    out = {"qweight": _pack_high_first(codes)}
    if not double_quant:
        out["qscale"] = absmax
        return out
    mean = absmax.mean()
    centered = absmax - mean
    n = centered.numel()
    pad_n = (-n) % scaler_block_size
    # Padding zeros after the mean is taken leaves torchao's numbers unchanged where it divides evenly.
    groups = torch.cat([centered, centered.new_zeros(pad_n)]).view(-1, scaler_block_size)
    factor = 256 / (2 * _safe(groups.abs().amax(dim=1)))
    q = (groups * factor.unsqueeze(1)).round().clamp(-128, 127).to(torch.int8).reshape(-1)[:n]
    out.update(qscale=q.contiguous(), qscale_factor=factor, qscale_mean=mean.reshape(1))
    return out


# Every format decodes through ``Decoder.rows``: W[r0:r1] as float32, written by the 4-bit kernel
# and int8 kernels (lora_fx/kernels/dequant: native C where it builds, else torch ops).
_NF4_TABLE = torch.tensor(NF4_CODE, dtype=torch.float32)
_INT4_TABLE = torch.arange(16, dtype=torch.float32)
_INT4_SYMMETRIC_TABLE = _INT4_TABLE - 8  # the zero point of symmetric int4 is 8, folded into the table


# Per-thread scratch buffers for the decoded W inside the custom ops. A fresh weight-sized tensor per
# call costs more than the decode itself when glibc serves it with mmap (page faults on every call);
# one buffer per thread, as large as the largest tile (see kernels/tiled_linear), is reused by every
# layer instead. It holds one tile of one layer's W at a time. free_scratch() returns it.
_SCRATCH = threading.local()


def _scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (name, dtype, device)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buffers[key] = buf = None  # drop the smaller one before allocating the larger
        buffers[key] = buf = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def free_scratch() -> None:
    """Release this thread's dequantize scratch buffers (they are allocated again when needed)."""
    _SCRATCH.__dict__.pop("buffers", None)


@dataclass
class Decoder:
    """W ``[out_features, in_features]`` of one quantized site, decodable a range of rows at a time.

    4-bit formats: ``packed`` codes, a float ``scale`` (and ``zero``) per block of ``block_size``
    weights, of W flattened row-major (nf4), or with ``row_blocks`` blocks to each row, the last one
    zero-padded (int4, MatMulNBits' layout). int8 (``table`` None): ``packed`` is the int8
    ``[out, in]`` matrix and ``scale`` one float per row.
    """

    packed: Tensor
    scale: Tensor
    zero: Optional[Tensor]
    table: Optional[Tensor]
    high_first: bool
    block_size: int
    out_features: int
    in_features: int
    row_blocks: int = 0  # blocks per row when rows are padded to whole blocks; 0: blocks run over W flattened

    @property
    def align(self) -> int:
        """The block size a tile of rows must respect (1 when every row starts a block)."""
        return 1 if self.row_blocks or self.table is None else self.block_size

    def rows(self, r0: int, r1: int, scratch: bool = True) -> Tensor:
        """W[r0:r1] as float32; with ``scratch`` a view of this thread's buffer (overwritten by the next call)."""
        k, bs, device = self.in_features, self.block_size, self.packed.device

        def buffer(n: int) -> Tensor:
            return _scratch("values", n, torch.float32, device) if scratch else torch.empty(n, device=device)

        if self.table is None:
            return dequant8(buffer((r1 - r0) * k).view(r1 - r0, k), self.packed[r0:r1], self.scale[r0:r1])
        if self.row_blocks:
            b0, b1 = r0 * self.row_blocks, r1 * self.row_blocks
            out = buffer((b1 - b0) * bs)
            dequant4(out, self.packed[b0 * bs // 2 : b1 * bs // 2], self.table, self.scale[b0:b1],
                     self.zero[b0:b1] if self.zero is not None else None, self.high_first, bs)
            # The padding of each row's last block is decoded and skipped: a strided view, which mm reads as is.
            return out.view(r1 - r0, self.row_blocks * bs)[:, :k]
        e0, e1 = r0 * k, r1 * k
        b0, b1 = e0 // bs, -(-e1 // bs)
        out = buffer((b1 - b0) * bs)
        dequant4(out, self.packed[b0 * bs // 2 : b1 * bs // 2], self.table, self.scale[b0:b1],
                 self.zero[b0:b1] if self.zero is not None else None, self.high_first, bs)
        return out[e0 - b0 * bs : e1 - b0 * bs].view(r1 - r0, k)

    def weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The whole W in ``dtype``, a tensor of the caller's own (never the scratch buffer)."""
        return self.rows(0, self.out_features, scratch=False).to(dtype).contiguous()


def _nf4_absmax(qscale: Tensor, factor: Optional[Tensor], mean: Optional[Tensor], scaler_block_size: int) -> Tensor:
    if factor is None:
        return qscale.float()
    per_block = factor.repeat_interleave(scaler_block_size)[: qscale.numel()]
    return qscale.float() / per_block + mean


def nf4_decoder(qweight: Tensor, qscale: Tensor, qscale_factor: Optional[Tensor], qscale_mean: Optional[Tensor],
                 out_features: int, in_features: int, block_size: int, scaler_block_size: int) -> Decoder:
    absmax = _nf4_absmax(qscale, qscale_factor, qscale_mean, scaler_block_size)
    return Decoder(qweight, absmax, None, _NF4_TABLE.to(qweight.device), True, block_size, out_features, in_features)


def int4_decoder(qweight: Tensor, qscale: Tensor, qzero: Optional[Tensor], out_features: int, in_features: int,
                  block_size: int) -> Decoder:
    scale = qscale.float().reshape(-1)
    per_row = -(-in_features // block_size)
    if qzero is None:
        return Decoder(qweight.reshape(-1), scale, None, _INT4_SYMMETRIC_TABLE.to(qweight.device), False, block_size,
                       out_features, in_features, per_row)
    zeros = torch.empty(2 * qzero.numel(), device=qzero.device)  # the 4-bit zero points, packed per row
    dequant4(zeros, qzero.reshape(-1), _INT4_TABLE.to(qzero.device), torch.ones(zeros.numel() // 2, device=qzero.device),
             None, False, 2)
    zeros = zeros.view(out_features, -1)[:, :per_row].reshape(-1)  # drop each row's padding nibble
    return Decoder(qweight.reshape(-1), scale, zeros, _INT4_TABLE.to(qweight.device), False, block_size, out_features,
                   in_features, per_row)


def int8_decoder(qweight: Tensor, qscale: Tensor) -> Decoder:
    return Decoder(qweight, qscale, None, None, False, 1, qweight.shape[0], qweight.shape[1])


def dequantize_nf4(qweight: Tensor, qscale: Tensor, qscale_factor: Optional[Tensor], qscale_mean: Optional[Tensor],
                   out_features: int, in_features: int, block_size: int, scaler_block_size: int,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    return nf4_decoder(qweight, qscale, qscale_factor, qscale_mean, out_features, in_features, block_size,
                        scaler_block_size).weight(dtype)


def _fp16_scale(scale: Tensor, what: str) -> Tensor:
    if bool((scale > torch.finfo(torch.float16).max).any()):
        raise ConfigError(
            f"{what}: its weights need an int4 block scale of {float(scale.max()):.4g}, beyond float16's range "
            f"({torch.finfo(torch.float16).max:.0f}), where int4 keeps its scales; quantize this site as nf4 or int8, "
            f"or leave it in float with QuantConfig(exclude_modules=[...])"
        )
    return scale.half()


def quantize_int4(w: Tensor, block_size: int = 64, symmetric: bool = True, pad: bool = True, what: str = "weight") -> dict[str, Tensor]:
    """int4 storage of ``w`` ``[N, K]`` in MatMulNBits' layout: ``qweight`` (codes 0..15, low nibble
    first, ``ceil(K / block_size)`` blocks a row, the last zero-padded), ``qscale`` (fp16 per block),
    and when affine ``qzero`` (4-bit zero points, packed per row). ``pad=False`` refuses a K that is
    not a multiple of ``block_size``."""
    w = _finite(w, what)
    if w.dim() != 2:
        raise ConfigError(f"{what}: int4 quantizes a 2-D [out, in] weight, got shape {list(w.shape)}")
    n, k = w.shape
    per_row = -(-k // block_size)
    if k % block_size:
        if not pad:
            raise ConfigError(
                f"{what}: in_features {k} is not a multiple of block_size={block_size}; use a block size that divides "
                f"it or QuantConfig(pad=True) to zero-pad each row's last block (as MatMulNBits does)"
            )
        w = torch.nn.functional.pad(w, (0, per_row * block_size - k))
    blocks = w.reshape(-1, block_size)
    if symmetric:
        scale = _fp16_scale(blocks.abs().amax(dim=1) / 7, what)
        s = _safe(scale.float()).unsqueeze(1)
        codes = (blocks / s).round().clamp(-8, 7) + 8
        return {"qweight": _pack_low_first(codes), "qscale": scale}
    # Keep 0 inside [min, max] so zero weights (and zero padding) stay exactly zero.
    lo = blocks.amin(dim=1).clamp(max=0)
    hi = blocks.amax(dim=1).clamp(min=0)
    scale = _fp16_scale((hi - lo) / 15, what)
    s = _safe(scale.float())
    zero = (-lo / s).round().clamp(0, 15).view(n, per_row)
    codes = ((blocks / s.unsqueeze(1)).round() + zero.reshape(-1, 1)).clamp(0, 15)
    # MatMulNBits packs zero points per row: a row with an odd number of blocks ends on a padding nibble.
    zp = torch.nn.functional.pad(zero, (0, per_row % 2))
    return {"qweight": _pack_low_first(codes), "qscale": scale, "qzero": _pack_low_first(zp)}


def dequantize_int4(qweight: Tensor, qscale: Tensor, qzero: Optional[Tensor], out_features: int, in_features: int,
                    block_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return int4_decoder(qweight, qscale, qzero, out_features, in_features, block_size).weight(dtype)


def quantize_int8(w: Tensor, what: str = "weight") -> dict[str, Tensor]:
    """int8 storage of ``w`` ``[out, in]``: ``qweight`` int8 and ``qscale`` fp32 per output channel."""
    w = _finite(w, what)
    scale = w.abs().amax(dim=1) / 127
    q = (w / _safe(scale).unsqueeze(1)).round().clamp(-127, 127).to(torch.int8)
    return {"qweight": q, "qscale": scale}


def dequantize_int8(qweight: Tensor, qscale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return int8_decoder(qweight, qscale).weight(dtype)


def int8_to_nbits(qweight: Tensor, qscale: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """lora_fx's int8 storage (``qweight [N, K]`` int8, ``qscale [N]``) in MatMulNBits' 8-bit layout:
    ``B`` uint8 ``[N, ceil(K / block), block]`` holding ``q + 128`` (the op's default zero point; the
    padding of each row's last block is 128, a zero weight) and ``scales [N * blocks]``, each row's scale
    once per block (same dtype as ``qscale``)."""
    n, k = qweight.shape
    blocks = -(-k // block_size)
    codes = torch.nn.functional.pad(qweight.to(torch.int16), (0, blocks * block_size - k)) + 128
    return codes.to(torch.uint8).reshape(n, blocks, block_size), qscale.reshape(n, 1).expand(n, blocks).reshape(-1).clone()


def int8_from_nbits(b: Tensor, scales: Tensor, zero: Optional[Tensor], out_features: int, in_features: int,
                    block_size: int) -> Optional[tuple[Tensor, Tensor]]:
    """The inverse of ``int8_to_nbits``: ``(qweight [N, K] int8, qscale [N] float32)`` of a MatMulNBits
    bits=8 weight, or None when it is not lora_fx's per-channel int8 (a row's blocks with different
    scales, zero points other than 128, or shapes that do not fit)."""
    n, k = out_features, in_features
    blocks = -(-k // block_size)
    if b.numel() != n * blocks * block_size or not int8_nbits_per_channel(scales, zero, n, blocks):
        return None
    q = (b.reshape(n, blocks * block_size)[:, :k].to(torch.int16) - 128).to(torch.int8).contiguous()
    return q, scales.reshape(n, blocks)[:, 0].float().contiguous()


def int8_nbits_per_channel(scales: Tensor, zero: Optional[Tensor], out_features: int, blocks: int) -> bool:
    """Whether MatMulNBits bits=8 scales / zero points are lora_fx's per-channel int8: every block of a
    row has the row's scale, and the zero point is 128 (absent, or uint8 128s)."""
    n = out_features
    if scales.numel() != n * blocks:
        return False
    per_block = scales.reshape(n, blocks)
    if not bool((per_block == per_block[:, :1]).all()):
        return False
    return zero is None or (zero.dtype == torch.uint8 and zero.numel() == n * blocks and not bool((zero != 128).any()))


def dequantize_int8_nbits(b: Tensor, scales: Tensor, zero: Optional[Tensor], out_features: int, in_features: int,
                          block_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """W ``[N, K]`` of a MatMulNBits bits=8 weight: per-channel int8 through ``dequantize_int8`` (the
    same float32 values as the FX op), any other (per-block scales, zero points) as ``(code - zero) * scale``."""
    own = int8_from_nbits(b, scales, zero, out_features, in_features, block_size)
    if own is not None:
        return dequantize_int8(own[0], own[1], dtype)
    n, k = out_features, in_features
    blocks = -(-k // block_size)
    codes = b.reshape(n, blocks, block_size).to(torch.float32)
    z = torch.full((n, blocks, 1), 128.0) if zero is None else zero.reshape(n, blocks, 1).to(torch.float32)
    w = (codes - z) * scales.reshape(n, blocks, 1).to(torch.float32)
    return w.reshape(n, blocks * block_size)[:, :k].to(dtype).contiguous()


def quantize_int8_blocks(w: Tensor, block_size: int, what: str = "weight") -> tuple[Tensor, Tensor]:
    """MatMulNBits bits=8 storage of ``w [N, K]`` with one scale per block (not per row): ``(B, scales)``
    as ``int8_to_nbits`` lays them out. For weights other tools stored that way."""
    w = _finite(w, what)
    n, k = w.shape
    blocks = -(-k // block_size)
    padded = torch.nn.functional.pad(w, (0, blocks * block_size - k)).reshape(n * blocks, block_size)
    q = quantize_int8(padded, what)
    b, _ = int8_to_nbits(q["qweight"], q["qscale"], block_size)
    return b.reshape(n, blocks, block_size), q["qscale"]


def quantization_error(w: Tensor, deq: Tensor) -> tuple[float, float]:
    """What quantizing ``w`` to ``deq`` cost: the largest absolute error and the RMS error relative to w's RMS."""
    diff = (deq.float() - w.float())
    rms = float(diff.pow(2).mean().sqrt() / w.float().pow(2).mean().sqrt().clamp_min(1e-30))
    return float(diff.abs().max()), rms
