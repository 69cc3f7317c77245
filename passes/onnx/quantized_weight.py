"""A linear site's quantized weight in ONNX, read and rewritten in one place (helpers, not a pass).

Recognises the storages ``quantize_weights`` (ONNX and FX export) writes, and those of other tools
that ONNX Runtime runs:

* ``com.microsoft.MatMulBnb4`` with quant_type 1 (NF4): packed codes ``[ceil(N*K/2)]`` high nibble
  first, one absmax per ``block_size`` weights of the flattened ``[N, K]`` W;
* ``com.microsoft.MatMulNBits`` with bits 4: ``[N, ceil(K/block), block/2]`` low nibble first (each
  row padded to whole blocks), scales per block, zero point 8 or uint8 zero points packed per row,
  optional bias (input 5);
* ``com.microsoft.MatMulNBits`` with bits 8 (int8 as other tools write it, e.g. ONNX Runtime's
  MatMulNBits quantizer): ``[N, ceil(K/block), block]`` uint8 codes, zero point 128 or one uint8 zero
  point per block, scales per block (``per_channel``: every block of a row has the row's scale and the
  zero point is 128, lora_fx's int8 numerics), optional bias (input 5);
* ``MatMul(x, f(DequantizeLinear(q, scale[, zero])))`` with ``f`` Transposes / Casts: int8, one scale
  per tensor or per output channel (lora_fx writes ``DequantizeLinear(q [N, K], axis=0) -> Transpose``).

Storage inputs may be computed from constants (the FX exporter writes ``CastLike`` / ``Reshape`` and,
for double-quantized NF4 absmaxes, a small decode): they are evaluated here with numpy. Dequantizing
uses the very functions of ``lora_fx/kernels/quant_formats`` (one implementation of the numerics).
Requantizing writes the storage the node reads, in the same shapes and dtypes. Double-quantized NF4
absmaxes (int8 codes, one factor per ``double_quant_block_size`` absmaxes and their mean, decoded by
constant nodes in front of MatMulBnb4, as ``quantize_weights`` and the FX exporter write them;
``DoubleQuant``) are requantized the same way, into those constants, the decode left as it is. A decode
lora_fx does not recognise, or one shared with other nodes, comes back as MatMulBnb4's plain float
absmax input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from lora_fx.config import QuantDType
from lora_fx.errors import UnsupportedError

MS = "com.microsoft"
_CHAIN = {"Transpose", "Cast", "CastLike", "Identity"}


# ---- constants behind a value --------------------------------------------------------------------
def _np(value: ir.Value) -> np.ndarray:
    tensor = ir.convenience.get_const_tensor(value)  # an initializer, or a Constant (value, value_ints, ...)
    if tensor is not None:
        return np.asarray(tensor.numpy())
    return _evaluate(value)


def constant_value(value: ir.Value) -> np.ndarray:
    """The value of an initializer, a Constant, or a subgraph of constants computing it (UnsupportedError if none)."""
    return _np(value)


def _evaluate(value: ir.Value) -> np.ndarray:
    """The value of a constant-only subgraph (Cast, Reshape, ...), or UnsupportedError."""
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        raise UnsupportedError(f"quantized weight input {value.name!r} is not computed from constants; cannot merge into it")
    op, ins = node.op_type, node.inputs
    if op == "Identity":
        return _np(ins[0])
    if op == "Cast":
        return _np(ins[0]).astype(ir.DataType(node.attributes["to"].value).numpy())
    if op == "CastLike":
        target = ins[1].dtype
        if target is None:
            raise UnsupportedError(f"CastLike {node.name!r}: the target dtype is unknown; cannot evaluate the quantized weight")
        return _np(ins[0]).astype(target.numpy())
    if op == "Reshape":
        data, shape = _np(ins[0]), [int(d) for d in _np(ins[1])]
        shape = [data.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return data.reshape(shape)
    if op == "Concat":
        return np.concatenate([_np(v) for v in ins], axis=int(node.attributes["axis"].value))
    if op == "Unsqueeze":
        return np.expand_dims(_np(ins[0]), tuple(int(a) for a in _np(ins[1])))
    if op == "Expand":
        data = _np(ins[0])
        return np.array(data * np.ones([int(d) for d in _np(ins[1])], dtype=data.dtype))
    if op == "Slice":
        data = _np(ins[0])
        starts, ends = _np(ins[1]), _np(ins[2])
        axes = _np(ins[3]) if len(ins) > 3 and ins[3] is not None else range(len(starts))
        steps = _np(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
        index = [slice(None)] * data.ndim
        for s, e, a, st in zip(starts, ends, axes, steps):
            index[int(a)] = slice(int(s), int(e), int(st))
        return data[tuple(index)]
    if op in ("Add", "Sub", "Mul", "Div"):
        a, b = _np(ins[0]), _np(ins[1])
        out = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op](a, b)
        return out.astype(a.dtype)
    raise UnsupportedError(f"quantized weight input {value.name!r} comes from {op}, which lora_fx cannot evaluate; cannot merge into it")


# ---- double-quantized NF4 absmaxes -----------------------------------------------------------------
# The decode's constants, by the key quantize_nf4 gives them, and the initializer name quantize_weights uses.
_DQ_NAMES = {"qscale": "weight_scale", "qscale_factor": "weight_scale_factor", "qscale_mean": "weight_scale_mean"}
_AS_IS = {"Cast", "CastLike", "Identity"}
_SPREAD = {"Slice", "Reshape", "Expand", "Unsqueeze", "Identity", "Cast"}


@dataclass
class DoubleQuant:
    """MatMulBnb4's absmax input computed as ``qscale / factor + mean`` from constants: int8 ``qscale``,
    one float factor per ``block_size`` absmaxes, spread over them by Reshape/Unsqueeze/Expand/Slice."""

    block_size: int
    values: dict[str, ir.Value]  # "qscale" / "qscale_factor" / "qscale_mean" -> the constant
    reads: dict[str, tuple[ir.Node, int]]  # the same keys -> the decode node and input index reading it


def _back(value: ir.Value | None, ops: set[str]) -> tuple[ir.Value | None, list[ir.Node]]:
    """``value`` followed back through producers of ``ops`` (their input 0), and those producers."""
    nodes = []
    while value is not None and value.producer() is not None and value.producer().op_type in ops \
            and value.producer().domain in ("", "ai.onnx") and value.producer().inputs:
        nodes.append(value.producer())
        value = nodes[-1].inputs[0]
    return value, nodes


def _stored(value: ir.Value | None) -> bool:
    """An initializer or a Constant's output: a tensor the file holds."""
    if value is None:
        return False
    node = value.producer()
    return (node is None or node.op_type == "Constant") and ir.convenience.get_const_tensor(value) is not None


