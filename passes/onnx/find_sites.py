"""Find the linear and attention sites of an ONNX model (an ``onnx_ir.Model``).

Linear sites (``Site.kind == linear``; ``Site.handle`` is the ONNX node):

* ``MatMul(x, W)`` with W constant: an initializer or ``Constant``, possibly reached through
  ``Transpose`` / ``Cast`` / ``DequantizeLinear`` / ``Identity`` (how exporters and quantizers store
  ``[out, in]`` or compressed weights); a following ``Add`` of a constant ``[out]`` vector is the bias.
* ``Gemm(x, W[, C])`` with W constant, ``transB`` 0 or 1, with or without C;
  ``com.microsoft.FusedMatMul`` (``transB``) from ONNX Runtime's fusions.
* ``com.microsoft.MatMulNBits`` and ``com.microsoft.MatMulBnb4`` (block-quantized weights, shapes
  from the ``K``/``N`` attributes).
* ``com.microsoft.Attention``'s packed QKV weight: reported as a linear site (op
  ``com.microsoft.Attention``) that ``insert_lora`` refuses with a clear message, since its
  projection output is not a tensor of the graph.

Attention sites (``kind == attention``): the opset-23/24 ``Attention`` op;
``com.microsoft.MultiHeadAttention`` / ``Attention`` / ``GroupQueryAttention``; and the decomposed
form exporters write: ``MatMul(q, kᵀ)`` → scale (``Mul``/``Div``, on the scores or on q and k) →
optional mask (``Add``/``Where``, torch's ``IsNaN``/``Where`` guards) → ``Softmax`` → optional
``Where``/``Cast``/``Dropout`` → ``MatMul(·, v)``; and the same with the heads merged into the batch axis
(Bloom; ``op == "merged_heads"``): ``MatMul`` on ``[batch*heads, ...]`` → scale, bias → Reshape to
``[batch, heads, q, k]`` → mask → ``Softmax`` → Reshape back → ``MatMul(·, v)``, the heads read from that
view. ``num_heads`` and ``kv_heads`` come from static shapes or attributes, and for grouped-query models
from the K projection (so a repeated K still reports the true kv head count).

Control-flow subgraphs (the branches of ``If``, the bodies of ``Loop`` and ``Scan``, nested at any depth) are
searched the same way. A linear layer in ``If`` branches whose weight is an initializer of the main graph (Hugging
Face Optimum's merged decoders hold the whole decoder in an ``If``, both branches reading one set of weights) is one
ordinary site, however many branch nodes read that weight: the passes put one adapter in the main graph and a branch
at every such node (``site_nodes``; ``Sites.inside`` says where each lies). The rest (attention inside subgraphs,
layers in ``Loop``/``Scan`` bodies, weights stored inside a subgraph) is reported apart (``Sites.subgraphs``), so that
target selection can say why a target matching it is not adapted; no pass rewrites it.

Names, in order of preference: the dynamo exporter's ``pkg.torch.onnx.name_scopes`` metadata (the
calling module's path), TorchScript node names (``/encoder/layer.0/attention/self/query/MatMul``),
the weight initializer's name (``….weight``), the node name; a module that runs a linear on its
child's weight (``nn.MultiheadAttention``'s out_proj) leaves the site to the child's name
(``attn.out_proj``), marked ``part_of`` the attention where the file shows it is one, as in FX. A
name used twice (a weight tied across several uses, a module called twice) gets ``_1``, ``_2``… on
its later uses. Nodes a
lora_fx pass inserted (metadata ``lora_fx.inserted``; passes that add nodes set it) are never
sites, and neither are MatMuls on adapter weights (``….lora_A``/``lora_B`` names, or weights that
are also graph inputs, the way ONNX Runtime adapter slots are exposed) whoever inserted them.

``module_tree`` rebuilds the source model's module tree, as far as the file describes it, for target
selection (see its docstring).
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import onnx_ir as ir

from lora_fx.sites import EMBEDDING_LOOKUP, MULTIHEAD_ATTENTION, ONNX_OPS, IRKind, Site, SiteKind

# Node metadata key set on every node a lora_fx pass adds, so later passes never take them for sites.
INSERTED = "lora_fx.inserted"
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
CLASS_HIERARCHY = "pkg.torch.onnx.class_hierarchy"
MS = "com.microsoft"

_WEIGHT_CHAIN_OPS = {"Transpose", "Cast", "DequantizeLinear", "Identity", "CastLike"}
_SCORE_OPS = {"Add", "Where", "Mul", "Div", "Sub", "Cast", "Identity", "Tanh", "Max", "Min", "Clip"}
_PROB_OPS = {"Where", "Cast", "Dropout", "Identity"}
_SHAPE_OPS = {"Reshape", "Identity", "Cast", "Transpose", "Squeeze", "Unsqueeze", "Flatten"}
# Ops a Q/K tensor passes through between its projection and the attention, keeping the head count.
_HEAD_PATH_OPS = {
    "Reshape", "Transpose", "Mul", "Div", "Add", "Cast", "Identity", "RotaryEmbedding", "Unsqueeze", "Expand",
    "Squeeze", "Concat", "Neg", "Sub", "SimplifiedLayerNormalization", "RMSNormalization", "LayerNormalization",
}

_DTYPES = {
    ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16",
    ir.DataType.DOUBLE: "float64",
}


def dtype_name(dtype: ir.DataType | None) -> str:
    return _DTYPES.get(dtype, str(getattr(dtype, "name", dtype)).lower()) if dtype is not None else "float32"


def const_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant tensor behind ``value``: an initializer or a ``Constant`` node's value."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain == "" and "value" in node.attributes:
        return node.attributes["value"].as_tensor()
    return None


def is_inserted(node: ir.Node) -> bool:
    return INSERTED in node.metadata_props


@dataclass
class LinearParts:
    """How one linear site computes: what insert_lora and the weight passes need to rewrite it.

    ``weight`` is the stored constant (an initializer, or a Constant's output); ``chain`` the
    nodes between it and the consuming op (Transpose, Cast, DequantizeLinear...), nearest first;
    ``output`` the value the site's result is read from (after the bias ``Add`` when there is one).
    ``out_in`` is True when the effective weight is ``[out, in]`` (Gemm transB=1, MatMulNBits).
    """

    node: ir.Node
    x: ir.Value
    weight: ir.Value | None
    chain: list[ir.Node]
    in_features: int
    out_features: int
    out_in: bool
    bias: ir.Value | None
    bias_node: ir.Node | None
    output: ir.Value
    dtype: str
    adaptable: bool = True
    # The stored constant is [out, in] (torch's nn.Linear layout, before any Transpose in ``chain``).
    stored_out_in: bool = False
    # Gemm's ``alpha``: the effective weight is ``alpha · W`` (a fold must add ``A @ B / alpha`` to W).
    alpha: float = 1.0


def _weight_source(value: ir.Value | None) -> tuple[ir.Value | None, list[ir.Node]]:
    """Walk back from a matmul operand through weight-storage ops to a constant."""
    chain: list[ir.Node] = []
    for _ in range(4):
        if value is None:
            return None, chain
        if const_tensor(value) is not None:
            return value, chain
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in _WEIGHT_CHAIN_OPS:
            return None, chain
        chain.append(node)
        value = node.inputs[0]
    return None, chain


def _effective_shape(weight: ir.Value, chain: list[ir.Node]) -> tuple[int, ...] | None:
    shape = tuple(const_tensor(weight).shape)
    for node in reversed(chain):  # from the constant toward the consumer
        if node.op_type == "Transpose":
            perm = node.attributes.get_ints("perm", None) or list(reversed(range(len(shape))))
            shape = tuple(shape[p] for p in perm)
    return shape if len(shape) == 2 and all(isinstance(d, int) for d in shape) else None


def _weight_dtype(weight: ir.Value, chain: list[ir.Node], consumer: ir.Node) -> ir.DataType | None:
    """The dtype the site computes in (a Cast/DequantizeLinear changes the stored one)."""
    for value in (consumer.outputs[0], consumer.inputs[0]):
        if value is not None and value.dtype is not None:
            return value.dtype
    for node in chain:  # nearest the consumer first
        if node.outputs[0].dtype is not None:
            return node.outputs[0].dtype
        if node.op_type == "Cast" and "to" in node.attributes:
            return ir.DataType(node.attributes.get_int("to"))
        if node.op_type == "DequantizeLinear" and (scale := const_tensor(node.inputs[1])) is not None:
            return scale.dtype
    return const_tensor(weight).dtype


def _bias_after(node: ir.Node, out_features: int) -> tuple[ir.Value | None, ir.Node | None]:
    """A constant ``[out]`` vector added to the node's single output: the linear layer's bias."""
    y = node.outputs[0]
    users = [u for u, _ in y.uses()]
    if len(users) != 1 or users[0].op_type != "Add" or users[0].domain != "" or is_inserted(users[0]):
        return None, None
    add = users[0]
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    source, _ = _weight_source(other)
    if source is None:
        return None, None
    shape = tuple(const_tensor(source).shape)
    if shape in ((out_features,), (1, out_features)):
        return other, add
    return None, None


_ADAPTER_NAME = re.compile(r"\.lora_[AB](\.|$)")


def _is_adapter_weight(weight: ir.Value) -> bool:
    """An adapter matrix, not a base weight: LoRA-named, or a graph input (ONNX Runtime overrides those
    per run, as with ``.onnx_adapter`` slots), even when a tool other than lora_fx inserted it."""
    return weight.is_graph_input() or bool(weight.name and _ADAPTER_NAME.search(weight.name))


def linear_parts(node: ir.Node) -> LinearParts | None:
    """The parts of ``node`` if it is a linear site, else None."""
    if is_inserted(node) or not node.inputs or node.inputs[0] is None:
        return None
    op, domain = node.op_type, node.domain
    x = node.inputs[0]
    if domain in ("", "ai.onnx") and op in ("MatMul", "Gemm") or domain == MS and op == "FusedMatMul":
        if len(node.inputs) < 2 or const_tensor(x) is not None:
            return None
        weight, chain = _weight_source(node.inputs[1])
        if weight is None or _is_adapter_weight(weight):
            return None
        shape = _effective_shape(weight, chain)
        if shape is None:
            return None
        if op == "MatMul":
            trans_b, trans_a = 0, 0
        else:
            trans_a = node.attributes.get_int("transA", 0)
            trans_b = node.attributes.get_int("transB", 0)
        if trans_a:
            return None
        in_f, out_f = (shape[1], shape[0]) if trans_b else shape
        dtype = dtype_name(_weight_dtype(weight, chain, node))
        bias, bias_node = None, None
        if op == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = node.inputs[2]
        elif op == "MatMul":
            bias, bias_node = _bias_after(node, out_f)
        output = bias_node.outputs[0] if bias_node is not None else node.outputs[0]
        swaps = sum(n.op_type == "Transpose" for n in chain) % 2
        return LinearParts(
            node, x, weight, chain, int(in_f), int(out_f), bool(trans_b), bias, bias_node, output, dtype,
            stored_out_in=bool(trans_b) != bool(swaps),
            alpha=node.attributes.get_float("alpha", 1.0) if op != "MatMul" else 1.0,
        )
    if domain == MS and op in ("MatMulNBits", "MatMulBnb4"):
        in_f, out_f = node.attributes.get_int("K", 0), node.attributes.get_int("N", 0)
        if not in_f or not out_f:
            return None
        scales = node.inputs[2] if len(node.inputs) > 2 else None
        dtype = dtype_name(node.outputs[0].dtype or (scales.dtype if scales is not None else None))
        bias, bias_node = (node.inputs[5], None) if op == "MatMulNBits" and len(node.inputs) > 5 else (None, None)
        if bias is None:  # a bias Add after the op, as after MatMul: the site's output is its sum
            bias, bias_node = _bias_after(node, out_f)
        output = bias_node.outputs[0] if bias_node is not None else node.outputs[0]
        return LinearParts(node, x, node.inputs[1], [], in_f, out_f, True, bias, bias_node, output, dtype, stored_out_in=True)
    if domain == MS and op == "Attention" and len(node.inputs) > 1:
        weight = node.inputs[1]
        t = const_tensor(weight)
        if t is None or len(t.shape) != 2:
            return None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        return LinearParts(
            node, x, weight, [], int(t.shape[0]), int(t.shape[1]), False, bias, None, node.outputs[0],
            dtype_name(t.dtype), adaptable=False,
        )
    return None


# ---- names ---------------------------------------------------------------------------------------

_ANON = re.compile(r"^(val_\d+|onnx::.*|_?v_?\d+|arg\d+.*|p_.*|b_.*|c_.*|initializer.*)$")


def _scope_name(node: ir.Node) -> str | None:
    text = node.metadata_props.get(NAME_SCOPES)
    if text:
        try:
            scopes = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            scopes = None
        if isinstance(scopes, (list, tuple)) and len(scopes) >= 2 and scopes[-2]:
            return str(scopes[-2])
    return None


def _torchscript_name(node: ir.Node) -> str | None:
    name = node.name or ""
    if not name.startswith("/"):
        return None
    parts = [p for p in name.strip("/").split("/")[:-1] if p]
    return ".".join(parts) or None


def _initializer_name(weight: ir.Value | None) -> str | None:
    name = weight.name if weight is not None else None
    if not name or _ANON.match(name) or ".weight" not in name:
        return None
    return name.split(".weight")[0] or None


def _bias_name(bias: ir.Value | None) -> str | None:
    name = bias.name if bias is not None else None
    if not name or _ANON.match(name) or not name.endswith(".bias"):
        return None
    return name[: -len(".bias")] or None


def _longer_path(traced: str | None, stored: str | None) -> str | None:
    """The parameter's module path where the traced one is a tail of it. TorchScript names nodes by the call
    path: a module its grandparent calls directly (OPT's ``self.model.decoder(...)``) loses a level there
    (``decoder.layers.0…``), which the parameter names (``model.decoder.layers.0…``) keep."""
    return stored if traced and stored and stored.endswith("." + traced) else None


def site_name(node: ir.Node, weight: ir.Value | None = None, bias: ir.Value | None = None,
              leads: CallPathLeads | None = None) -> str:
    """The source module path of a node, by the best evidence the exporter left. ``leads``: what the file's
    TorchScript call paths lack in front (``call_path_leads``), for a node whose parameters have no stored name."""
    traced, stored = _torchscript_name(node), _initializer_name(weight) or _bias_name(bias)
    caller = _scope_name(node) or _longer_path(traced, stored) or (leads.full(traced) if leads is not None and traced else traced)
    if caller and stored and stored.startswith(f"{caller}."):
        # A parent running a linear on its child's weight (nn.MultiheadAttention's out_proj): named after the
        # child, as FX and PEFT name it, or two linears of different shapes would share the parent's name.
        return stored
    return caller or stored or node.name or f"{node.op_type}"


# ---- attention -----------------------------------------------------------------------------------


def _static_shape(value: ir.Value | None) -> tuple | None:
    if value is None or value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in value.shape)


def _scalar(value: ir.Value | None) -> float | None:
    t = const_tensor(value)
    if t is None or math.prod(t.shape) != 1:
        return None
    try:
        return float(np.asarray(t.numpy()).reshape(-1)[0])
    except Exception:  # a dtype numpy cannot read: no scale evidence
        return None


def _rank(value: ir.Value | None) -> int | None:
    return len(value.shape) if value is not None and value.shape is not None else None


def _strip_scale(value: ir.Value) -> tuple[ir.Value, float | None, tuple | None]:
    """Walk back through Mul/Div by scalars (the scale torch puts on q and k) and transposes.

    Returns the tensor before them, the product of the scale factors (None when a scale was computed
    in the graph, as unoptimized exports do, rather than stored as a constant), and the first 4-D
    static shape met on the way (``[B, H, S, D]`` for q, ``[B, H, D, S]`` or ``[B, H, S, D]`` for k:
    the head count is dim 1 either way).
    """
    factor: float | None = 1.0
    shape: tuple | None = None
    for _ in range(5):
        if shape is None and (st := _static_shape(value)) and len(st) == 4:
            shape = st
        node = value.producer()
        if node is None or node.op_type not in ("Mul", "Div", "Transpose") or node.domain != "":
            break
        if node.op_type == "Transpose":
            value = node.inputs[0]
            continue
        a, b = node.inputs[0], node.inputs[1]
        sb, sa = _scalar(b), _scalar(a)
        if sb is not None:
            factor = None if factor is None else factor * (sb if node.op_type == "Mul" else 1.0 / sb)
            value = a
        elif sa is not None and node.op_type == "Mul":
            factor = None if factor is None else factor * sa
            value = b
        elif _rank(b) == 0 or (_rank(a) or 0) >= 3:
            factor, value = None, a
        elif node.op_type == "Mul" and (_rank(a) == 0 or (_rank(b) or 0) >= 3):
            factor, value = None, b
        else:
            break
    if shape is None and (st := _static_shape(value)) and len(st) == 4:
        shape = st
    return value, factor, shape


def _projection_out(value: ir.Value | None, max_hops: int = 14) -> int | None:
    """out_features of the linear site a Q/K tensor was projected by, if the path keeps all heads."""
    for _ in range(max_hops):
        node = value.producer() if value is not None else None
        if node is None:
            return None
        parts = linear_parts(node) if node.op_type not in ("Add",) else None
        if parts is None and node.op_type == "Add" and node.outputs[0] is not None:
            # MatMul + bias Add: the Add's output is the projection's output.
            for inp in node.inputs:
                prod = inp.producer() if inp is not None else None
                if prod is not None and (p := linear_parts(prod)) is not None and p.bias_node is node:
                    return p.out_features
        if parts is not None:
            return parts.out_features if parts.adaptable else None
        if node.op_type == "Split" and len(node.outputs) > 1:
            # A packed projection (GPT-2's c_attn) split into equal Q, K, V parts.
            sizes = const_tensor(node.inputs[1]) if len(node.inputs) > 1 else None
            if sizes is not None and len(set(np.asarray(sizes.numpy()).tolist())) != 1:
                return None
            whole = _projection_out(node.inputs[0], max_hops - 1)
            return whole // len(node.outputs) if whole and whole % len(node.outputs) == 0 else None
        if node.op_type not in _HEAD_PATH_OPS:
            return None  # Slice/Gather...: a packed projection, its width says nothing of the heads
        value = next((i for i in node.inputs if i is not None and const_tensor(i) is None), None)
    return None


def _path_heads(value: ir.Value | None, head_dim: int, max_hops: int = 24) -> int | None:
    """The smallest head count among ``[B, H, S, head_dim]`` shapes on the way back to the projection.

    Grouped-query models repeat K and V (Unsqueeze → Expand → Reshape) to the query's head count
    before the attention; the shapes before the repeat still show the kv head count.
    """
    best = None
    for _ in range(max_hops):
        st = _static_shape(value)
        if st and len(st) == 4 and st[-1] == head_dim and isinstance(st[1], int):
            best = st[1] if best is None else min(best, st[1])
        node = value.producer() if value is not None else None
        if node is None or linear_parts(node) is not None or node.op_type not in _HEAD_PATH_OPS | {"Slice"}:
            break
        value = next((i for i in node.inputs if i is not None and const_tensor(i) is None), None)
    return best


def _shape_entries(value: ir.Value | None) -> list[int | None] | None:
    """A Reshape target's entries: a constant, or a Concat of one-element pieces (TorchScript builds
    ``view(b, s, heads, head_dim)`` from ``Shape`` gathers and constants); unknown pieces are None."""
    t = const_tensor(value)
    if t is not None:
        return [int(v) for v in np.asarray(t.numpy()).reshape(-1)]
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Concat":
        return None
    entries: list[int | None] = []
    for piece in node.inputs:
        t = const_tensor(piece)
        if t is not None:
            entries += [int(v) for v in np.asarray(t.numpy()).reshape(-1)]
        elif (piece.producer() is not None and piece.producer().op_type == "Unsqueeze") or _rank(piece) == 1:
            entries.append(None)  # one runtime dim (batch or sequence length)
        else:
            return None
    return entries


def _reshape_heads(value: ir.Value | None, max_hops: int = 6) -> tuple[int | None, int] | None:
    """``(heads, head_dim)`` from the Reshape that split Q or K into heads (``[B, S, H, D]``, D constant; H None
    where it is inferred, -1, as in ``view(*input_shape, -1, head_dim)``)."""
    for _ in range(max_hops):
        node = value.producer() if value is not None else None
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Reshape":
            entries = _shape_entries(node.inputs[1])
            if entries and len(entries) == 4 and isinstance(entries[3], int) and entries[3] > 0:
                heads = entries[2]
                return (heads if isinstance(heads, int) and heads > 0 else None), entries[3]
            return None
        if node.op_type not in ("Transpose", "Mul", "Div", "Cast", "Identity"):
            return None
        value = next((i for i in node.inputs if i is not None and const_tensor(i) is None), None)
    return None


@dataclass
class AttentionParts:
    node: ir.Node  # the Attention op, or the Softmax of a decomposed attention
    q: ir.Value | None
    k: ir.Value | None
    v: ir.Value | None
    output: ir.Value
    num_heads: int | None
    kv_heads: int | None
    head_dim: int | None
    op: str


def _heads_from(q: ir.Value | None, k: ir.Value | None, head_dim: int | None, scale: float | None,
                q_heads: int | None = None, k_heads: int | None = None) -> tuple[int | None, int | None, int | None]:
    if head_dim is None and scale:
        guess = round(1.0 / (scale * scale))
        head_dim = guess if guess > 0 and abs(1.0 / math.sqrt(guess) - scale) < 1e-3 * scale else None
    if head_dim:
        q_out, k_out = _projection_out(q), _projection_out(k)
        if q_heads is None and q_out and q_out % head_dim == 0:
            q_heads = q_out // head_dim
        if k_out and k_out % head_dim == 0:
            # The projection's width is the true kv head count even when the graph repeats K for GQA.
            k_heads = k_out // head_dim
        else:
            k_heads = _path_heads(k, head_dim) or k_heads
        if q_heads is None:
            q_heads = _path_heads(q, head_dim)
    return q_heads, k_heads, head_dim


def _decomposed_attention(softmax: ir.Node) -> AttentionParts | None:
    axis = softmax.attributes.get_int("axis", -1)
    if axis not in (-1, 3):
        return None
    # Back to MatMul(q, kᵀ), through scale, mask and the exporters' NaN guards.
    frontier, scores, scale = [softmax.inputs[0]], None, 1.0
    for _ in range(8):
        nxt = []
        for value in frontier:
            node = value.producer() if value is not None else None
            if node is None or node.domain != "":
                continue
            if node.op_type == "MatMul" and const_tensor(node.inputs[1]) is None and const_tensor(node.inputs[0]) is None:
                scores = node
                break
            if node.op_type in _SCORE_OPS:
                if node.op_type in ("Mul", "Div"):
                    s = _scalar(node.inputs[1])
                    if s is not None:
                        scale *= s if node.op_type == "Mul" else 1.0 / s
                nxt.extend(i for i in node.inputs if i is not None and const_tensor(i) is None)
        if scores is not None or not nxt:
            break
        frontier = nxt
    if scores is None:
        return None
    # Forward to MatMul(p, v).
    value, sink = softmax.outputs[0], None
    for _ in range(4):
        # torch's dynamo exporter guards fully masked rows: Where(IsNaN(p), 0, p).
        users = [u for u, _ in value.uses() if u.op_type != "IsNaN"]
        if len(users) != 1:
            break
        user = users[0]
        if user.op_type == "MatMul" and user.inputs[0] is value and const_tensor(user.inputs[1]) is None:
            sink = user
            break
        if user.op_type not in _PROB_OPS:
            break
        value = user.outputs[0]
    if sink is None:
        return None
    q, q_scale, qs = _strip_scale(scores.inputs[0])
    k, k_scale, ks = _strip_scale(scores.inputs[1])
    scale = None if q_scale is None or k_scale is None or scale == 1.0 and q_scale * k_scale == 1.0 else scale * q_scale * k_scale
    head_dim = qs[-1] if qs else None
    q_heads = qs[1] if qs else None
    k_heads = ks[1] if ks else None
    if not (head_dim and q_heads):
        # No static shapes (TorchScript with dynamic axes): the head split's Reshape target still says.
        reshaped = _reshape_heads(q)
        if reshaped is not None:
            q_heads, head_dim = q_heads or reshaped[0], head_dim or reshaped[1]
            k_heads = k_heads or (_reshape_heads(k) or (None,))[0]
    q_heads, k_heads, head_dim = _heads_from(q, k, head_dim, scale, q_heads, k_heads)
    return AttentionParts(softmax, q, k, sink.inputs[1], sink.outputs[0], q_heads, k_heads, head_dim, "decomposed")


_MERGED_BACK = {"Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity", "Reshape"}
_MERGED_FORWARD = _PROB_OPS | {"Reshape"}


def _merged_heads_attention(softmax: ir.Node) -> AttentionParts | None:
    """Attention with the heads merged into the batch axis (Bloom): ``MatMul`` on ``[batch*heads, ...]`` operands,
    a Reshape of the scores to ``[batch, heads, q, k]`` (the heads a constant) before the ``Softmax``, a Reshape of
    the probabilities back into ``MatMul(·, v)``. Without that 4-D view (``nn.MultiheadAttention``'s own 3-D
    attention) it is no site, as in the FX front end."""
    if softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return None
    frontier, scores, heads, scale = [(softmax.inputs[0], None)], None, None, 1.0
    for _ in range(10):
        nxt = []
        for value, view in frontier:
            node = value.producer() if value is not None else None
            if node is None or node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "MatMul" and const_tensor(node.inputs[0]) is None and const_tensor(node.inputs[1]) is None:
                if view is not None and _rank(node.inputs[0]) in (3, None):
                    scores, heads = node, view
                continue
            if node.op_type not in _MERGED_BACK:
                continue
            if node.op_type == "Reshape":
                entries, shape = _shape_entries(node.inputs[1]), _static_shape(node.outputs[0])
                if view is None and entries and len(entries) == 4 and isinstance(entries[1], int) and entries[1] > 0:
                    view = entries[1]
                elif view is None and shape and len(shape) == 4 and shape[1]:
                    view = shape[1]  # an unoptimized export spells the target in pieces; its output shape says
                nxt.append((node.inputs[0], view))
                continue
            if node.op_type in ("Mul", "Div") and view is not None:
                s = _scalar(node.inputs[1])
                if s is not None:
                    scale *= s if node.op_type == "Mul" else 1.0 / s
            nxt.extend((i, view) for i in node.inputs if i is not None and const_tensor(i) is None)
        if scores is not None or not nxt:
            break
        frontier = nxt
    if scores is None:
        return None
    value, sink, merged = softmax.outputs[0], None, False
    for _ in range(5):
        users = [u for u, _ in value.uses() if u.op_type != "IsNaN"]
        if len(users) != 1:
            return None
        user = users[0]
        if user.op_type == "MatMul" and user.inputs[0] is value and const_tensor(user.inputs[1]) is None:
            sink = user
            break
        if user.op_type not in _MERGED_FORWARD:
            return None
        merged = merged or user.op_type == "Reshape"
        value = user.outputs[0]
    if sink is None or not merged:
        return None
    q, kt = scores.inputs[0], scores.inputs[1]
    k = kt.producer().inputs[0] if kt.producer() is not None and kt.producer().op_type == "Transpose" else kt
    qs = _static_shape(q)
    head_dim = qs[-1] if qs and len(qs) == 3 and qs[-1] else None
    if head_dim is None:
        # No static shapes (TorchScript): the Reshape that merged q's heads, [batch*heads, -1, head_dim], says.
        back = q
        for _ in range(4):
            node = back.producer() if back is not None else None
            if node is None or node.op_type not in ("Reshape", "Mul", "Div", "Cast", "Identity"):
                break
            if node.op_type == "Reshape":
                entries = _shape_entries(node.inputs[1])
                if entries and len(entries) == 3 and isinstance(entries[2], int) and entries[2] > 0:
                    head_dim = entries[2]
                break
            back = node.inputs[0]
    if head_dim is None and scale != 1.0:
        guess = round(1.0 / (scale * scale))
        head_dim = guess if guess > 0 and abs(1.0 / math.sqrt(guess) - scale) < 1e-3 * scale else None
    return AttentionParts(softmax, q, k, sink.inputs[1], sink.outputs[0], heads, heads, head_dim, "merged_heads")


def attention_parts(node: ir.Node) -> AttentionParts | None:
    """The parts of ``node`` if it is an attention site (an Attention op or the Softmax of a decomposed attention,
    heads merged into the batch axis or not)."""
    if is_inserted(node):
        return None
    op, domain = node.op_type, node.domain
    ins = list(node.inputs) + [None] * 3
    if domain in ("", "ai.onnx") and op == "Attention":
        q, k, v = ins[0], ins[1], ins[2]
        qs, ks = _static_shape(q), _static_shape(k)
        heads = node.attributes.get_int("q_num_heads", None) if "q_num_heads" in node.attributes else None
        kv = node.attributes.get_int("kv_num_heads", None) if "kv_num_heads" in node.attributes else None
        head_dim = None
        if qs and len(qs) == 4:
            heads, head_dim = heads or qs[1], qs[3]
            kv = kv or (ks[1] if ks and len(ks) == 4 else None)
        elif qs and len(qs) == 3 and qs[2] and heads:
            head_dim = qs[2] // heads
        scale = node.attributes.get_float("scale", None) if "scale" in node.attributes else None
        heads, kv, head_dim = _heads_from(q, k, head_dim, scale, heads, kv)
        return AttentionParts(node, q, k, v, node.outputs[0], heads, kv, head_dim, "Attention")
    if domain == MS and op in ("MultiHeadAttention", "GroupQueryAttention", "Attention"):
        heads = node.attributes.get_int("num_heads", 0) or None
        kv = (node.attributes.get_int("kv_num_heads", 0) or None) if op == "GroupQueryAttention" else heads
        hidden = None
        if op == "Attention":
            w = const_tensor(ins[1])
            hidden = int(w.shape[1]) // 3 if w is not None and len(w.shape) == 2 else None
            q, k, v = ins[0], None, None
        else:
            q, k, v = ins[0], ins[1], ins[2]
            qs = _static_shape(q)
            hidden = qs[-1] if qs and len(qs) == 3 else None
            if op == "MultiHeadAttention" and (k is None or v is None) and hidden and heads:
                hidden = None  # packed QKV query input: the last dim is not the hidden size
        head_dim = hidden // heads if hidden and heads else None
        if op == "MultiHeadAttention" and k is not None and head_dim:
            # K may be repeated to the query's head count for grouped-query models; the projection is not.
            heads, kv, head_dim = _heads_from(q, k, head_dim, None, heads, kv)
        return AttentionParts(node, q, k, v, node.outputs[0], heads, kv, head_dim, f"{MS}.{op}")
    if domain in ("", "ai.onnx") and op == "Softmax":
        return _decomposed_attention(node) or _merged_heads_attention(node)
    return None


# ---- the pass ------------------------------------------------------------------------------------


# Ops that carry token ids unchanged from a graph input to their embedding lookup (BART flattens them first).
_ID_PATH_OPS = {"Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten"}


def _fed_by_graph_input(value: ir.Value | None, max_hops: int = 6) -> bool:
    for _ in range(max_hops):
        if value is None:
            return False
        if value.is_graph_input():
            return True
        node = value.producer()
        if node is None or node.op_type not in _ID_PATH_OPS or node.domain not in ("", "ai.onnx"):
            return False
        value = node.inputs[0]
    return False


def _embedding_tables(graph: ir.Graph) -> tuple[set[int], set[int]]:
    """The token vocabulary's size and the ids of the stored values of every constant table ``Gather`` looks rows
    up in (an lm_head tied to the embeddings reads the same one).

    The vocabulary is the largest table looked up by ids the caller feeds: position tables are indexed by ids the
    graph computes (a range, a slice of a buffer), and a token-type table, also fed, is smaller. Counting every
    table's rows would make any layer that reaches the output with as many features as positions or token types
    (a 2-label classifier beside BERT's 2 token types, CLIP's projections beside its position table) the output
    layer, which ``all-linear`` leaves out where PEFT does not."""
    fed: set[int] = set()
    tables: set[int] = set()
    for node in graph:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.attributes.get_int("axis", 0) != 0:
            continue
        source, _ = _weight_source(node.inputs[0])
        t = const_tensor(source)
        if t is not None and len(t.shape) == 2:
            tables.add(id(source))
            if _fed_by_graph_input(node.inputs[1]):
                fed.add(int(t.shape[0]))
    return ({max(fed)} if fed else set()), tables


def _output_layer_nodes(graph: ir.Graph, linear: list[LinearParts]) -> set[int]:
    """The output-embedding layer (lm_head): a linear site whose result reaches a graph output through
    shape-only ops and that projects onto the token vocabulary (as many outputs as the vocabulary table
    has rows, or an embedding table itself, tied). PEFT's ``all-linear`` leaves out ``get_output_embeddings()``
    only; a classifier head reaching the output is an ordinary site, as in PEFT (its SEQ_CLS rule is
    by name, in ``lora_fx.targeting``)."""
    outputs = {id(v) for v in graph.outputs}
    rows, tables = _embedding_tables(graph)
    found: set[int] = set()
    for parts in linear:
        if parts.out_features not in rows and id(parts.weight) not in tables:
            continue
        value = parts.output
        for _ in range(6):
            if id(value) in outputs:
                found.add(id(parts.node))
                break
            users = [u for u, _ in value.uses()]
            if len(users) != 1:
                break
            user = users[0]
            is_bias = user.op_type == "Add" and any(const_tensor(i) is not None for i in user.inputs if i is not value)
            if user.op_type not in _SHAPE_OPS and not is_bias:
                break
            value = user.outputs[0]
    return found


def _projection_node(value: ir.Value | None, max_hops: int = 14) -> ir.Node | None:
    """The linear site node a Q tensor was projected by (through reshapes, rotary, splits)."""
    for _ in range(max_hops):
        node = value.producer() if value is not None else None
        if node is None:
            return None
        if linear_parts(node) is not None:
            return node
        if node.op_type == "Add":
            for inp in node.inputs:
                prod = inp.producer() if inp is not None else None
                if prod is not None and (p := linear_parts(prod)) is not None and p.bias_node is node:
                    return prod
        if node.op_type not in _HEAD_PATH_OPS | {"Split", "Slice"}:
            return None
        value = next((i for i in node.inputs if i is not None and const_tensor(i) is None), None)
    return None


def _attention_name(att: AttentionParts, leads: CallPathLeads | None = None) -> str:
    # The module that owns the Q projection (``…attention.self`` for ``…attention.self.query``) is the attention block.
    node = att.node
    proj = _projection_node(att.q)
    owner = None
    if proj is not None:
        parts = linear_parts(proj)
        name = site_name(proj, parts.weight, parts.bias, leads)
        owner = name.rsplit(".", 1)[0] if "." in name else None
    if node.domain == MS and owner:
        # Fusions copy metadata from whichever node they replaced.
        return owner
    own = site_name(node, leads=leads)
    return _longer_path(own, owner) or own


def _graph_sites(graph: ir.Graph, root: ir.Graph, unique: Callable[[str], str], leads: CallPathLeads | None = None) -> list[Site]:
    """The linear and attention sites among ``graph``'s own nodes (not those of its subgraphs), in graph order.

    ``root`` is the model's main graph (a subgraph reads its weights from there); ``unique`` makes a name unique;
    ``leads``: ``call_path_leads(root)``, computed here unless given.
    """
    nodes = list(graph)
    leads = leads if leads is not None else call_path_leads(root)
    linear = [p for p in (linear_parts(n) for n in nodes) if p is not None]
    by_node = {id(p.node): p for p in linear}
    output_layers = _output_layer_nodes(graph, linear)
    sites: list[Site] = []
    for node in nodes:
        parts = by_node.get(id(node))
        if parts is not None:
            name = site_name(node, parts.weight, parts.bias, leads)
            sites.append(Site(
                # com.microsoft.Attention's packed projection shares the node with its attention site.
                name=unique(name if parts.adaptable else f"{name}.qkv"), kind=SiteKind.LINEAR, ir=IRKind.ONNX,
                in_features=parts.in_features, out_features=parts.out_features, dtype=parts.dtype,
                has_bias=parts.bias is not None, fan_in_fan_out=not parts.stored_out_in,
                is_output_layer=id(node) in output_layers,
                op=node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}",
                part_of=_whole_module(root, node, name), handle=node,
            ))
            if parts.adaptable:
                continue
        att = attention_parts(node)
        if att is not None:
            hidden = att.num_heads * att.head_dim if att.num_heads and att.head_dim else None
            sites.append(Site(
                name=unique(_attention_name(att, leads)), kind=SiteKind.ATTENTION, ir=IRKind.ONNX,
                num_heads=att.num_heads, kv_heads=att.kv_heads, head_dim=att.head_dim,
                in_features=hidden, out_features=hidden,
                dtype=dtype_name(att.output.dtype), op=att.op, handle=node,
            ))
    return sites


def _namer() -> Callable[[str], str]:
    """A function giving a name used before ``_1``, ``_2``… on its later uses."""
    seen: dict[str, int] = {}

    def unique(name: str) -> str:
        count = seen.get(name, 0)
        seen[name] = count + 1
        return name if count == 0 else f"{name}_{count}"

    return unique


# ---- control-flow subgraphs ----------------------------------------------------------------------

# Hugging Face Optimum's merged decoder (decoder_model_merged.onnx): one If node of this name, switched by this input,
# its branches the decoder with and without past key values.
_OPTIMUM_IF = "optimum::if"
_OPTIMUM_SWITCH = "use_cache_branch"


def _subgraphs(node: ir.Node) -> list[tuple[str, ir.Graph]]:
    """The graphs a node's attributes hold (If's ``then_branch`` / ``else_branch``, Loop's and Scan's ``body``)."""
    found: list[tuple[str, ir.Graph]] = []
    for key, attr in node.attributes.items():
        if attr.type == ir.AttributeType.GRAPH:
            found.append((key, attr.value))
        elif attr.type == ir.AttributeType.GRAPHS:
            found += [(f"{key}[{i}]", g) for i, g in enumerate(attr.value)]
    return found


def _nested(node: ir.Node) -> list[tuple[str, ir.Graph, bool]]:
    """Every graph inside ``node`` (a main-graph node), nested at any depth, depth first, each with the attribute of
    ``node`` it lies under and whether a ``Loop``/``Scan`` (anything but ``If``) runs it: such a body may run many
    times per step, each run its own call of the layer."""
    found: list[tuple[str, ir.Graph, bool]] = []
    for key, branch in _subgraphs(node):
        stack = [(branch, node.op_type != "If")]
        while stack:
            graph, looped = stack.pop()
            found.append((key, graph, looped))
            stack += [(g, looped or n.op_type != "If") for n in graph for _, g in _subgraphs(n)]
    return found


def subgraph_graphs(model: ir.Model) -> list[ir.Graph]:
    """The model's graphs: the main graph first, then every control-flow subgraph (nested at any depth)."""
    return [model.graph] + [g for node in model.graph for _, g, _ in _nested(node)]


