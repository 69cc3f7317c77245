"""Store the frozen weights of linear sites quantized (QLoRA) in a captured GraphModule.

Matches the linear sites ``find_sites`` reports that ``QuantConfig.target_modules`` selects:

* ``aten.linear(x, W, b)`` with W a ``[out, in]`` parameter,
* ``aten.addmm(b, x, W)``, ``aten.mm(x, W)``, ``aten.matmul(x, W)`` with W an ``[in, out]``
  parameter (GPT-2's Conv1D); W is stored transposed, as ``[out, in]``.

Each becomes one node ``lora_fx::linear_<format>(x, <packed storage>, b, ...)``: a torch custom op
that dequantizes W right before the matmul. The packed storage is uint8/int8 buffers registered
next to where W was (``<site>.qweight``, ``qscale``, ...); the float parameter W is deleted, so no
float copy of W stays alive. The op's backward dequantizes W again instead of saving it (as
bitsandbytes' ``MatMul4Bit``), and both directions decode W a tile of rows at a time into one
per-thread buffer right before the matmul that reads it (``lora_fx.kernels.tiled_linear``; 4-bit
codes and int8 through ``lora_fx.kernels.dequant``, native kernels where the machine can build them), so a
training step never holds more than a tile of float W.
Gradients reach the input (and so the LoRA branches), never the packed storage.

Formats (``QuantDType``):

* nf4: torchao's ``to_nf4`` / bitsandbytes' algorithm. W flattened row-major in blocks of
  ``block_size``; each block scaled by its absmax and every weight replaced by the index of the
  nearest of QLoRA's 16 normal-float values; two indices a byte, the first in the high nibble.
  ``double_quant``: the block absmaxes minus their mean are stored as int8, one float factor per
  ``double_quant_block_size`` absmaxes (torchao's ``double_quantize_scalers``).
* int4: blocks of ``block_size``, fp16 scale per block; symmetric (``round(w / (absmax/7))`` + 8)
  or affine (min/max scale and a 4-bit zero point). Low nibble first, as ONNX INT4 and ONNX
  Runtime's MatMulNBits store it, so the bytes move into an ONNX file unchanged.
* int8: one fp32 scale per output channel, ``round(w / (absmax/127))``.

A site that is already quantized is refused.
"""

from __future__ import annotations

import threading

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from lora_fx.config import LoraConfig, QuantConfig, QuantDType
from lora_fx.errors import ConfigError
from lora_fx.kernels.dequant import dequant4, dequant8
from lora_fx.kernels.tiled_linear import tiled_grad_input, tiled_linear
from lora_fx.passes.fx.capture import meta
from lora_fx.passes.fx.find_sites import QUANTIZED, find_sites
from lora_fx.passes.result import PassResult
from lora_fx.targeting import select_targets

aten = torch.ops.aten
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


# ---- numerics ----------------------------------------------------------------------------------
def _blocks(w: Tensor, block: int, pad: bool, what: str) -> tuple[Tensor, int]:
    """W flattened and cut into rows of ``block``; the last block zero-padded when needed."""
    flat = w.detach().reshape(-1).float()
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