def _double_quant(node: ir.Node, absmax_read: np.ndarray, n_blocks: int) -> DoubleQuant | None:
    """The double quantization behind MatMulBnb4 ``node``'s absmax input, None when it is not one whose
    decode reproduces ``absmax_read`` exactly and feeds this node alone."""
    from lora_fx.kernels import quant_formats as formats

    value, nodes = _back(node.inputs[2], _AS_IS)
    add = value.producer() if value is not None else None
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    for i in (0, 1):
        div = add.inputs[i].producer() if add.inputs[i] is not None else None
        if div is not None and div.op_type == "Div" and div.domain in ("", "ai.onnx") and _stored(add.inputs[1 - i]):
            break
    else:
        return None
    mean_at = (add, 1 - i)
    qscale, q_nodes = _back(div.inputs[0], _AS_IS)
    factor, f_nodes = _back(div.inputs[1], _SPREAD)
    expand = next((n for n in f_nodes if n.op_type == "Expand"), None)
    if not (_stored(qscale) and _stored(factor)) or expand is None:
        return None
    try:
        q, f, mean, grid = _np(qscale), _np(factor), _np(mean_at[0].inputs[mean_at[1]]), _np(expand.inputs[1])
    except UnsupportedError:
        return None
    if q.dtype != np.int8 or q.size != n_blocks or mean.size != 1 or grid.size < 1 or int(grid.reshape(-1)[-1]) < 1:
        return None
    block = int(grid.reshape(-1)[-1])
    if f.size != -(-n_blocks // block) or not np.issubdtype(f.dtype, np.floating):
        return None
    decoded = formats.nf4_decoder(torch.zeros(1, dtype=torch.uint8), _t(q.reshape(-1)), _t(f.reshape(-1).astype(np.float32)),
                                  _t(mean.reshape(-1).astype(np.float32)), 1, 1, 1, block).scale
    # Requantizing writes these constants through lora_fx's decode: it must be the graph's own, to the bit.
    if not np.array_equal(decoded.numpy().astype(absmax_read.dtype), absmax_read.reshape(-1)):
        return None
    # The rewrite changes the constants in place: the decode must compute this node's absmax and nothing else.
    decode = [*nodes, add, div, *q_nodes, *f_nodes]
    ids = {id(n) for n in decode}
    for n in decode:
        for out in n.outputs:
            graph = n.graph
            if (graph is not None and out in graph.outputs) or any(
                    id(use.node) not in ids and not (use.node is node and use.idx == 2) for use in out.uses()):
                return None
    reads = {"qscale": (q_nodes[-1], 0) if q_nodes else (div, 0), "qscale_factor": (f_nodes[-1], 0) if f_nodes else (div, 1),
             "qscale_mean": mean_at}
    values = {"qscale": qscale, "qscale_factor": factor, "qscale_mean": mean_at[0].inputs[mean_at[1]]}
    return DoubleQuant(block, values, reads)


def double_quant_constants(graph: ir.Graph) -> list[ir.Value]:
    """The initializers holding double-quantized NF4 absmaxes (``DoubleQuant``) of the graph's MatMulBnb4 nodes, and
    of those in its subgraphs reading them from the outer scope (a site inside If branches: one decode per branch)."""
    out = []
    for node in (n for g in (graph, *graph.subgraphs()) for n in g):
        n, k, block = (_attr(node, key, 0) for key in ("N", "K", "block_size"))
        if node.domain != MS or node.op_type != "MatMulBnb4" or len(node.inputs) < 3 or not (n and k and block):
            continue
        try:  # the absmaxes only: the packed W is not read
            dq = _double_quant(node, _np(node.inputs[2]), -(-n * k // block))
        except UnsupportedError:
            continue
        if dq is not None:
            out += [v for v in dq.values.values() if v.name in graph.initializers and graph.initializers[v.name] is v and v not in out]
    return out


# ---- the quantized weight of one site ------------------------------------------------------------
@dataclass
class QuantizedWeight:
    """One site's quantized W: where its storage enters the graph and how to decode it."""

    dtype: QuantDType
    node: ir.Node  # MatMulBnb4 / MatMulNBits, or the DequantizeLinear of an int8 MatMul
    matmul: ir.Node  # the node computing x @ W (== node for the contrib ops)
    out_features: int
    in_features: int
    block_size: int = 0
    # node input index -> value as the node reads it; nf4 with ``double_quant`` also the DoubleQuant keys
    # ("qscale", "qscale_factor", "qscale_mean") -> the constant's value
    storage: dict[int | str, np.ndarray] = field(default_factory=dict)
    double_quant: DoubleQuant | None = None
    stored_out_in: bool = True  # int8: q is [out, in] (else [in, out])
    per_channel: bool = True  # int8: one scale per output channel (DequantizeLinear: else one per tensor;
    # MatMulNBits: else per block or with zero points other than 128)

    @property
    def nbits_int8(self) -> bool:
        """int8 in MatMulNBits (bits 8), not behind a DequantizeLinear."""
        return self.dtype is QuantDType.INT8 and self.node.domain == MS

    @property
    def float_dtype(self) -> np.dtype:
        """The float dtype the site computes in: the matmul's input's, else its output's (a file may record neither
        for an inner value, e.g. a Relu's output; quantize_weights records the output's)."""
        for value in (self.matmul.inputs[0], self.matmul.outputs[0]):
            if value is not None and value.dtype is not None and value.dtype.is_floating_point():
                return np.dtype(value.dtype.numpy())
        return np.dtype(np.float32)

    def describe(self) -> str:
        op = self.node.op_type
        return f"{op} {self.dtype.value}" + (f", block {self.block_size}" if self.block_size else "") + (
            f", double quant block {self.double_quant.block_size}" if self.double_quant else "")

    def dequantize(self, storage: dict[int | str, np.ndarray] | None = None) -> np.ndarray:
        """W ``[out, in]`` float32, decoded exactly as ``lora_fx/kernels/quant_formats`` does."""
        from lora_fx.kernels import quant_formats as formats

        s = self.storage if storage is None else storage
        n, k, bs = self.out_features, self.in_features, self.block_size
        if self.dtype is QuantDType.NF4:
            n_blocks = -(-n * k // bs)
            packed = np.zeros(n_blocks * bs // 2, np.uint8)
            flat = s[1].reshape(-1)
            packed[: flat.size] = flat
            if self.double_quant is None:
                absmax = s[2].reshape(-1)
            else:
                decoded = formats.nf4_decoder(_t(packed), _t(s["qscale"].reshape(-1)),
                                              _t(s["qscale_factor"].reshape(-1).astype(np.float32)),
                                              _t(s["qscale_mean"].reshape(-1).astype(np.float32)), n, k, bs,
                                              self.double_quant.block_size).scale
                absmax = decoded.numpy().astype(self.storage[2].dtype)  # the decode's last Cast: the type MatMulBnb4 reads
            absmax = _t(absmax.astype(np.float32))
            return formats.dequantize_nf4(_t(packed), absmax, None, None, n, k, bs, 256).numpy()
        if self.dtype is QuantDType.INT4:
            zero = _t(s[3].reshape(-1)) if 3 in s else None
            scale = _t(s[2].reshape(-1).astype(np.float32))
            return formats.dequantize_int4(_t(s[1].reshape(-1)), scale, zero, n, k, bs).numpy()
        if self.nbits_int8:
            zero = _t(s[3].reshape(-1)) if 3 in s else None
            return formats.dequantize_int8_nbits(_t(s[1]), _t(s[2].reshape(-1).astype(np.float32)), zero, n, k, bs).numpy()
        q = s[0] if self.stored_out_in else s[0].T
        scale = s[1].astype(np.float32)
        zero = s[2] if 2 in s else None
        if zero is not None:
            q = q.astype(np.float32) - (zero.astype(np.float32).reshape(-1, 1) if self.per_channel else zero.astype(np.float32))
        if self.per_channel:
            return formats.dequantize_int8(_t(q), _t(scale.reshape(-1))).numpy()
        return (q.astype(np.float32) * scale).astype(np.float32)

    def quantize(self, w: np.ndarray) -> dict[int | str, np.ndarray]:
        """Storage of ``w`` ``[out, in]`` in this site's format, shapes and dtypes (what the node reads)."""
        from lora_fx.kernels import quant_formats as formats

        wt = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        n, k, bs = self.out_features, self.in_features, self.block_size
        if self.dtype is QuantDType.NF4:
            dq = self.double_quant
            q = formats.quantize_nf4(wt, bs, dq is not None, dq.block_size if dq is not None else 256, pad=True)
            new = {1: q["qweight"][: (n * k + 1) // 2].numpy()}
            if dq is None:
                new[2] = q["qscale"].numpy()
            else:  # the decode in front of the node stays; its constants change
                new.update({key: q[key].numpy() for key in _DQ_NAMES})
        elif self.dtype is QuantDType.INT4:
            q = formats.quantize_int4(wt, bs, symmetric=3 not in self.storage, pad=True)
            new = {1: q["qweight"].numpy(), 2: q["qscale"].float().numpy()}
            if 3 in self.storage:
                new[3] = q["qzero"].numpy()
        elif self.nbits_int8:
            if self.per_channel:  # one scale per row, repeated per block: stays so
                q = formats.quantize_int8(wt)
                b, scale = formats.int8_to_nbits(q["qweight"], q["qscale"], bs)
            else:
                b, scale = formats.quantize_int8_blocks(wt, bs)
            new = {1: b.numpy(), 2: scale.numpy()}
            if 3 in self.storage:  # symmetric codes: every zero point 128
                new[3] = np.full(self.storage[3].shape, 128, np.uint8)
        else:
            if self.per_channel:
                q = formats.quantize_int8(wt)
                codes, scale = q["qweight"].numpy(), q["qscale"].numpy()
            else:
                scale = np.float32(np.abs(w).max() / 127)
                codes = np.clip(np.round(w / (scale if scale else 1)), -127, 127).astype(np.int8)
            new = {0: codes if self.stored_out_in else codes.T, 1: np.asarray(scale)}
            if 2 in self.storage:
                new[2] = np.zeros_like(self.storage[2])
        return {i: np.ascontiguousarray(arr.astype(self.storage[i].dtype).reshape(self.storage[i].shape)) for i, arr in new.items()}


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array))  # a writable copy


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _refuse(site: str, why: str) -> UnsupportedError:
    return UnsupportedError(f"site {site}: {why}; lora_fx cannot merge into this quantized weight; export with adapter slots instead")


def quantized_weight(site: str, node: ir.Node) -> QuantizedWeight | None:
    """The quantized weight ``node`` (the site's matmul) reads, None when W is not quantized."""
    if node.domain == MS and node.op_type == "MatMulBnb4":
        if _attr(node, "quant_type", 1) != 1:
            raise _refuse(site, "MatMulBnb4 with quant_type 0 (FP4) is not a format lora_fx quantizes")
        qw = QuantizedWeight(QuantDType.NF4, node, node, _attr(node, "N", 0), _attr(node, "K", 0), _attr(node, "block_size", 0))
        qw.storage = {1: _np(node.inputs[1]), 2: _np(node.inputs[2])}
        if qw.block_size:
            qw.double_quant = _double_quant(node, qw.storage[2], -(-qw.out_features * qw.in_features // qw.block_size))
        if qw.double_quant is not None:
            qw.storage.update({key: _np(v) for key, v in qw.double_quant.values.items()})
        return qw
    if node.domain == MS and node.op_type == "MatMulNBits":
        n, k, bs = _attr(node, "N", 0), _attr(node, "K", 0), _attr(node, "block_size", 0)
        bits = _attr(node, "bits", 4)
        if bits not in (4, 8):
            raise _refuse(site, f"MatMulNBits with bits={bits} (lora_fx quantizes 4 and 8 bits)")
        if not bs or bs % 2:
            raise _refuse(site, f"MatMulNBits with block_size={bs}")
        if len(node.inputs) > 4 and node.inputs[4] is not None:
            raise _refuse(site, "MatMulNBits with g_idx")
        if bits == 8:
            return _nbits_int8(site, node, n, k, bs)
        qw = QuantizedWeight(QuantDType.INT4, node, node, n, k, bs)
        qw.storage = {1: _np(node.inputs[1]), 2: _np(node.inputs[2])}
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            zero = _np(node.inputs[3])
            if zero.dtype != np.uint8 or zero.size != n * ((-(-k // bs) + 1) // 2):
                raise _refuse(site, "MatMulNBits zero points that are not 4-bit values packed in uint8 per row")
            qw.storage[3] = zero
        return qw
    if node.domain in ("", "ai.onnx") and node.op_type == "MatMul" and len(node.inputs) > 1:
        value, swaps = node.inputs[1], 0
        for _ in range(4):
            producer = value.producer() if value is not None else None
            if producer is None or producer.domain not in ("", "ai.onnx") or producer.op_type not in _CHAIN:
                break
            swaps += producer.op_type == "Transpose"
            value = producer.inputs[0]
        producer = value.producer() if value is not None else None
        if producer is None or producer.op_type != "DequantizeLinear" or producer.domain not in ("", "ai.onnx"):
            return None
        q = _np(producer.inputs[0])
        scale = _np(producer.inputs[1])
        if q.ndim != 2 or q.dtype != np.int8:
            raise _refuse(site, f"DequantizeLinear of a {q.dtype} {q.ndim}-D weight (lora_fx merges int8 2-D weights)")
        stored_out_in = swaps % 2 == 1
        out_axis = 0 if stored_out_in else 1
        per_channel = scale.size > 1
        axis = _attr(producer, "axis", 1)
        if _attr(producer, "block_size", 0) or (per_channel and (axis % 2 != out_axis or scale.ndim != 1)):
            raise _refuse(site, "DequantizeLinear with blocked or per-input-channel scales")
        out_f, in_f = (q.shape[0], q.shape[1]) if stored_out_in else (q.shape[1], q.shape[0])
        qw = QuantizedWeight(QuantDType.INT8, producer, node, out_f, in_f, 0, stored_out_in=stored_out_in, per_channel=per_channel)
        qw.storage = {0: q, 1: scale}
        if len(producer.inputs) > 2 and producer.inputs[2] is not None:
            qw.storage[2] = _np(producer.inputs[2])
        return qw
    return None


def _nbits_int8(site: str, node: ir.Node, n: int, k: int, bs: int) -> QuantizedWeight:
    """MatMulNBits bits 8: per-channel int8 (``per_channel``) or blocked int8."""
    from lora_fx.kernels import quant_formats as formats

    qw = QuantizedWeight(QuantDType.INT8, node, node, n, k, bs)
    qw.storage = {1: _np(node.inputs[1]), 2: _np(node.inputs[2])}
    blocks = -(-k // bs)
    if qw.storage[1].dtype != np.uint8 or qw.storage[1].size != n * blocks * bs or qw.storage[2].size != n * blocks:
        raise _refuse(site, f"MatMulNBits bits=8 whose B or scales do not have N={n} rows of {blocks} blocks of {bs}")
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        zero = _np(node.inputs[3])
        if zero.dtype != np.uint8 or zero.size != n * blocks:
            raise _refuse(site, "MatMulNBits bits=8 zero points that are not one uint8 per block")
        qw.storage[3] = zero
    zero = _t(qw.storage[3].reshape(-1)) if 3 in qw.storage else None
    qw.per_channel = formats.int8_nbits_per_channel(_t(qw.storage[2].reshape(-1)), zero, n, blocks)
    return qw


# ---- rewriting -----------------------------------------------------------------------------------
def _unique(graph: ir.Graph, name: str) -> str:
    while name in graph.initializers:
        name += ".merged"
    return name


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    name = _unique(graph, name)
    tensor = ir.tensor(np.ascontiguousarray(array), name=name)
    value = ir.Value(name=name, shape=ir.Shape(list(array.shape)), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def prune(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Remove what only fed ``values`` (now unused): their producers, upstream, and unused initializers of
    ``graph`` (the main graph). Producers in If branches (a site inside them) go from the branch holding them."""
    work = [v for v in values if v is not None]
    while work:
        value = work.pop()
        if any(True for _ in value.uses()) or value in graph.outputs or value in graph.inputs:
            continue
        if value.name in graph.initializers and graph.initializers[value.name] is value:
            del graph.initializers[value.name]
            continue
        node = value.producer()
        home = node.graph if node is not None else None
        if home is None or any(any(True for _ in o.uses()) or o in home.outputs for o in node.outputs):
            continue
        inputs = [v for v in node.inputs if v is not None]
        home.remove(node, safe=True)
        work.extend(inputs)


# Initializer names by the storage's node input index: the contrib ops (x is input 0), DequantizeLinear.
_NAMES = {MS: {1: "weight_q", 2: "weight_scale", 3: "weight_zero"}, "": {0: "weight_q", 1: "weight_scale", 2: "weight_zero"}}


def write_storage(graph: ir.Graph, site: str, qw: QuantizedWeight, storage: dict[int | str, np.ndarray],
                  others: tuple[QuantizedWeight, ...] = ()) -> None:
    """Give ``qw.node`` new storage (same shapes and dtypes), double-quantized absmaxes into the constants of
    their decode; an initializer only its readers read is updated in place. ``others``: the site's other nodes (a
    site inside If branches, every branch node reading the one storage in the main graph), given the same."""
    old = []
    for key, array in storage.items():
        readers: dict[int, list[tuple[ir.Node, int]]] = {}
        values: dict[int, ir.Value] = {}
        for each in (qw, *others):
            if isinstance(key, str):
                value, reader = each.double_quant.values[key], each.double_quant.reads[key]
            else:
                value, reader = each.node.inputs[key], (each.node, key)
            values[id(value)] = value
            readers.setdefault(id(value), []).append(reader)
        name = _DQ_NAMES[key] if isinstance(key, str) else _NAMES[MS if qw.node.domain == MS else ""][key]
        new = None
        for vid, value in values.items():
            direct = value.name in graph.initializers and graph.initializers[value.name] is value
            mine = {(id(node), index) for node, index in readers[vid]}
            if direct and value not in graph.inputs and {(id(u.node), u.idx) for u in value.uses()} == mine:
                value.const_value = ir.tensor(array, name=value.name)
                continue
            new = new if new is not None else new_initializer(graph, f"{site}.{name}", array)
            for node, index in readers[vid]:
                node.replace_input_with(index, new)
            old.append(value)
    prune(graph, old)


def replace_by_float(graph: ir.Graph, site: str, qw: QuantizedWeight, w: np.ndarray, weight: ir.Value | None = None) -> ir.Value:
    """The site computes ``x @ W`` with a float initializer ``<site>.weight`` ``[in, out]`` (bias kept), made here or,
    for the other nodes of a site inside If branches, the ``weight`` the first one got. Returns that initializer."""
    if weight is None:
        weight = new_initializer(graph, f"{site}.weight", np.ascontiguousarray(w.T.astype(qw.float_dtype)))
    node = qw.matmul
    home = node.graph  # the main graph, or the If branch holding this node of the site
    if node.domain in ("", "ai.onnx"):  # int8: MatMul(x, Transpose(DequantizeLinear(...)))
        old = node.inputs[1]
        node.replace_input_with(1, weight)
        prune(graph, [old])
        return weight
    bias = node.inputs[5] if node.op_type == "MatMulNBits" and len(node.inputs) > 5 else None
    matmul = ir.node("MatMul", [node.inputs[0], weight], name=node.name)
    matmul.metadata_props.update(node.metadata_props)
    nodes = [matmul]
    out = matmul.outputs[0]
    if bias is not None:
        add = ir.node("Add", [out, bias], name=f"{node.name}/bias" if node.name else None)
        nodes.append(add)
        out = add.outputs[0]
    old_out = node.outputs[0]
    # The type as a whole: other tools' files often leave it unset, and a dtype of None would not serialize.
    out.type, out.shape = old_out.type, old_out.shape
    name = old_out.name
    old_out.name = None
    out.name = name  # a graph output keeps its name
    home.insert_before(node, nodes)
    ir.convenience.replace_all_uses_with(old_out, out, replace_graph_outputs=True)
    old_inputs = [v for v in node.inputs[1:] if v is not None and v is not bias]
    home.remove(node, safe=True)
    prune(graph, old_inputs)
    return weight