def _branch_weight(site: Site, root: ir.Graph, looped: bool) -> ir.Value | None:
    """The main-graph initializer a subgraph's linear site reads, where that makes it one site in every branch:
    an adaptable linear layer, in If branches only, on an outer-scope initializer. None otherwise."""
    if looped or site.kind is not SiteKind.LINEAR:
        return None
    parts = linear_parts(site.handle)
    weight = parts.weight if parts is not None and parts.adaptable else None
    if weight is None or not weight.name or root.initializers.get(weight.name) is not weight:
        return None
    return weight


def site_nodes(model: ir.Model, node: ir.Node) -> list[ir.Node]:
    """Every node of the site whose ``handle`` is ``node``: the node itself in the main graph; for a site inside If
    branches (``Sites.inside``), every linear node of the model's subgraphs that reads the same outer-scope weight,
    in the order ``find_sites`` meets them."""
    if node.graph is model.graph:
        return [node]
    parts = linear_parts(node)
    if parts is None or parts.weight is None:
        return [node]
    return [n for g in subgraph_graphs(model)[1:] for n in g
            if (p := linear_parts(n)) is not None and p.weight is parts.weight]


@dataclass
class SubgraphLayers:
    """The linear and attention sites inside one main-graph node's subgraphs (an ``If``'s branches, a ``Loop``'s or
    ``Scan``'s body, and any control flow nested in them) that no lora_fx pass rewrites: attention, and linear layers
    in a ``Loop``/``Scan`` body or whose weight is not an initializer of the main graph. (A linear layer in ``If``
    branches reading a main-graph initializer is an ordinary site, listed in ``Sites.inside``.)

    ``sites`` holds each layer once: a layer found under the same name in several branches (Optimum's merged decoder
    holds the whole decoder in both, reading one set of weights) is the same layer. ``subgraphs`` names the node's
    attributes the sites lie in.
    """

    node: ir.Node
    subgraphs: list[str]
    sites: list[Site]

    @property
    def linear(self) -> list[Site]:
        return [s for s in self.sites if s.kind is SiteKind.LINEAR]

    @property
    def is_optimum_merged(self) -> bool:
        return _is_optimum_merged(self.node)

    @property
    def where(self) -> str:
        """``If node 'optimum::if' (else_branch, then_branch)``."""
        return _where(self.node, self.subgraphs)


