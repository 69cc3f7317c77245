"""Run an ONNX graph's int8 weights as ``lora_fx::linear_int8`` when torch executes the graph.

``torch.matmul`` on a dequantized W saves that W for its backward: training through an int8 ONNX file
would keep one float W per layer alive across the step, four times the bytes the file stores, which
is what QLoRA exists to avoid. ``find_int8_linears`` finds the int8 weights that lora_fx's own int8
op computes exactly, and ``OnnxModule`` runs each as one call of that op, which decodes W a tile at a
time in forward and again in backward (as MatMulNBits bits 4 and MatMulBnb4 already run).

Matches, where the scale is one float per output channel (or one for the whole tensor):

* ``DequantizeLinear(q [N, K], axis=0) -> Transpose -> MatMul(x, ·)``: lora_fx's ONNX int8 layout
  (``passes/onnx/quantize_weights``), also with ``CastLike(·, x)`` before the Transpose, as lora_fx's
  FX export writes it (``lora_fx/quant_export``), or ``Cast`` to a float type (quantize_weights below opset 15);
* ``com.microsoft.MatMulNBits`` with bits 8 and one scale a row (as other tools write it, e.g. ONNX
  Runtime's MatMulNBits quantizer with one block a row; ``quant_formats.int8_from_nbits``: codes + 128
  in rows padded to whole blocks, every block of a row with the row's scale, zero point 128), optional
  bias (input 5). B and the scales may be initializers or computed from constants; the op's ``[N, K]``
  int8 storage is made once, at load, and the constant nodes and initializers only it needed are
  dropped (``skipped`` / ``released``);
* ``DequantizeLinear(q [K, N], axis=1) -> MatMul(x, ·)``: ONNX Runtime's quantizer (per channel or
  per tensor); ``q`` is kept transposed once more, int8, since the op decodes rows of ``[N, K]``;
* ``Gemm(x, DequantizeLinear(q), C)`` with ``alpha = beta = 1`` and no ``transA``, either ``transB``;

for DequantizeLinear where ``q`` is an int8 initializer, the zero point absent or all zeros, and the
intermediate values feed nothing else; in the main graph or in a subgraph (an If branch) reading main-graph
initializers. Everything else (blocked or uint8 weights, non-zero zero
points, a dequantized W read twice, per-block MatMulNBits scales) runs node by node: correct, but
holding the float W for backward. ``refused`` in the result says why an int8 weight was left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_TRAINING_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Int8Linear:
    """One matched weight: ``consumer`` computes ``x @ W.T (+ bias)`` with W ``[N, K]`` = ``q * scale``."""

    consumer: ir.Node  # the MatMul, Gemm or MatMulNBits, which becomes the fused call
    skipped: tuple[ir.Node, ...]  # the nodes it absorbs (DequantizeLinear and Transpose; what computes B)
    x: ir.Value
    qweight: str  # the value holding q (DequantizeLinear) or B (MatMulNBits)
    scale: str  # the value holding the scales
    bias: ir.Value | None  # Gemm's C, MatMulNBits' bias
    n_major: bool  # q is stored [N, K] (else [K, N], transposed once at load)
    out_features: int
    in_features: int
    block_size: int = 0  # MatMulNBits bits 8: its block size (0: a DequantizeLinear chain)
    released: tuple[str, ...] = ()  # initializers only the absorbed nodes read: the fused call does without them


@dataclass
class Int8Linears:
    matched: list[Int8Linear] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # DequantizeLinear node name -> why


def _single_use(value: ir.Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output()


def _initializer(graph: ir.Graph, value: ir.Value | None) -> ir.TensorProtocol | None:
    # By identity: a subgraph's value of the same name as one of ``graph``'s initializers is another value.
    if value is None or graph.initializers.get(value.name) is not value or value.is_graph_input():
        return None
    return value.const_value


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
    cast = _is_op(producer, "Cast") and producer.attributes.get_int("to", 0) in {int(t) for t in _FLOATS}
    if (cast or _is_op(producer, "CastLike") and producer.inputs[1] is consumer.inputs[0]) and _single_use(b):
        # W cast to x's type (lora_fx's FX export writes CastLike; quantize_weights, below opset 15, Cast to the type
        # MatMul/Gemm then binds x to): what linear_int8 computes for that x anyway.
        chain.append(producer)
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


def _from_constants(graph: ir.Graph, value: ir.Value | None, node: ir.Node | None = None) -> bool:
    """Whether ``value`` is computed from initializers and constants alone (CastLike's target is read for
    its type only); ``node``: the producer to judge instead of ``value``'s."""
    if value is not None and (value.is_graph_input() or _initializer(graph, value) is not None):
        return not value.is_graph_input()
    node = node if node is not None else (value.producer() if value is not None else None)
    if node is None or node.graph is not graph:
        return False
    inputs = node.inputs[:1] if node.op_type == "CastLike" else node.inputs
    return all(v is None or _from_constants(graph, v) for v in inputs)


