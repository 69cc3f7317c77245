"""The QLoRA formats (lora_fx.kernels.quant_formats) against independent references: QLoRA's NF4 code
book rebuilt from its construction, bitsandbytes' / torchao's NF4 algorithm written out element by
element, int4 codes from their definition, int8 against torch's per-channel quantization."""

from __future__ import annotations

import pytest
import torch

from lora_fx.kernels.quant_formats import NF4_CODE, dequantize_int4, dequantize_nf4, quantize_int4, quantize_int8, quantize_nf4


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