def _is_optimum_merged(node: ir.Node) -> bool:
    switch = any(v is not None and v.name == _OPTIMUM_SWITCH for v in node.inputs)
    return node.op_type == "If" and (node.name == _OPTIMUM_IF or switch)


def _where(node: ir.Node, keys: list[str]) -> str:
    return f"{node.op_type} node {node.name or '(unnamed)'!r} ({', '.join(keys)})"


def _site_weight(site: Site) -> ir.Value | None:
    parts = linear_parts(site.handle) if site.kind is SiteKind.LINEAR else None
    return parts.weight if parts is not None else None


def _control_flow_sites(model: ir.Model, main: list[Site], unique: Callable[[str], str]) -> tuple[list[Site], dict[str, str], list[SubgraphLayers]]:
    """The sites inside control-flow subgraphs: those passes rewrite (linear layers in If branches on main-graph
    initializers, one site per weight whatever the number of branch nodes reading it, named by ``unique`` after the
    main graph's), where each lies, and the rest grouped per main-graph node (``SubgraphLayers``)."""
    root = model.graph
    leads = call_path_leads(root)
    # (holder, attribute, looped, the site as its own graph sees it), names unique within one branch.
    found: list[tuple[ir.Node, str, bool, Site]] = []
    for node in root:
        namers: dict[str, Callable[[str], str]] = {}
        for key, graph, looped in _nested(node):
            # per branch: the branches of an If may hold copies of the same layers
            found += [(node, key, looped, s) for s in _graph_sites(graph, root, namers.setdefault(key, _namer()), leads)]
    main_weights = {id(w) for s in main if (w := _site_weight(s)) is not None}
    by_weight: dict[int, list[tuple[ir.Node, str, bool, Site]]] = {}
    for entry in found:
        weight = _site_weight(entry[3])
        if weight is not None:
            by_weight.setdefault(id(weight), []).append(entry)
    # A weight is one site only where every linear node reading it can carry the same branch: all in If branches.
    shared = {key for key, entries in by_weight.items()
              if key not in main_weights and all(_branch_weight(s, root, looped) is not None for _, _, looped, s in entries)}
    rewritable: list[Site] = []
    inside: dict[str, str] = {}
    done: set[int] = set()
    for _, _, _, site in found:
        key = id(_site_weight(site)) if site.kind is SiteKind.LINEAR else None
        if key not in shared or key in done:
            continue
        done.add(key)
        entries = by_weight[key]
        parts = linear_parts(site.handle)
        name = unique(site_name(site.handle, parts.weight, parts.bias, leads))
        rewritable.append(dataclasses.replace(
            site, name=name, part_of=_whole_module(root, site.handle, name),
            is_output_layer=any(s.is_output_layer for *_, s in entries)))
        holders: dict[int, tuple[ir.Node, list[str]]] = {}
        for holder, attr, _, _ in entries:
            keys = holders.setdefault(id(holder), (holder, []))[1]
            if attr not in keys:
                keys.append(attr)
        inside[name] = "; ".join(_where(h, keys) for h, keys in holders.values())
    groups: list[SubgraphLayers] = []
    for node in root:
        sites: list[Site] = []
        names: set[str] = set()
        weights: set[int] = set()
        holding: list[str] = []
        for key in dict.fromkeys(k for k, _ in _subgraphs(node)):
            own = [s for holder, attr, _, s in found if holder is node and attr == key
                   and not (s.kind is SiteKind.LINEAR and id(_site_weight(s)) in shared)]
            own_weights = {id(_site_weight(s)) for s in own} - {id(None)}
            # A copy reads the same outer-scope weight, even where the exporter named its node differently.
            new = [s for s in own if s.name not in names and id(_site_weight(s)) not in weights]
            if own:
                holding.append(key)
            names.update(s.name for s in own)
            weights |= own_weights
            sites += new
        if sites:
            groups.append(SubgraphLayers(node, holding, sites))
    return rewritable, inside, groups


