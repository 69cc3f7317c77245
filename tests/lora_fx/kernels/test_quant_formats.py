"""The QLoRA formats (lora_fx.kernels.quant_formats) against independent references: QLoRA's NF4 code
book rebuilt from its construction, bitsandbytes' / torchao's NF4 algorithm written out element by
element, int4 codes from their definition, int8 against torch's per-channel quantization."""

from __future__ import annotations

import pytest
import torch

from lora_fx.errors import ConfigError
from lora_fx.kernels.quant_formats import (NF4_CODE, dequantize_int4, dequantize_int8, dequantize_nf4, quantize_int4, quantize_int8,
                                          quantize_nf4)


def test_nf4_code_book_is_qlora_normal_float():
    """Rebuild the table from the QLoRA paper's construction: normal quantiles, asymmetric 8+7 halves, exact 0."""
    offset = 0.9677083
    ndtri = torch.special.ndtri
    pos = ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    values = values / values.abs().max()
    assert torch.allclose(values.float(), torch.tensor(NF4_CODE), atol=1e-6, rtol=0)


def _reference_nf4(w: torch.Tensor, block: int, sblock: int):
    """torchao's to_nf4 / bitsandbytes, written out element by element from the published algorithm."""
    flat = w.reshape(-1).tolist()
    code = list(NF4_CODE)
    absmax, codes = [], []
    for start in range(0, len(flat), block):
        chunk = flat[start : start + block]
        m = max(abs(v) for v in chunk)
        absmax.append(m)
        for v in chunk:
            s = torch.tensor(v, dtype=torch.float32) / torch.tensor(m, dtype=torch.float32)
            dist = [abs(float(s) - c) for c in code]
            codes.append(dist.index(min(dist)))  # the first (lowest) code wins a tie
    packed = [(codes[i] << 4) | codes[i + 1] for i in range(0, len(codes), 2)]  # first weight high nibble
    am = torch.tensor(absmax, dtype=torch.float32)
    mean = am.mean()
    centered = (am - mean).view(-1, sblock)
    factor = 256 / (2 * centered.abs().amax(dim=1))
    q = (centered * factor[:, None]).round().clamp(-128, 127).to(torch.int8).reshape(-1)
    return torch.tensor(packed, dtype=torch.uint8), am, q, factor, mean


def test_nf4_codes_and_scales_equal_reference_algorithm():
    torch.manual_seed(1)
    w = torch.randn(32, 128) * 0.05
    w[3, 5] = 0.0
    w[7, :64] = 0.0  # an all-zero block
    w[7, 0] = 1e-30
    ref_packed, ref_absmax, ref_q, ref_factor, ref_mean = _reference_nf4(w, 64, 8)
    single = quantize_nf4(w, 64)
    assert torch.equal(single["qweight"], ref_packed)
    assert torch.equal(single["qscale"], ref_absmax)
    double = quantize_nf4(w, 64, double_quant=True, scaler_block_size=8)
    assert torch.equal(double["qweight"], ref_packed)
    assert torch.equal(double["qscale"], ref_q)
    assert torch.allclose(double["qscale_factor"], ref_factor, rtol=1e-7, atol=0)
    assert torch.allclose(double["qscale_mean"], ref_mean.reshape(1), rtol=1e-7, atol=0)
    # Dequantized: code value times (double-dequantized) absmax, as torchao's get_original_weight.
    codes = torch.stack([ref_packed >> 4, ref_packed & 15], 1).reshape(-1).long()
    am = ref_q.float() / ref_factor.repeat_interleave(8) + ref_mean
    expect = (torch.tensor(NF4_CODE)[codes].view(-1, 64) * am[:, None]).view(32, 128)
    got = dequantize_nf4(double["qweight"], double["qscale"], double["qscale_factor"], double["qscale_mean"], 32, 128, 64, 8)
    assert torch.allclose(got, expect, rtol=1e-6, atol=0)
    assert got[3, 5] == 0 and torch.all(got[7, 1:64] == 0)


