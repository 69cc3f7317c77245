"""Run an ONNX graph's int8 weight chains as ``lora_fx::linear_int8`` when torch executes the graph.

``torch.matmul`` on a ``DequantizeLinear`` output saves the dequantized W for its backward: training
through an int8 ONNX file would keep one float W per layer alive across the step, four times the
bytes the file stores, which is what QLoRA exists to avoid. ``find_int8_linears`` finds the chains
that lora_fx's own int8 op computes exactly, and ``OnnxModule`` runs each as one call of that op,
which decodes W a tile at a time in forward and again in backward (as MatMulNBits and MatMulBnb4
already run).

Matches, where ``q`` is an int8 initializer, the scale one float per output channel (or one for the
whole tensor) and the zero point absent or all zeros, and the intermediate values feed nothing else:

* ``DequantizeLinear(q [N, K], axis=0) -> Transpose -> MatMul(x, ·)``: lora_fx's ONNX int8 layout;
* ``DequantizeLinear(q [K, N], axis=1) -> MatMul(x, ·)``: ONNX Runtime's quantizer (per channel or
  per tensor); ``q`` is kept transposed once more, int8, since the op decodes rows of ``[N, K]``;
* ``Gemm(x, DequantizeLinear(q), C)`` with ``alpha = beta = 1`` and no ``transA``, either ``transB``.

Everything else (blocked or uint8 weights, non-zero zero points, a dequantized W read twice) runs node
by node as before: correct, but holding the float W for backward. ``refused`` in the result says why a
``DequantizeLinear`` that feeds a MatMul or Gemm was left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_TRAINING_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Int8Linear:
    """One matched chain: ``consumer`` computes ``x @ W.T (+ bias)`` with W ``[N, K]`` = ``q * scale``."""

    consumer: ir.Node  # the MatMul or Gemm, which becomes the fused call
    skipped: tuple[ir.Node, ...]  # the DequantizeLinear (and Transpose) it absorbs
    x: ir.Value
    qweight: str  # initializer name
    scale: str  # initializer name
    bias: ir.Value | None  # Gemm's C
    n_major: bool  # q is stored [N, K] (else [K, N], transposed once at load)
    out_features: int
    in_features: int


@dataclass
class Int8Linears:
    matched: list[Int8Linear] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # DequantizeLinear node name -> why


def _single_use(value: ir.Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output()


def _initializer(graph: ir.Graph, value: ir.Value | None) -> ir.TensorProtocol | None:
    if value is None or value.name not in graph.initializers or value.is_graph_input():
        return None
    return graph.initializers[value.name].const_value


def _is_op(node: ir.Node | None, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain in ("", "ai.onnx")


def _check_dequantize(graph: ir.Graph, dq: ir.Node) -> str | None:
    """Why ``dq`` is not an int8 weight lora_fx's op decodes exactly, or None."""
    q = _initializer(graph, dq.inputs[0])
    scale = _initializer(graph, dq.inputs[1] if len(dq.inputs) > 1 else None)
    if q is None or scale is None:
        return "its weight or scale is not an initializer"
    if q.dtype != ir.DataType.INT8 or len(q.shape) != 2:
        return f"the weight is {q.dtype.name} of rank {len(q.shape)}, not a 2-D int8 matrix"
    if scale.dtype not in _FLOATS:
        return f"the scale is {scale.dtype.name}"
    if dq.attributes.get_int("block_size", 0):
        return "the scale is blocked (block_size)"
    zp = _initializer(graph, dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    if len(dq.inputs) > 2 and dq.inputs[2] is not None:
        if zp is None:
            return "its zero point is not an initializer"
        if np.any(zp.numpy() != 0):
            return "its zero point is not 0"
    out_dtype = dq.attributes.get_int("output_dtype", 0)
    if out_dtype and out_dtype != scale.dtype.value:
        return "its output_dtype differs from the scale's type"
    return None


def _channel_axis(graph: ir.Graph, dq: ir.Node) -> int | None:
    """The axis of q the scale runs along (None: one scale for the whole tensor)."""
    scale = _initializer(graph, dq.inputs[1])
    if scale.size == 1:
        return None
    axis = dq.attributes.get_int("axis", 1)
    return axis + 2 if axis < 0 else axis


def _match(graph: ir.Graph, consumer: ir.Node, found: Int8Linears) -> Int8Linear | None:
    gemm = consumer.op_type == "Gemm"
    if len(consumer.inputs) < 2 or consumer.inputs[1] is None:
        return None
    b = consumer.inputs[1]
    chain: list[ir.Node] = []
    producer = b.producer()
    transposed = False
    if _is_op(producer, "Transpose"):
        perm = producer.attributes.get_ints("perm", [1, 0])
        if list(perm) != [1, 0] or not _single_use(b):
            return None
        chain.append(producer)
        transposed = True
        b = producer.inputs[0]
        producer = b.producer()
    if not _is_op(producer, "DequantizeLinear"):
        return None
    dq = producer
    why = _check_dequantize(graph, dq)
    if why is None and not _single_use(b):
        why = "its output feeds more than this MatMul/Gemm"
    if why is None and gemm:
        a = consumer.attributes
        if a.get_int("transA", 0) or a.get_float("alpha", 1.0) != 1.0 or a.get_float("beta", 1.0) != 1.0:
            why = "the Gemm has transA, alpha or beta"
    # MatMul(x, B) reads B as [K, N]; Gemm with transB reads it as [N, K]; a Transpose swaps once more.
    n_major = transposed != bool(gemm and consumer.attributes.get_int("transB", 0))
    if why is None:
        axis = _channel_axis(graph, dq)
        if axis is not None and axis != (0 if n_major else 1):
            why = "its scales run along the input features, not one per output channel"
    if why is not None:
        found.refused[dq.name or dq.outputs[0].name] = why
        return None
    q = _initializer(graph, dq.inputs[0])
    n, k = (q.shape[0], q.shape[1]) if n_major else (q.shape[1], q.shape[0])
    bias = consumer.inputs[2] if gemm and len(consumer.inputs) > 2 else None
    return Int8Linear(consumer, (dq, *chain), consumer.inputs[0], dq.inputs[0].name, dq.inputs[1].name, bias,
                      n_major, int(n), int(k))


def find_int8_linears(graph: ir.Graph) -> Int8Linears:
    """The int8 weight chains of ``graph`` that run as ``lora_fx::linear_int8``, and why others do not."""
    found = Int8Linears()
    for node in graph:
        if node.domain in ("", "ai.onnx") and node.op_type in ("MatMul", "Gemm"):
            hit = _match(graph, node, found)
            if hit is not None:
                found.matched.append(hit)
    return found


def storage(hit: Int8Linear, q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's ``qweight [N, K]`` int8 and ``qscale [N]`` float32 from the initializers' tensors."""
    qweight = q if hit.n_major else q.t().contiguous()
    qscale = scale.to(torch.float32).reshape(-1).expand(hit.out_features).contiguous()
    return qweight, qscale


def run_int8_linear(ctx: Any, x: list, a: dict) -> torch.Tensor:
    """The fused node: ``x @ W.T + C`` with W decoded by lora_fx's int8 op (float W never saved)."""
    import lora_fx.kernels.quantized_linear  # noqa: F401  (registers the ops)

    inp, q, s = ctx.t(x[0]), ctx.t(x[1]), ctx.t(x[2])
    c = ctx.t(x[3]) if len(x) > 3 else None
    n, k = a["N"], a["K"]
    bias = c if c is not None and c.dim() == 1 and c.shape[0] == n and c.dtype == inp.dtype else None
    if inp.dtype in _TRAINING_DTYPES:
        y = torch.ops.lora_fx.linear_int8(inp, q, s, bias, n, k)
    else:  # float64 and the like: decode whole (the op's kernels are for training dtypes)
        y = F.linear(inp, (q.to(torch.float32) * s[:, None]).to(inp.dtype), bias)
    return y + c if c is not None and bias is None else y


__all__ = ["Int8Linear", "Int8Linears", "find_int8_linears", "run_int8_linear", "storage"]
