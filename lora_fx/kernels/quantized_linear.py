"""lora_fx's quantized linear ops, one per format: ``lora_fx::linear_<format>(x, <packed storage>, bias, ...)``
and the ``lora_fx::linear_<format>_grad_input`` op its backward calls.

``SPECS`` maps each ``QuantDType`` to its op, storage names and decoder; ``QUANT_OPS`` the ops back to
formats. Importing this module registers the ops (fake and autograd too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from lora_fx.config import QuantDType
from lora_fx.kernels.quant_formats import Decoder, int4_decoder, int8_decoder, nf4_decoder
from lora_fx.kernels.tiled_linear import tiled_grad_input, tiled_linear

aten = torch.ops.aten
Tensor = torch.Tensor


# One op per format, each linear(x, dequantize(storage), bias). A fused op rather than a dequantize
# node feeding aten.linear: aten.linear would save the dequantized W for its backward, keeping a
# float copy of every layer's W alive across the step, which is what QLoRA exists to avoid. Forward
# and backward decode W a tile of rows at a time (kernels/tiled_linear) into the scratch buffer.

def _linear(x: Tensor, decoder: Decoder, bias: Optional[Tensor]) -> Tensor:
    return tiled_linear(x, decoder.rows, decoder.out_features, decoder.in_features, decoder.align, bias)


@torch.library.custom_op("lora_fx::linear_nf4", mutates_args=())
def linear_nf4(x: Tensor, qweight: Tensor, qscale: Tensor, qscale_factor: Optional[Tensor], qscale_mean: Optional[Tensor],
               bias: Optional[Tensor], out_features: int, in_features: int, block_size: int, scaler_block_size: int) -> Tensor:
    return _linear(x, nf4_decoder(qweight, qscale, qscale_factor, qscale_mean, out_features, in_features, block_size,
                                   scaler_block_size), bias)


@torch.library.custom_op("lora_fx::linear_int4", mutates_args=())
def linear_int4(x: Tensor, qweight: Tensor, qscale: Tensor, qzero: Optional[Tensor], bias: Optional[Tensor],
                out_features: int, in_features: int, block_size: int) -> Tensor:
    return _linear(x, int4_decoder(qweight, qscale, qzero, out_features, in_features, block_size), bias)


@torch.library.custom_op("lora_fx::linear_int8", mutates_args=())
def linear_int8(x: Tensor, qweight: Tensor, qscale: Tensor, bias: Optional[Tensor], out_features: int, in_features: int) -> Tensor:
    return _linear(x, int8_decoder(qweight, qscale), bias)


# The input gradient ``grad @ W`` is an op of its own for the same reason the forward is: autograd
# (and torch.compile's AOT autograd, which traces the backward) sees one opaque call, never the native
# decode kernels or the scratch buffer inside it. Same arguments as the forward, ``grad`` in place of x.
def _grad_input(grad: Tensor, decoder: Decoder) -> Tensor:
    return tiled_grad_input(grad, decoder.rows, decoder.out_features, decoder.in_features, decoder.align)


@torch.library.custom_op("lora_fx::linear_nf4_grad_input", mutates_args=())
def linear_nf4_grad_input(grad: Tensor, qweight: Tensor, qscale: Tensor, qscale_factor: Optional[Tensor],
                          qscale_mean: Optional[Tensor], bias: Optional[Tensor], out_features: int, in_features: int,
                          block_size: int, scaler_block_size: int) -> Tensor:
    return _grad_input(grad, nf4_decoder(qweight, qscale, qscale_factor, qscale_mean, out_features, in_features,
                                          block_size, scaler_block_size))


@torch.library.custom_op("lora_fx::linear_int4_grad_input", mutates_args=())
def linear_int4_grad_input(grad: Tensor, qweight: Tensor, qscale: Tensor, qzero: Optional[Tensor], bias: Optional[Tensor],
                           out_features: int, in_features: int, block_size: int) -> Tensor:
    return _grad_input(grad, int4_decoder(qweight, qscale, qzero, out_features, in_features, block_size))


@torch.library.custom_op("lora_fx::linear_int8_grad_input", mutates_args=())
def linear_int8_grad_input(grad: Tensor, qweight: Tensor, qscale: Tensor, bias: Optional[Tensor], out_features: int,
                           in_features: int) -> Tensor:
    return _grad_input(grad, int8_decoder(qweight, qscale))


@dataclass(frozen=True)
class OpSpec:
    op: Any
    storage: tuple[str, ...]  # names of the tensor arguments after x, in order
    bias_index: int  # position of bias among the op's arguments
    decoder: Callable[[tuple], Decoder]  # the op's arguments -> its W's decoder
    grad_input: Any  # the op computing grad @ W from (grad, <the op's other arguments>)

    def dequantize(self, args: tuple) -> Tensor:
        """The op's W ``[out, in]`` in x's dtype (``args[0]``), a fresh tensor."""
        return self.decoder(args).weight(args[0].dtype)


SPECS: dict[QuantDType, OpSpec] = {
    QuantDType.NF4: OpSpec(linear_nf4, ("qweight", "qscale", "qscale_factor", "qscale_mean"), 5,
                            lambda a: nf4_decoder(a[1], a[2], a[3], a[4], a[6], a[7], a[8], a[9]), linear_nf4_grad_input),
    QuantDType.INT4: OpSpec(linear_int4, ("qweight", "qscale", "qzero"), 4,
                             lambda a: int4_decoder(a[1], a[2], a[3], a[5], a[6], a[7]), linear_int4_grad_input),
    QuantDType.INT8: OpSpec(linear_int8, ("qweight", "qscale"), 3, lambda a: int8_decoder(a[1], a[2]),
                             linear_int8_grad_input),
}


def _register(spec: OpSpec) -> None:
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


for _spec in SPECS.values():
    _register(_spec)

QUANT_OPS = {spec.op._opoverload: dtype for dtype, spec in SPECS.items()}