# ---- decoding ----------------------------------------------------------------------------------
# Every format decodes through ``_Decoder.rows``: W[r0:r1] as float32, written by the 4-bit kernel
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
class _Decoder:
    """W ``[out_features, in_features]`` of one quantized site, decodable a range of rows at a time.

    4-bit formats: ``packed`` codes, a float ``scale`` (and ``zero``) per block of ``block_size``
    weights of W flattened row-major. int8 (``table`` None): ``packed`` is the int8 ``[out, in]``
    matrix and ``scale`` one float per row.
    """

    packed: Tensor
    scale: Tensor
    zero: Optional[Tensor]
    table: Optional[Tensor]
    high_first: bool
    block_size: int
    out_features: int
    in_features: int

    def rows(self, r0: int, r1: int, scratch: bool = True) -> Tensor:
        """W[r0:r1] as float32; with ``scratch`` a view of this thread's buffer (overwritten by the next call)."""
        k, bs, device = self.in_features, self.block_size, self.packed.device

        def buffer(n: int) -> Tensor:
            return _scratch("values", n, torch.float32, device) if scratch else torch.empty(n, device=device)

        if self.table is None:
            return dequant8(buffer((r1 - r0) * k).view(r1 - r0, k), self.packed[r0:r1], self.scale[r0:r1])
        e0, e1 = r0 * k, r1 * k
        b0, b1 = e0 // bs, -(-e1 // bs)
        out = buffer((b1 - b0) * bs)
        dequant4(out, self.packed[b0 * bs // 2 : b1 * bs // 2], self.table, self.scale[b0:b1],
                 self.zero[b0:b1] if self.zero is not None else None, self.high_first, bs)
        return out[e0 - b0 * bs : e1 - b0 * bs].view(r1 - r0, k)

    def weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The whole W in ``dtype``, a tensor of the caller's own (never the scratch buffer)."""
        return self.rows(0, self.out_features, scratch=False).to(dtype)


def _nf4_absmax(qscale: Tensor, factor: Optional[Tensor], mean: Optional[Tensor], scaler_block_size: int) -> Tensor:
    if factor is None:
        return qscale.float()
    per_block = factor.repeat_interleave(scaler_block_size)[: qscale.numel()]
    return qscale.float() / per_block + mean


def _nf4_decoder(qweight: Tensor, qscale: Tensor, qscale_factor: Optional[Tensor], qscale_mean: Optional[Tensor],
                 out_features: int, in_features: int, block_size: int, scaler_block_size: int) -> _Decoder:
    absmax = _nf4_absmax(qscale, qscale_factor, qscale_mean, scaler_block_size)
    return _Decoder(qweight, absmax, None, _NF4_TABLE.to(qweight.device), True, block_size, out_features, in_features)


def _int4_decoder(qweight: Tensor, qscale: Tensor, qzero: Optional[Tensor], out_features: int, in_features: int,
                  block_size: int) -> _Decoder:
    scale = qscale.float()
    if qzero is None:
        return _Decoder(qweight, scale, None, _INT4_SYMMETRIC_TABLE.to(qweight.device), False, block_size, out_features, in_features)
    zeros = torch.empty(2 * qzero.numel(), device=qzero.device)  # the 4-bit zero points, one per block
    dequant4(zeros, qzero, _INT4_TABLE.to(qzero.device), torch.ones(zeros.numel() // 2, device=qzero.device), None, False, 2)
    return _Decoder(qweight, scale, zeros[: scale.numel()], _INT4_TABLE.to(qweight.device), False, block_size, out_features, in_features)


def _int8_decoder(qweight: Tensor, qscale: Tensor) -> _Decoder:
    return _Decoder(qweight, qscale, None, None, False, 1, qweight.shape[0], qweight.shape[1])


def dequantize_nf4(qweight: Tensor, qscale: Tensor, qscale_factor: Optional[Tensor], qscale_mean: Optional[Tensor],
                   out_features: int, in_features: int, block_size: int, scaler_block_size: int,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    return _nf4_decoder(qweight, qscale, qscale_factor, qscale_mean, out_features, in_features, block_size,
                        scaler_block_size).weight(dtype)


def quantize_int4(w: Tensor, block_size: int = 64, symmetric: bool = True, pad: bool = True, what: str = "weight") -> dict[str, Tensor]:
    """int4 storage of ``w``: ``qweight`` (codes 0..15, low nibble first), ``qscale`` (fp16 per block),
    and when affine ``qzero`` (4-bit zero points, packed like the codes)."""
    blocks, _ = _blocks(w, block_size, pad, what)
    if symmetric:
        scale = (blocks.abs().amax(dim=1) / 7).half()
        s = _safe(scale.float()).unsqueeze(1)
        codes = (blocks / s).round().clamp(-8, 7) + 8
        return {"qweight": _pack_low_first(codes), "qscale": scale}
    # Keep 0 inside [min, max] so zero weights (and zero padding) stay exactly zero.
    lo = blocks.amin(dim=1).clamp(max=0)
    hi = blocks.amax(dim=1).clamp(min=0)
    scale = ((hi - lo) / 15).half()
    s = _safe(scale.float())
    zero = (-lo / s).round().clamp(0, 15)
    codes = ((blocks / s.unsqueeze(1)).round() + zero.unsqueeze(1)).clamp(0, 15)
    zp = torch.cat([zero, zero.new_zeros(zero.numel() % 2)])
    return {"qweight": _pack_low_first(codes), "qscale": scale, "qzero": _pack_low_first(zp)}


def dequantize_int4(qweight: Tensor, qscale: Tensor, qzero: Optional[Tensor], out_features: int, in_features: int,
                    block_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return _int4_decoder(qweight, qscale, qzero, out_features, in_features, block_size).weight(dtype)


def quantize_int8(w: Tensor) -> dict[str, Tensor]:
    """int8 storage of ``w`` ``[out, in]``: ``qweight`` int8 and ``qscale`` fp32 per output channel."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127
    q = (w / _safe(scale).unsqueeze(1)).round().clamp(-127, 127).to(torch.int8)
    return {"qweight": q, "qscale": scale}


def dequantize_int8(qweight: Tensor, qscale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return _int8_decoder(qweight, qscale).weight(dtype)


# ---- the custom ops ----------------------------------------------------------------------------
# One op per format, each linear(x, dequantize(storage), bias). A fused op rather than a dequantize
# node feeding aten.linear: aten.linear would save the dequantized W for its backward, keeping a
# float copy of every layer's W alive across the step, which is what QLoRA exists to avoid. Forward
# and backward decode W a tile of rows at a time (kernels/tiled_linear) into the scratch buffer.

def _linear(x: Tensor, decoder: _Decoder, bias: Optional[Tensor]) -> Tensor:
    return tiled_linear(x, decoder.rows, decoder.out_features, decoder.in_features, decoder.block_size, bias)


@torch.library.custom_op("lora_fx::linear_nf4", mutates_args=())
def linear_nf4(x: Tensor, qweight: Tensor, qscale: Tensor, qscale_factor: Optional[Tensor], qscale_mean: Optional[Tensor],
               bias: Optional[Tensor], out_features: int, in_features: int, block_size: int, scaler_block_size: int) -> Tensor:
    return _linear(x, _nf4_decoder(qweight, qscale, qscale_factor, qscale_mean, out_features, in_features, block_size,
                                   scaler_block_size), bias)


@torch.library.custom_op("lora_fx::linear_int4", mutates_args=())
def linear_int4(x: Tensor, qweight: Tensor, qscale: Tensor, qzero: Optional[Tensor], bias: Optional[Tensor],
                out_features: int, in_features: int, block_size: int) -> Tensor:
    return _linear(x, _int4_decoder(qweight, qscale, qzero, out_features, in_features, block_size), bias)


@torch.library.custom_op("lora_fx::linear_int8", mutates_args=())
def linear_int8(x: Tensor, qweight: Tensor, qscale: Tensor, bias: Optional[Tensor], out_features: int, in_features: int) -> Tensor:
    return _linear(x, _int8_decoder(qweight, qscale), bias)


# The input gradient ``grad @ W`` is an op of its own for the same reason the forward is: autograd
# (and torch.compile's AOT autograd, which traces the backward) sees one opaque call, never the native
# decode kernels or the scratch buffer inside it. Same arguments as the forward, ``grad`` in place of x.
def _grad_input(grad: Tensor, decoder: _Decoder) -> Tensor:
    return tiled_grad_input(grad, decoder.rows, decoder.out_features, decoder.in_features, decoder.block_size)


@torch.library.custom_op("lora_fx::linear_nf4_grad_input", mutates_args=())
def linear_nf4_grad_input(grad: Tensor, qweight: Tensor, qscale: Tensor, qscale_factor: Optional[Tensor],
                          qscale_mean: Optional[Tensor], bias: Optional[Tensor], out_features: int, in_features: int,
                          block_size: int, scaler_block_size: int) -> Tensor:
    return _grad_input(grad, _nf4_decoder(qweight, qscale, qscale_factor, qscale_mean, out_features, in_features,
                                          block_size, scaler_block_size))


@torch.library.custom_op("lora_fx::linear_int4_grad_input", mutates_args=())
def linear_int4_grad_input(grad: Tensor, qweight: Tensor, qscale: Tensor, qzero: Optional[Tensor], bias: Optional[Tensor],
                           out_features: int, in_features: int, block_size: int) -> Tensor:
    return _grad_input(grad, _int4_decoder(qweight, qscale, qzero, out_features, in_features, block_size))


@torch.library.custom_op("lora_fx::linear_int8_grad_input", mutates_args=())
def linear_int8_grad_input(grad: Tensor, qweight: Tensor, qscale: Tensor, bias: Optional[Tensor], out_features: int,
                           in_features: int) -> Tensor:
    return _grad_input(grad, _int8_decoder(qweight, qscale))


@dataclass(frozen=True)
class _OpSpec:
    op: Any
    storage: tuple[str, ...]  # names of the tensor arguments after x, in order
    bias_index: int  # position of bias among the op's arguments
    decoder: Callable[[tuple], _Decoder]  # the op's arguments -> its W's decoder
    grad_input: Any  # the op computing grad @ W from (grad, <the op's other arguments>)

    def dequantize(self, args: tuple) -> Tensor:
        """The op's W ``[out, in]`` in x's dtype (``args[0]``), a fresh tensor."""
        return self.decoder(args).weight(args[0].dtype)


_SPECS: dict[QuantDType, _OpSpec] = {
    QuantDType.NF4: _OpSpec(linear_nf4, ("qweight", "qscale", "qscale_factor", "qscale_mean"), 5,
                            lambda a: _nf4_decoder(a[1], a[2], a[3], a[4], a[6], a[7], a[8], a[9]), linear_nf4_grad_input),
    QuantDType.INT4: _OpSpec(linear_int4, ("qweight", "qscale", "qzero"), 4,
                             lambda a: _int4_decoder(a[1], a[2], a[3], a[5], a[6], a[7]), linear_int4_grad_input),
    QuantDType.INT8: _OpSpec(linear_int8, ("qweight", "qscale"), 3, lambda a: _int8_decoder(a[1], a[2]),
                             linear_int8_grad_input),
}


def _register(spec: _OpSpec) -> None:
    def fake(x, *args):
        out_features = args[spec.bias_index]  # out_features follows bias
        return x.new_empty((*x.shape[:-1], out_features))

    def setup_context(ctx, inputs, output):
        ctx.args = inputs  # the storage buffers: no copy, and never a float W

    def backward(ctx, grad):
        args = ctx.args
        grads: list[Optional[Tensor]] = [None] * len(args)
        if ctx.needs_input_grad[0]:
            # W decoded again, a tile at a time, into the scratch buffer
            grads[0] = spec.grad_input(grad.contiguous(), *args[1:])
        bias = args[spec.bias_index]
        if bias is not None and ctx.needs_input_grad[spec.bias_index]:
            grads[spec.bias_index] = grad.reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype)
        return tuple(grads)

    def fake_grad_input(grad, *args):
        in_features = args[spec.bias_index + 1]
        return grad.new_empty((*grad.shape[:-1], in_features))

    spec.op.register_fake(fake)
    spec.grad_input.register_fake(fake_grad_input)
    spec.op.register_autograd(backward, setup_context=setup_context)


for _spec in _SPECS.values():
    _register(_spec)

QUANT_OPS = {spec.op._opoverload: dtype for dtype, spec in _SPECS.items()}


# ---- the pass ----------------------------------------------------------------------------------
def _weight_of(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, Tensor, bool, Any, Any]:
    """(weight get_attr node, W parameter, stored [in, out]?, x, bias) of a linear site node."""
    if node.target is aten.linear.default:
        w_node, x, bias = node.args[1], node.args[0], node.args[2] if len(node.args) > 2 else None
        return w_node, gm.get_parameter(w_node.target), False, x, bias
    if node.target is aten.addmm.default:
        w_node, x, bias = node.args[2], node.args[1], node.args[0]
    else:
        w_node, x, bias = node.args[1], node.args[0], None
    return w_node, gm.get_parameter(w_node.target), True, x, bias


def _shared(gm: fx.GraphModule, target: str, param: Tensor) -> list[str]:
    names = [n for n, p in gm.named_parameters(remove_duplicate=False) if p is param and n != target]
    users = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target]
    uses = sum(len(u.users) for u in users)
    return names + (["another node"] if uses > 1 else [])


def _error(w: Tensor, deq: Tensor) -> tuple[float, float]:
    diff = (deq.float() - w.float())
    rms = float(diff.pow(2).mean().sqrt() / w.float().pow(2).mean().sqrt().clamp_min(1e-30))
    return float(diff.abs().max()), rms


class QuantizeWeights:
    """Replace the weights of selected linear sites by packed 4/8-bit storage and a dequantizing linear op.

    Matches ``aten.linear`` / ``addmm`` / ``mm`` / ``matmul`` linear sites with a parameter weight
    (see the module docstring). Returns the quantized sites in ``changed`` with their sizes and the
    dequantize(quantize(W)) error; the same numbers are kept in ``meta(gm)["quant"]``.
    """

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        cfg = self.config
        sites = find_sites(gm)
        selector = LoraConfig(r=1, target_modules=cfg.target_modules, exclude_modules=cfg.exclude_modules)
        targets = select_targets(sites, selector, model_type=meta(gm).get("model_type"))
        already = [t.site.name for t in targets if t.site.handle.meta.get(QUANTIZED)]
        if already:
            raise ConfigError(
                f"sites already quantized: {', '.join(already)}; a weight is quantized once. To change the format, "
                f"capture the float model again, or exclude these sites with QuantConfig(exclude_modules=...)"
            )
        report = meta(gm).setdefault("quant", {})
        changed: list[str] = []
        for target in targets:
            line = self._quantize_site(gm, target.site, report)
            changed.append(line)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, any(not c.endswith("(left in float)") for c in changed), changed)

    def _quantize_site(self, gm: fx.GraphModule, site: Any, report: dict) -> str:
        cfg = self.config
        node: fx.Node = site.handle
        w_node, param, transposed, x, bias = _weight_of(gm, node)
        target = w_node.target
        shared = _shared(gm, target, param)
        if shared:
            # Tied weights (an embedding shared with a head) are read elsewhere in float: leave them.
            return f"{site.name}: weight shared with {', '.join(shared)} (left in float)"
        w = param.detach().t() if transposed else param.detach()
        out_f, in_f = w.shape
        what = f"site {site.name}"
        if cfg.dtype is QuantDType.NF4:
            storage = quantize_nf4(w, cfg.block_size, cfg.double_quant, cfg.double_quant_block_size, cfg.pad, what)
            extra = (out_f, in_f, cfg.block_size, cfg.double_quant_block_size)
        elif cfg.dtype is QuantDType.INT4:
            storage = quantize_int4(w, cfg.block_size, cfg.symmetric, cfg.pad, what)
            extra = (out_f, in_f, cfg.block_size)
        else:
            storage = quantize_int8(w)
            extra = (out_f, in_f)
        spec = _SPECS[cfg.dtype]
        owner_path, _, leaf = target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        prefix = f"{owner_path}." if owner_path else ""
        device = param.device
        graph = gm.graph
        with graph.inserting_before(node):
            args: list[Any] = [x]
            for name in spec.storage:
                if name in storage:
                    owner.register_buffer(name, storage[name].to(device))
                    args.append(graph.get_attr(prefix + name))
                else:
                    args.append(None)
            args.append(bias)
            args.extend(extra)
            new = graph.call_function(spec.op._opoverload, tuple(args))
        new.meta.update({k: v for k, v in node.meta.items()})
        new.meta[QUANTIZED] = {"format": cfg.dtype.value, "in_features": in_f, "out_features": out_f, "dtype": site.dtype,
                              "has_bias": bias is not None}
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if not w_node.users:
            graph.erase_node(w_node)
        deq = spec.dequantize(self._args_for_check(args, storage, spec, w.dtype))
        max_err, rel_rms = _error(w, deq)
        before = param.numel() * param.element_size()
        after = sum(t.numel() * t.element_size() for t in storage.values())
        # The float W goes: no copy of it stays reachable from the module.
        delattr(owner, leaf)
        del param, w
        report[site.name] = {
            "format": cfg.dtype.value, "block_size": cfg.block_size if cfg.dtype is not QuantDType.INT8 else None,
            "double_quant": cfg.double_quant, "symmetric": cfg.symmetric if cfg.dtype is QuantDType.INT4 else None,
            "shape": [out_f, in_f], "bytes_before": before, "bytes_after": after,
            "max_abs_error": max_err, "rel_rms_error": rel_rms,
        }
        return (f"{site.name}: {cfg.dtype.value} {out_f}x{in_f}, {before} -> {after} bytes, "
                f"max abs error {max_err:.3g}, relative rms error {rel_rms:.3g}")

    @staticmethod
    def _args_for_check(args: list[Any], storage: dict[str, Tensor], spec: _OpSpec, dtype: torch.dtype) -> tuple:
        vals = [torch.empty(0, dtype=dtype)]
        vals += [storage.get(name) for name in spec.storage]
        vals += [None] + list(args[len(spec.storage) + 2 :])
        return tuple(vals)


def quantize_weights(gm: fx.GraphModule, config: QuantConfig) -> PassResult:
    return QuantizeWeights(config)(gm)


def apply_quant(model: fx.GraphModule, quant: QuantConfig | dict, lora_config: Any = None) -> PassResult:
    """The ``lora_fx.apply(..., quant=...)`` hook: quantize, then freeze everything quantized."""
    if isinstance(quant, dict):
        quant = QuantConfig.from_dict(quant)
    if not isinstance(quant, QuantConfig):
        raise ConfigError(f"quant must be a lora_fx.QuantConfig, got {type(quant).__name__}")
    return quantize_weights(model, quant)


# ---- reading a quantized graph back ------------------------------------------------------------
def quantized_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Site name -> the ``lora_fx::linear_<format>`` node, for every quantized site of ``gm``."""
    from lora_fx.passes.fx.find_sites import module_path

    return {module_path(n) or n.name: n for n in gm.graph.nodes
            if n.op == "call_function" and n.target in QUANT_OPS}


def _value(gm: fx.GraphModule, arg: Any) -> Any:
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return arg
    try:
        return gm.get_buffer(arg.target)
    except AttributeError:  # the bias stays a (frozen) parameter
        return gm.get_parameter(arg.target)


def dequantized_weight(gm: fx.GraphModule, site: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float ``[out, in]`` weight a quantized site computes with."""
    nodes = quantized_nodes(gm)
    if site not in nodes:
        raise ConfigError(f"site {site!r} is not quantized; quantized sites: {', '.join(sorted(nodes)) or 'none'}")
    node = nodes[site]
    spec = _SPECS[QUANT_OPS[node.target]]
    args = tuple(_value(gm, a) for a in node.args)
    return spec.dequantize((torch.empty(0, dtype=dtype), *args[1:]))


def linear_weight_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the frozen linear-site weights: float parameters plus quantized storage."""
    from lora_fx.passes.fx.find_sites import weight_node

    total = 0
    seen: set[int] = set()
    for site in find_sites(gm):
        if site.kind.value != "linear":
            continue
        node = site.handle
        if node.meta.get(QUANTIZED):
            spec = _SPECS[QUANT_OPS[node.target]]
            tensors = [_value(gm, a) for a in node.args[1 : 1 + len(spec.storage)]]
        else:
            tensors = [gm.get_parameter(weight_node(node).target)]
        for t in tensors:
            if isinstance(t, Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total





# ---- ONNX export --------------------------------------------------------------------------------
def _register_contrib_schemas() -> None:
    """onnx ships no schemas for ONNX Runtime's contrib ops; the exporter's tracer needs one to build a node."""
    import onnx
    from onnx.defs import OpSchema

    def param(name: str, type_str: str, optional: bool = False) -> Any:
        option = OpSchema.FormalParameterOption.Optional if optional else OpSchema.FormalParameterOption.Single
        return OpSchema.FormalParameter(name, type_str, "", param_option=option)

    def attr(name: str, kind: Any, required: bool) -> Any:
        # OpSchema.Attribute(name, type, description) defaults to required=True: say it every time.
        return OpSchema.Attribute(name, kind, "", required=required)

    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    ints = OpSchema.AttrType.INT
    specs = {
        "MatMulBnb4": ([param("A", "T1"), param("B", "T2"), param("absmax", "T1")],
                       [attr("K", ints, True), attr("N", ints, True), attr("block_size", ints, True), attr("quant_type", ints, True)]),
        "MatMulNBits": ([param("A", "T1"), param("B", "T2"), param("scales", "T1"), param("zero_points", "T2", True)],
                        [attr("K", ints, True), attr("N", ints, True), attr("bits", ints, False), attr("block_size", ints, True),
                         attr("accuracy_level", ints, False)]),
    }
    for name, (inputs, attributes) in specs.items():
        if onnx.defs.has(name, "com.microsoft"):
            continue
        schema = OpSchema(name, "com.microsoft", 1, inputs=inputs, outputs=[param("Y", "T1")],
                          type_constraints=[("T1", floats, ""), ("T2", ["tensor(uint8)"], "")], attributes=attributes)
        onnx.defs.register_schema(schema)


def _onnx_functions() -> dict[Any, Callable]:
    """Translations of the quantized linear ops for ``torch.onnx.export(dynamo=True)``.

    W stays packed in the file, as ONNX Runtime's own block-quantized matmuls, which
    ``passes/onnx/find_sites`` recognises as linear sites:

    * nf4 -> ``com.microsoft.MatMulBnb4`` (quant_type 1): the same flattened ``[N, K]`` layout, high
      nibble first, one absmax per block; double-quantized absmaxes are decoded in the graph first.
    * int4 -> ``com.microsoft.MatMulNBits`` (bits 4): blocks along K, low nibble first, zero point 8
      unless affine. Needs ``in_features % block_size == 0`` (the blocks must not straddle rows).
    * int8 -> ``DequantizeLinear`` (per output channel, axis 0) -> ``Transpose`` -> ``MatMul``.

    Export with ``optimize=False``: the exporter's optimizer would fold the int8 dequantize back
    into a float constant.
    """
    import onnxscript
    from onnxscript import opset20 as op

    _register_contrib_schemas()
    ms_opset = onnxscript.values.Opset("com.microsoft", 1)
    matmul_bnb4 = onnxscript.values.Op(ms_opset, "MatMulBnb4")
    matmul_nbits = onnxscript.values.Op(ms_opset, "MatMulNBits")

    def _bias(y, bias):
        return y if bias is None else op.Add(y, bias)

    def _nf4(x, qweight, qscale, qscale_factor, qscale_mean, bias, out_features, in_features, block_size, scaler_block_size):
        n_blocks = -(-out_features * in_features // block_size)
        if qscale_factor is None:
            absmax = op.CastLike(qscale, x)
        else:
            groups = -(-n_blocks // scaler_block_size)
            factor = op.Expand(op.Unsqueeze(qscale_factor, op.Constant(value_ints=[1])),
                               op.Constant(value_ints=[groups, scaler_block_size]))
            factor = op.Slice(op.Reshape(factor, op.Constant(value_ints=[-1])), op.Constant(value_ints=[0]),
                              op.Constant(value_ints=[n_blocks]))
            absmax = op.Add(op.Div(op.Cast(qscale, to=1), factor), qscale_mean)  # to=1: FLOAT
            absmax = op.CastLike(absmax, x)
        packed = qweight
        if n_blocks * block_size != out_features * in_features:  # drop the padding bytes of the last block
            packed = op.Slice(qweight, op.Constant(value_ints=[0]), op.Constant(value_ints=[(out_features * in_features + 1) // 2]))
        y = matmul_bnb4(x, packed, absmax, K=in_features, N=out_features, block_size=block_size, quant_type=1)
        return _bias(y, bias)

    def _int4(x, qweight, qscale, qzero, bias, out_features, in_features, block_size):
        if in_features % block_size:
            raise ConfigError(
                f"int4 export needs in_features ({in_features}) to be a multiple of block_size ({block_size}) so blocks "
                f"run along rows as MatMulNBits stores them; quantize with a block size that divides it"
            )
        per_row = in_features // block_size
        b = op.Reshape(qweight, op.Constant(value_ints=[out_features, per_row, block_size // 2]))
        scales = op.CastLike(qscale, x)
        if qzero is None:
            y = matmul_nbits(x, b, scales, K=in_features, N=out_features, bits=4, block_size=block_size)
        else:
            if per_row % 2:  # packed zero points must start a byte at each row
                raise ConfigError(
                    f"affine int4 export needs an even number of blocks per row (in_features/block_size = {per_row}); "
                    f"use symmetric int4 or another block size"
                )
            y = matmul_nbits(x, b, scales, qzero, K=in_features, N=out_features, bits=4, block_size=block_size)
        return _bias(y, bias)

    def _int8(x, qweight, qscale, bias, out_features, in_features):
        w = op.DequantizeLinear(qweight, qscale, axis=0)
        return _bias(op.MatMul(x, op.Transpose(op.CastLike(w, x), perm=[1, 0])), bias)

    return {linear_nf4._opoverload: _nf4, linear_int4._opoverload: _int4, linear_int8._opoverload: _int8}


def onnx_translation_table() -> dict[Any, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)`` / ``lora_fx.export_onnx``."""
    return _onnx_functions()