def _feeders(graph: ir.Graph, consumer: ir.Node, values: list[ir.Value | None]) -> tuple[list[ir.Node], list[str]]:
    """The constant-only nodes computing ``values`` that nothing but ``consumer`` (through them) reads, and
    the initializers only they and ``consumer`` read."""
    nodes: list[ir.Node] = []
    inits: list[str] = []
    taken = {id(consumer)}
    work = [v for v in values if v is not None]
    while work:  # a value refused while one of its readers was not taken yet is pushed again by that reader
        value = work.pop()
        if value.is_graph_output() or value.is_graph_input() or any(id(user) not in taken for user, _ in value.uses()):
            continue
        if _initializer(graph, value) is not None:
            inits.append(value.name)
            continue
        node = value.producer()
        if node is None or id(node) in taken or not _from_constants(graph, None, node) or any(
                o.is_graph_output() or any(id(u) not in taken for u, _ in o.uses()) for o in node.outputs if o is not value):
            continue
        nodes.append(node)
        taken.add(id(node))
        work.extend(v for v in (node.inputs[:1] if node.op_type == "CastLike" else node.inputs) if v is not None)
    return nodes, list(dict.fromkeys(inits))


def _match_nbits(graph: ir.Graph, node: ir.Node, found: Int8Linears) -> Int8Linear | None:
    """MatMulNBits bits 8 with one scale a row and zero point 128, else None (refused when it is int8 of another layout)."""
    from lora_fx.errors import LoraFxError
    from lora_fx.passes.onnx.quantized_weight import quantized_weight

    if node.attributes.get_int("bits", 4) != 8:
        return None
    key = node.name or node.outputs[0].name
    try:
        qw = quantized_weight(key, node)
    except LoraFxError as exc:
        found.refused[key] = str(exc)
        return None
    if not qw.per_channel:
        found.refused[key] = "its scales differ between the blocks of a row, or its zero points are not 128"
        return None
    bias = node.inputs[5] if len(node.inputs) > 5 else None
    skipped, released = _feeders(graph, node, list(node.inputs[1:4]))
    return Int8Linear(node, tuple(skipped), node.inputs[0], node.inputs[1].name, node.inputs[2].name, bias, True,
                      qw.out_features, qw.in_features, qw.block_size, tuple(released))


def find_int8_linears(graph: ir.Graph) -> Int8Linears:
    """The int8 weights of ``graph`` and of its subgraphs (If branches, Loop bodies: Optimum's merged decoders hold
    every layer in an If, reading the main graph's initializers) that run as ``lora_fx::linear_int8``, and why others
    do not. Storage is looked up among ``graph``'s initializers, which a subgraph reads from the outer scope."""
    found = Int8Linears()
    for node in (n for g in (graph, *graph.subgraphs()) for n in g):
        hit = None
        if node.domain in ("", "ai.onnx") and node.op_type in ("MatMul", "Gemm"):
            hit = _match(graph, node, found)
        elif node.domain == "com.microsoft" and node.op_type == "MatMulNBits":
            hit = _match_nbits(graph, node, found)
        if hit is not None:
            found.matched.append(hit)
    return found


def storage(hit: Int8Linear, read: Callable[[str], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's ``qweight [N, K]`` int8 and ``qscale [N]`` float32; ``read(name)`` gives an initializer's
    tensor. MatMulNBits' B and scales computed from constants (the FX export) are evaluated from the graph."""
    if not hit.block_size:
        q, scale = read(hit.qweight), read(hit.scale)
        qweight = q if hit.n_major else q.t().contiguous()
        qscale = scale.to(torch.float32).reshape(-1).expand(hit.out_features).contiguous()
        return qweight, qscale
    from lora_fx.kernels import quant_formats as formats
    from lora_fx.passes.onnx.quantized_weight import constant_value

    graph = hit.consumer.graph

    def tensor(index: int) -> torch.Tensor | None:
        value = hit.consumer.inputs[index] if len(hit.consumer.inputs) > index else None
        if value is None:
            return None
        if _initializer(graph, value) is not None:
            return read(value.name).reshape(-1)
        return torch.from_numpy(np.array(constant_value(value))).reshape(-1)

    own = formats.int8_from_nbits(tensor(1), tensor(2), tensor(3), hit.out_features, hit.in_features, hit.block_size)
    if own is None:  # find_int8_linears checked the layout
        raise AssertionError(f"{hit.consumer.name}: not a per-channel int8 MatMulNBits layout")
    return own


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