def subgraph_layers(model: ir.Model) -> list[SubgraphLayers]:
    """The sites inside control-flow subgraphs that no pass rewrites, one entry per main-graph node holding any, in
    graph order. Names are made as ``find_sites`` makes them, unique among the subgraphs of one node."""
    main = _graph_sites(model.graph, model.graph, _namer())
    return _control_flow_sites(model, main, _namer())[2]


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def subgraph_note(groups: list[SubgraphLayers]) -> str | None:
    """Why the layers in ``groups`` are left as they are, and the way out; None when there are none."""
    if not groups:
        return None
    parts = []
    for group in groups:
        n_lin = len(group.linear)
        n_att = len(group.sites) - n_lin
        what = " and ".join(p for p in (
            _count(n_lin, "linear layer") if n_lin else "", _count(n_att, "attention site") if n_att else "") if p)
        names = [s.name for s in group.sites]
        example = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        parts.append(f"{what} ({example}) lie{'s' if len(names) == 1 else ''} inside the subgraphs of {group.where}")
    text = "; ".join(parts) + (
        ", which lora_fx does not rewrite (it adapts linear layers in If branches that read main-graph initializers; "
        "not attention, Loop/Scan bodies, or weights stored inside a subgraph).")
    if any(g.is_optimum_merged for g in groups):
        text += (
            " This is Hugging Face Optimum's merged decoder (decoder_model_merged.onnx, the decoders with and without "
            "past key values as the two branches of one If): for these, rewrite decoder_model.onnx and "
            "decoder_with_past_model.onnx instead, which `optimum-cli export onnx --no-post-process` keeps apart."
        )
    else:
        text += " Export the model without control flow (layers unrolled into the main graph, no If/Loop/Scan around them)."
    return text