def test_nf4_error_is_half_a_code_step_at_most():
    torch.manual_seed(2)
    w = torch.randn(64, 64)
    s = quantize_nf4(w, 64)
    got = dequantize_nf4(s["qweight"], s["qscale"], None, None, 64, 64, 64, 256)
    widest_gap = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:]))
    bound = s["qscale"].repeat_interleave(64).view(64, 64) * widest_gap / 2
    assert torch.all((got - w).abs() <= bound + 1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_codes_follow_definition(symmetric):
    torch.manual_seed(3)
    w = torch.randn(16, 128) + (0.0 if symmetric else 0.7)
    s = quantize_int4(w, 64, symmetric=symmetric)
    blocks = w.view(-1, 64)
    packed = s["qweight"]
    codes = torch.stack([packed & 15, packed >> 4], 1).reshape(-1, 64).float()  # low nibble first
    scale = s["qscale"].float()
    assert s["qscale"].dtype == torch.float16
    if symmetric:
        assert torch.allclose(scale, (blocks.abs().amax(1) / 7).half().float())
        zero = torch.full((blocks.shape[0],), 8.0)
    else:
        lo, hi = blocks.amin(1).clamp(max=0), blocks.amax(1).clamp(min=0)
        assert torch.allclose(scale, ((hi - lo) / 15).half().float())
        zp = s["qzero"]
        zero = torch.stack([zp & 15, zp >> 4], 1).reshape(-1)[: blocks.shape[0]].float()
        assert torch.equal(zero, (-lo / scale).round().clamp(0, 15))
    expect = (codes - zero[:, None]) * scale[:, None]
    got = dequantize_int4(packed, s["qscale"], s.get("qzero"), 16, 128, 64)
    assert torch.equal(got.view(-1, 64), expect)
    assert torch.all((got.view(-1, 64) - blocks).abs() <= scale[:, None] / 2 + 1e-6)


def test_int8_equals_torch_per_channel_quantization():
    torch.manual_seed(4)
    w = torch.randn(24, 40)
    s = quantize_int8(w)
    ref = torch.quantize_per_channel(w, s["qscale"].double(), torch.zeros(24, dtype=torch.long), 0, torch.qint8)
    assert torch.equal(s["qweight"], ref.int_repr())
    assert torch.allclose(s["qscale"], w.abs().amax(1) / 127)


# ---- int8 in MatMulNBits' 8-bit layout (ONNX files other tools write) ----------------------------
@pytest.mark.parametrize("k, block", [(40, 16), (64, 64), (100, 128)])
def test_int8_nbits_layout_is_codes_plus_128_in_padded_rows_with_the_row_scale_per_block(k, block):
    from lora_fx.kernels.quant_formats import dequantize_int8_nbits, int8_from_nbits, int8_to_nbits

    torch.manual_seed(k)
    w = torch.randn(5, k)
    w[1] = 0.0
    s = quantize_int8(w)
    b, scales = int8_to_nbits(s["qweight"], s["qscale"], block)
    per_row = -(-k // block)
    assert b.dtype == torch.uint8 and b.shape == (5, per_row, block) and scales.shape == (5 * per_row,)
    rows = b.reshape(5, -1).to(torch.int32)
    for r in range(5):  # from the definition, element by element
        for c in range(per_row * block):
            assert int(rows[r, c]) == (int(s["qweight"][r, c]) + 128 if c < k else 128)
        assert torch.equal(scales.view(5, per_row)[r], s["qscale"][r].expand(per_row))
    q, scale = int8_from_nbits(b, scales, None, 5, k, block)
    assert torch.equal(q, s["qweight"]) and torch.equal(scale, s["qscale"])
    # Bit for bit the FX op's W, with the zero point absent or given as 128s.
    want = dequantize_int8(s["qweight"], s["qscale"])
    assert torch.equal(dequantize_int8_nbits(b, scales, None, 5, k, block), want)
    assert torch.equal(dequantize_int8_nbits(b, scales, torch.full((5 * per_row,), 128, dtype=torch.uint8), 5, k, block), want)
    # Other int8 (per-block scales, other zero points) is not lora_fx's: decoded from the definition instead.
    if per_row > 1:
        blocked = scales.clone()
        blocked[-1] *= 2  # the last row's blocks no longer share one scale
        assert int8_from_nbits(b, blocked, None, 5, k, block) is None
    zero = torch.full((5 * per_row,), 120, dtype=torch.uint8)
    assert int8_from_nbits(b, scales, zero, 5, k, block) is None
    got = dequantize_int8_nbits(b, scales, zero, 5, k, block)
    expect = (rows[:, :k].float() - 120) * s["qscale"][:, None]
    assert torch.equal(got, expect)


def test_int8_blocks_quantize_each_block_by_its_own_absmax():
    from lora_fx.kernels.quant_formats import dequantize_int8_nbits, quantize_int8_blocks

    torch.manual_seed(2)
    w = torch.randn(4, 40) * torch.tensor([1.0, 10.0, 0.1])[torch.arange(40) // 16]  # blocks of 16 of different size
    b, scales = quantize_int8_blocks(w, 16)
    assert b.shape == (4, 3, 16) and scales.shape == (12,)
    blocks = torch.nn.functional.pad(w, (0, 8)).view(4, 3, 16)
    assert torch.equal(scales.view(4, 3), blocks.abs().amax(-1) / 127)
    got = dequantize_int8_nbits(b, scales, None, 4, 40, 16)
    assert torch.all((got - w).abs() <= scales.view(4, 3).repeat_interleave(16, 1)[:, :40] / 2 + 1e-6)


# ---- int4 in MatMulNBits' layout: rows padded to whole blocks, zero points packed per row --------
def _reference_int4(w: torch.Tensor, block: int, symmetric: bool):
    """ONNX Runtime's MatMulNBits storage of ``w`` [N, K], element by element from the contrib-op spec:
    B [N, ceil(K/block), block/2] (low nibble first, each row zero-padded to whole blocks), one scale per
    block, zero points [N, ceil(blocks/2)] packed low nibble first. Codes from lora_fx's definition."""
    n, k = w.shape
    per_row = -(-k // block)
    packed = torch.zeros(n, per_row, block // 2, dtype=torch.uint8)
    scales = torch.zeros(n, per_row, dtype=torch.float16)
    zps = torch.zeros(n, (per_row + 1) // 2, dtype=torch.uint8)
    deq = torch.zeros(n, k)
    for r in range(n):
        for b in range(per_row):
            vals = [float(w[r, c]) if c < k else 0.0 for c in range(b * block, (b + 1) * block)]
            if symmetric:
                scale = torch.tensor(max(abs(v) for v in vals) / 7).half()
                zero = 8
            else:
                lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
                scale = torch.tensor((hi - lo) / 15).half()
                zero = int(min(max(round(-lo / float(scale)), 0), 15)) if float(scale) else 0
            s = float(scale) or 1.0
            scales[r, b] = scale
            zps[r, b // 2] |= zero << (4 * (b % 2))
            for i, v in enumerate(vals):
                q = round(v / s)
                code = min(max(q, -8), 7) + 8 if symmetric else min(max(q + zero, 0), 15)
                packed[r, b, i // 2] |= code << (4 * (i % 2))
                c = b * block + i
                if c < k:
                    deq[r, c] = (code - zero) * float(scale)
    return packed.reshape(-1), scales.reshape(-1), zps.reshape(-1), deq


@pytest.mark.parametrize("k, block", [(40, 16), (72, 32), (64, 16)])  # 3 blocks a row: a padding zero-point nibble
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_storage_is_matmulnbits_layout_with_padded_rows(k, block, symmetric):
    torch.manual_seed(k)
    w = torch.randn(6, k) + (0.0 if symmetric else 0.4)
    w[1] = 0.0  # all-zero rows: scale 0, every weight stays exactly 0
    w[2, :block] = 0.37  # a constant block
    packed, scales, zps, deq = _reference_int4(w, block, symmetric)
    s = quantize_int4(w, block, symmetric=symmetric)
    assert torch.equal(s["qweight"], packed)
    assert torch.equal(s["qscale"], scales)
    if symmetric:
        assert "qzero" not in s
    else:
        assert torch.equal(s["qzero"], zps)
    got = dequantize_int4(s["qweight"], s["qscale"], s.get("qzero"), 6, k, block)
    assert got.shape == (6, k) and got.is_contiguous()
    assert torch.equal(got, deq)
    assert torch.all(got[1] == 0)
    assert torch.allclose(got[2, :block], torch.full((block,), 0.37), rtol=2e-3)
    if k % block:
        with pytest.raises(ConfigError, match=rf"in_features {k} is not a multiple of block_size={block}.*pad=True"):
            quantize_int4(w, block, symmetric=symmetric, pad=False)


def test_int4_scales_beyond_float16_are_refused():
    w = torch.randn(4, 64)
    w[2, 3] = 1e6  # absmax / 7 > 65504: the fp16 scale would be inf and the block NaN
    for symmetric in (True, False):
        with pytest.raises(ConfigError, match="site q: .*beyond float16's range.*nf4 or int8"):
            quantize_int4(w, 64, symmetric=symmetric, what="site q")
    quantize_nf4(w, 64)  # nf4 and int8 keep float32 scales
    quantize_int8(w)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(bad):
    w = torch.randn(8, 64)
    w[5, 7] = bad
    for quantize in (lambda: quantize_nf4(w, 64, what="site fc"), lambda: quantize_nf4(w, 64, double_quant=True, what="site fc"),
                     lambda: quantize_int4(w, 64, what="site fc"), lambda: quantize_int4(w, 64, symmetric=False, what="site fc"),
                     lambda: quantize_int8(w, what="site fc")):
        with pytest.raises(ConfigError, match=r"site fc: 1 of 512 weights are NaN or infinite.*exclude_modules"):
            quantize()


def test_zero_and_constant_blocks_decode_exactly():
    w = torch.zeros(4, 64)
    w[1] = 0.25  # constant blocks: every weight is the block's absmax (code 1.0)
    w[2] = -3.0
    nf4 = quantize_nf4(w, 32)
    got = dequantize_nf4(nf4["qweight"], nf4["qscale"], None, None, 4, 64, 32, 256)
    assert torch.equal(got, w)
    i8 = quantize_int8(w)
    assert torch.allclose(dequantize_int8(i8["qweight"], i8["qscale"]), w, rtol=1e-6, atol=0)
    i4 = quantize_int4(w, 32)
    assert torch.all(dequantize_int4(i4["qweight"], i4["qscale"], None, 4, 64, 32)[[0, 3]] == 0)


def test_double_quantized_absmax_error_is_one_step_of_its_block_at_most():
    """bitsandbytes' double quantization: absmax - mean in 8 bits, one scale per 256 blocks; each decoded
    absmax is within one 8-bit step (max |absmax - mean| of its group / 128) of the true one, and the weight
    error grows by at most that step on top of the single-quantized bound."""
    torch.manual_seed(5)
    w = torch.randn(96, 256) * torch.logspace(-3, 0, 96)[:, None]  # absmaxes over three decades
    block, sblock = 64, 256
    single = quantize_nf4(w, block)
    double = quantize_nf4(w, block, double_quant=True, scaler_block_size=sblock)
    absmax = single["qscale"]
    mean = absmax.mean()
    centered = torch.nn.functional.pad(absmax - mean, (0, (-absmax.numel()) % sblock)).view(-1, sblock)
    step = (centered.abs().amax(1) / 128).repeat_interleave(sblock)[: absmax.numel()]
    decoded = double["qscale"].float() / double["qscale_factor"].repeat_interleave(sblock)[: absmax.numel()] + double["qscale_mean"]
    assert torch.all((decoded - absmax).abs() <= step * (1 + 1e-5) + 1e-7)
    assert double["qscale"].dtype == torch.int8 and double["qscale_factor"].numel() == -(-absmax.numel() // sblock)
    got = dequantize_nf4(double["qweight"], double["qscale"], double["qscale_factor"], double["qscale_mean"], 96, 256, block, sblock)
    widest_gap = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:]))
    bound = (absmax * widest_gap / 2 + step).repeat_interleave(block).view(96, 256)
    assert torch.all((got - w).abs() <= bound * (1 + 1e-5) + 1e-7)