class Sites(list):
    """``find_sites``' result: a list of the model's ``Site`` objects, in graph order, with what lies beyond it.

    The main graph's sites come first, then the linear layers inside ``If`` branches that read a main-graph
    initializer (Hugging Face Optimum's merged decoders): each is one site however many branch nodes read its weight
    (its ``handle`` is the first; ``site_nodes`` gives them all), and ``inside`` maps its name to where it lies
    (``If node 'optimum::if' (else_branch, then_branch)``). ``subgraphs`` lists the sites inside control-flow subgraphs
    that no pass rewrites (``SubgraphLayers``), ``unreachable`` the same sites flat, and ``unreachable_note`` says why
    and the way out (None when there are none). ``lora_fx.targeting.select_targets`` reads ``unreachable`` and
    ``unreachable_note`` to explain a target that matches only such layers; a list built from this one (filtered,
    sliced) is a plain list without them.
    """

    def __init__(self, sites: Iterable[Site] = (), subgraphs: Iterable[SubgraphLayers] = (),
                 inside: dict[str, str] | None = None) -> None:
        super().__init__(sites)
        self.subgraphs = list(subgraphs)
        self.inside = dict(inside or {})
        self.unreachable = [s for g in self.subgraphs for s in g.sites]
        self.unreachable_note = subgraph_note(self.subgraphs)


class FindSites:
    """Collect every linear and attention site of an ONNX model, in graph order (read-only).

    Matches the forms listed in this module's docstring in the main graph, and linear layers in ``If`` branches that
    read main-graph initializers (one site per weight); returns them as ``Site`` objects with ``ir = IRKind.ONNX`` and
    ``handle`` = the ONNX node (the Softmax for decomposed attention; a branch site's first node), in a ``Sites`` list
    that also reports the sites inside control-flow subgraphs that no pass rewrites.
    """

    def __call__(self, model: ir.Model) -> Sites:
        unique = _namer()
        main = _graph_sites(model.graph, model.graph, unique)
        branch, inside, groups = _control_flow_sites(model, main, unique)
        return Sites(main + branch, groups, inside)


def find_sites(model: ir.Model) -> Sites:
    """Every linear and attention site of ``model`` (see ``Sites`` for the sites inside control-flow subgraphs)."""
    return FindSites()(model)


# ---- module tree ---------------------------------------------------------------------------------

# The dynamo exporter's scope for nodes no module called.
_NO_MODULE = "_empty_nn_module_stack_from_metadata_hook"

# Ops that multiply by no weight matrix: a module whose nodes are all of these (norms, activations, dropout,
# rotary tables, shape arithmetic) is none of the layers PEFT adapts (Linear, Conv, Embedding, MultiheadAttention).
_NO_LAYER_OPS = frozenset({
    "LayerNormalization", "RMSNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
    "LpNormalization", "MeanVarianceNormalization", "Dropout", "Identity",
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Exp", "Log", "Erf", "Tanh", "Sigmoid",
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "HardSigmoid", "HardSwish", "Softplus", "Softsign",
    "Mish", "ThresholdedRelu", "Softmax", "LogSoftmax", "Clip", "Min", "Max", "Mean", "Sum", "Sin", "Cos", "Floor",
    "Ceil", "Round", "Sign", "Mod", "IsNaN", "IsInf", "Not", "And", "Or", "Xor", "Equal", "Less", "LessOrEqual",
    "Greater", "GreaterOrEqual", "Where", "Trilu", "CumSum", "ArgMax", "ArgMin",
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare",
    "ReduceLogSumExp", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
    "Shape", "Size", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose", "Concat", "Split", "Slice", "Expand",
    "Tile", "Range", "ConstantOfShape", "Cast", "CastLike", "Pad", "Gather", "GatherElements", "GatherND",
    "ScatterND", "ScatterElements", "NonZero", "EyeLike",
})
# Left out of a module's description: they move values around, the rest computes.
_SHAPE_ONLY_OPS = frozenset({
    "Shape", "Size", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose", "Concat", "Split", "Slice", "Expand",
    "Tile", "Range", "ConstantOfShape", "Cast", "CastLike", "Gather", "GatherElements", "GatherND", "Identity",
})


def _literal_list(text: str | None) -> list | None:
    if not text:
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    return list(value) if isinstance(value, (list, tuple)) else None


def _dynamo_scopes(node: ir.Node) -> list[tuple[str, str | None]] | None:
    """``(module path, class)`` of every module the node ran in, outermost first, from the dynamo exporter's
    metadata (its last entry is the op itself)."""
    scopes = _literal_list(node.metadata_props.get(NAME_SCOPES))
    if not scopes:
        return None
    classes = _literal_list(node.metadata_props.get(CLASS_HIERARCHY))
    if not classes or len(classes) != len(scopes):
        classes = [None] * len(scopes)
    return [(str(s), str(c) if c else None) for s, c in zip(scopes[:-1], classes[:-1]) if s and s != _NO_MODULE]


def model_class(model: ir.Model) -> str | None:
    """The class of the torch module a dynamo export was made from (``transformers...GPT2LMHeadModel``): the root of
    most nodes' ``class_hierarchy``; None for other exports, which do not record it."""
    import collections

    roots: collections.Counter[str] = collections.Counter()
    for node in model.graph:
        classes = _literal_list(node.metadata_props.get(CLASS_HIERARCHY))
        if classes and isinstance(classes[0], str) and "." in classes[0] and not classes[0].startswith("_"):
            roots[classes[0]] += 1
    return roots.most_common(1)[0][0] if roots else None


def _scope_class(node: ir.Node) -> str | None:
    """The class of the module that ran ``node`` (dynamo exports only)."""
    scopes = _dynamo_scopes(node)
    return scopes[-1][1] if scopes else None


def _whole_module(graph: ir.Graph, node: ir.Node, name: str) -> str | None:
    """The nn.MultiheadAttention that runs ``node`` on its child's weight (out_proj): PEFT adapts the two as one.

    Evidence: the module's class in dynamo metadata, or (TorchScript) the attention's own parameter names."""
    caller = _scope_name(node) or _torchscript_name(node)
    if not caller or not name.startswith(f"{caller}."):
        return None
    if _scope_class(node) == MULTIHEAD_ATTENTION:
        return caller
    if _scope_class(node) is None and any(f"{caller}.{p}" in graph.initializers for p in ("in_proj_weight", "in_proj_bias")):
        return caller
    return None


def _is_lookup(node: ir.Node) -> bool:
    """Gather of rows from a constant float matrix: an embedding lookup."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.attributes.get_int("axis", 0) != 0:
        return False
    source, _ = _weight_source(node.inputs[0])
    t = const_tensor(source)
    return t is not None and len(t.shape) == 2 and t.dtype in _DTYPES


def _node_kind(node: ir.Node) -> str:
    """``const``, ``lookup`` (an embedding lookup), ``plain`` (no weight product) or ``layer`` (may compute one)."""
    default = node.domain in ("", "ai.onnx")
    if default and node.op_type == "Constant":
        return "const"
    if _is_lookup(node):
        return "lookup"
    return "plain" if default and node.op_type in _NO_LAYER_OPS else "layer"


def _torch_classes(name: str | None) -> tuple[str, ...] | None:
    """A ``torch.*`` module class and the classes it derives from, as ``passes.fx.capture.module_tree`` lists
    them, where torch has it loaded (never imports what a file names)."""
    import sys

    import torch

    if not name or not name.startswith("torch."):
        return None
    module, _, qualname = name.rpartition(".")
    cls = getattr(sys.modules.get(module), qualname, None)
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        return None
    return tuple(f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__ if issubclass(c, torch.nn.Module) and c is not torch.nn.Module)


@dataclass(frozen=True)
class CallPathLeads:
    """What a TorchScript file's call paths lack in front of the module paths its parameters are stored under.

    TorchScript names a module by its last name part (``model.model.decoder`` -> ``decoder``), so a module its
    caller reaches into (an Optimum-style decoder wrapper's ``self.model.model.decoder(...)``, ``self.model.lm_head``)
    loses the levels between. ``by_first``: learnt from linear sites whose parameter names are longer (see
    ``_longer_path``), keyed by the call path's first part (``decoder`` -> ``model.model.``). ``wrapped``: where
    some call path is known to skip levels, the module every stored parameter lies under (``model.``): the root
    only wraps it, so a root call with nothing learnt (``lm_head``, whose weight TorchScript leaves anonymous) is
    placed right under it, where a task model holds its head (``model.lm_head``, the path PEFT keys it by)."""

    by_first: dict[str, str]
    wrapped: str = ""

    def full(self, traced: str) -> str:
        first = traced.split(".", 1)[0]
        if first in self.by_first:
            return self.by_first[first] + traced
        if self.wrapped and first != self.wrapped.split(".", 1)[0]:
            return self.wrapped + traced
        return traced


def call_path_leads(graph: ir.Graph) -> CallPathLeads:
    """``CallPathLeads`` of a graph (empty where no TorchScript call path is shorter than its parameter names)."""
    nodes = [n for n in graph if not is_inserted(n)]
    by_first: dict[str, str] = {}
    for node in nodes:
        traced = _torchscript_name(node)
        parts = linear_parts(node) if traced else None
        if parts is not None:
            longer = _longer_path(traced, _initializer_name(parts.weight) or _bias_name(parts.bias))
            if longer:
                by_first.setdefault(traced.split(".", 1)[0], longer[: -len(traced)])
    if not by_first:
        return CallPathLeads(by_first)
    wrapped = _common_module(name for name in graph.initializers if not _ANON.match(name))
    if not all(lead.startswith(wrapped) for lead in by_first.values()):
        wrapped = ""
    return CallPathLeads(by_first, wrapped)


def _common_module(names: Iterable[str]) -> str:
    """The deepest module path (with a trailing dot) that every parameter name lies under; "" for none."""
    common: list[str] | None = None
    for name in names:
        module = name.split(".")[:-1]
        if common is None:
            common = module
        else:
            same = 0
            while same < min(len(common), len(module)) and common[same] == module[same]:
                same += 1
            common = common[:same]
        if not common:
            return ""
    return ".".join(common) + "." if common else ""


def module_tree(model: ir.Model) -> dict[str, tuple[str, ...]] | None:
    """The source model's modules that the file describes well enough to tell they are no linear layer (a
    ``lora_fx.sites.ModuleTree``), or None where the file names no modules (hand-built, or renamed by an optimizer).

    A module appears only where its nodes survive in the file (GPT-2's sdpa path never runs ``attn_dropout``; an
    eval-mode export drops every Dropout), and only where it is known to be no layer PEFT adapts other than as a
    linear site:

    * dynamo exports name each node's modules and classes (``pkg.torch.onnx.name_scopes`` / ``class_hierarchy``):
      a ``torch.*`` class is taken with the classes it derives from; another (``transformers``' activations, norms,
      rotary embeddings) where all its nodes multiply by no weight matrix (``_NO_LAYER_OPS``) or look up embeddings;
    * TorchScript exports name nodes by module path (``/transformer/h.0/ln_1/LayerNormalization``), no class: a
      module all of whose nodes are such ops stands as ``onnx ops: <what it computes>``, and one looking up rows of
      a constant matrix as ``EMBEDDING_LOOKUP``.

    Modules that compute anything else (a MatMul, a Conv, a contrib op) are left out: they might be layers PEFT
    adapts, and targeting refuses only where it is sure.
    """
    nodes = [n for n in model.graph if not is_inserted(n)]
    leads = call_path_leads(model.graph)
    classes: dict[str, str | None] = {}
    own: dict[str, set[str]] = {}
    below: dict[str, set[str]] = {}
    ops: dict[str, dict[str, None]] = {}
    named = False
    for node in nodes:
        chain = _dynamo_scopes(node)
        if chain is None and (node.name or "").startswith("/"):
            parts = [p for p in node.name.strip("/").split("/")[:-1] if p]
            if parts:
                parts[0] = leads.full(parts[0])
            chain = [(".".join(parts[: i + 1]), None) for i in range(len(parts))]
        if not chain:
            continue
        named = True
        kind = _node_kind(node)
        for path, cls in chain:
            classes.setdefault(path, cls)
            below.setdefault(path, set()).add(kind)
            if kind != "const":
                ops.setdefault(path, {})[node.op_type] = None
        own.setdefault(chain[-1][0], set()).add(kind)
    if not named:
        return None
    tree: dict[str, tuple[str, ...]] = {}
    for path, cls in classes.items():
        known = _torch_classes(cls)
        if known:
            tree[path] = known
            continue
        kinds = below[path]
        if "layer" in kinds or not kinds - {"const"}:
            continue
        lookup = "lookup" in own.get(path, ())
        if cls:
            tree[path] = (cls, EMBEDDING_LOOKUP) if lookup else (cls,)
        elif lookup:
            tree[path] = (EMBEDDING_LOOKUP,)
        else:
            computed = [op for op in ops[path] if op not in _SHAPE_ONLY_OPS] or list(ops[path])
            tree[path] = (ONNX_OPS + ", ".join(computed[:5]) + (", ..." if len(computed) > 5 else ""),)
    return tree
