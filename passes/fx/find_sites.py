"""Find the linear and attention sites of a captured GraphModule.

Matches (on the graph as ``torch.export`` leaves it, before decompositions):

* linear: ``aten.linear(x, W[, b])`` with W a parameter ``[out, in]``;
  ``aten.addmm(b, x, W)``, ``aten.mm(x, W)`` and ``aten.matmul(x, W)`` with W a parameter
  ``[in, out]`` (GPT-2's Conv1D), flagged ``fan_in_fan_out``.
* attention: ``aten.scaled_dot_product_attention`` and the eager form
  ``matmul(q, kᵀ) → [scale] → [mask] → softmax → [dropout] → matmul(·, v)``. ``kv_heads`` is the
  model's key/value head count, looking through ``repeat_kv`` (GQA), so it can be below the head
  count of the K the node itself receives.
* attention with merged heads (Bloom's ALiBi attention): ``baddbmm(bias, q, kᵀ)`` or ``bmm(q, kᵀ)`` on
  ``[B*H, ...]`` tensors, viewed ``[B, H, q, k]`` for the mask and softmax, viewed back and ``bmm(·, v)``;
  op ``eager_bmm``. The 4-D view is required: it gives the head count (and keeps nn.MultiheadAttention's
  3-D bmm-softmax-bmm, which PEFT adapts as a whole module, out).

Nodes that lora_fx itself inserted (adapter branches) are never sites. Each site is named after the
module that called it, from the node's ``nn_module_stack``. ``nn.MultiheadAttention``'s out_proj, which
the attention module runs itself, is named after the child and marked ``part_of`` the attention module,
which PEFT adapts as a whole (in_proj and out_proj).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from lora_fx.passes.fx.capture import meta
from lora_fx.sites import MULTIHEAD_ATTENTION, IRKind, Site, SiteKind

aten = torch.ops.aten

# Node.meta key marking nodes a lora_fx pass added, so later passes do not take them for sites.
INSERTED = "lora_fx_inserted"
# Node.meta key of a quantized linear site (passes/fx/quantize_weights.py): a lora_fx::linear_<format>
# node whose args are (x, packed weight, ...); it holds format, in/out features, bias and the model dtype.
QUANTIZED = "lora_fx_quantized"

_LINEAR_OPS = {aten.linear.default}
_IN_OUT_OPS = {aten.addmm.default: 2, aten.mm.default: 1, aten.matmul.default: 1}
# ``x @ W.T`` on an [out, in] weight (Falcon's FalconLinear): the transposes a weight may go through.
_TRANSPOSE_OPS = {aten.numpy_T.default, aten.t.default, aten.transpose.int, aten.permute.default}
_SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_PASS_THROUGH = {
    aten.div.Tensor, aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.where.self,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.to.dtype, aten._to_copy.default,
    aten.dropout.default, aten.type_as.default, aten.to.dtype_layout,
}


def module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path or None


def linear_site_name(node: fx.Node) -> str:
    """A linear site's name: the module path of the ``nn.Linear`` whose weight it reads, as PEFT names it.

    Usually the module that called the op. A parent that calls ``F.linear`` on a child's weight
    (``nn.MultiheadAttention`` with its ``out_proj``) would otherwise give two sites of different
    shapes one name, so the child holding the weight names the site. A quantized site keeps the
    name it had in float (quantize_weights records it).
    """
    if node.meta.get(QUANTIZED, {}).get("name"):
        return node.meta[QUANTIZED]["name"]
    path = module_path(node)
    owner, _, leaf = str(weight_node(node).target).rpartition(".")
    if path and owner.startswith(f"{path}."):
        return owner
    return path or (owner if leaf == "weight" else f"{owner}.{leaf}".lstrip("."))


def _param(gm: fx.GraphModule, node: object) -> torch.nn.Parameter | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            value = gm.get_parameter(node.target)
        except AttributeError:
            return None
        return value
    return None


def transposed_weight(node: object) -> fx.Node | None:
    """The get_attr node W when ``node`` is ``W.T`` (``W.t()``, ``W.transpose(0, 1)``, ``W.permute(1, 0)``)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _TRANSPOSE_OPS):
        return None
    src = node.args[0]
    if not (isinstance(src, fx.Node) and src.op == "get_attr"):
        return None
    if node.target is aten.transpose.int and sorted(int(d) % 2 for d in node.args[1:3]) != [0, 1]:
        return None
    if node.target is aten.permute.default and [int(d) % 2 for d in node.args[1]] != [1, 0]:
        return None
    return src


def weight_node(node: fx.Node) -> fx.Node:
    """The get_attr node holding a linear site's weight (its packed storage when quantized)."""
    if node.meta.get(QUANTIZED):
        return node.args[1]
    if node.target in _LINEAR_OPS:
        return node.args[1]
    w = node.args[_IN_OUT_OPS[node.target]]
    return transposed_weight(w) or w


def weight_device(gm: fx.GraphModule, node: fx.Node) -> torch.device:
    """The device of a linear site's weight, a parameter or (quantized) a buffer."""
    target = weight_node(node).target
    try:
        return gm.get_parameter(target).device
    except AttributeError:
        return gm.get_buffer(target).device


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _quantized_site(node: fx.Node, output_layer: str | None) -> Site:
    q = node.meta[QUANTIZED]
    name = linear_site_name(node)
    return Site(
        name=name, kind=SiteKind.LINEAR, ir=IRKind.FX, in_features=q["in_features"], out_features=q["out_features"],
        dtype=q["dtype"], has_bias=bool(q["has_bias"]), is_output_layer=(name == output_layer),
        op=f"lora_fx.linear_{q['format']}", handle=node,
    )


def _linear_site(gm: fx.GraphModule, node: fx.Node, output_layer: str | None) -> Site | None:
    if node.meta.get(QUANTIZED):
        return _quantized_site(node, output_layer)
    if node.target in _LINEAR_OPS:
        w = _param(gm, node.args[1])
        if w is None or w.dim() != 2:
            return None
        out_f, in_f = w.shape
        fifo, op = False, "aten.linear"
        bias = len(node.args) > 2 and node.args[2] is not None
    elif node.target in _IN_OUT_OPS:
        # x @ W with W [in, out] (GPT-2's Conv1D), or x @ W.T with W [out, in] (Falcon's FalconLinear).
        w_arg = node.args[_IN_OUT_OPS[node.target]]
        under = transposed_weight(w_arg)
        w = _param(gm, under or w_arg)
        if w is None or w.dim() != 2:
            return None
        fifo = under is None
        in_f, out_f = w.shape if fifo else reversed(w.shape)
        op = f"aten.{node.target._opname}"
        bias = node.target is aten.addmm.default
    else:
        return None
    name = linear_site_name(node)
    return Site(
        name=name, kind=SiteKind.LINEAR, ir=IRKind.FX, in_features=int(in_f), out_features=int(out_f),
        dtype=_dtype(w), has_bias=bool(bias), fan_in_fan_out=fifo, is_output_layer=(name == output_layer),
        op=op, handle=node,
    )


def _shape(node: object) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _static(d: object) -> int | None:
    return d if isinstance(d, int) else None


_VIEWS = {aten.reshape.default, aten.view.default, aten.transpose.int, aten._unsafe_view.default,
          aten.clone.default, aten.contiguous.default}


def _repeated_kv_heads(k: object) -> int | None:
    """K's head count before transformers' ``repeat_kv`` (grouped-query attention), if K went through it.

    ``repeat_kv`` is ``unsqueeze -> expand [b, kv, n_rep, s, d] -> reshape [b, kv * n_rep, s, d]``, so
    the node itself sees ``num_heads`` heads; the model has ``kv`` (what prefixes and caches are sized by).
    """
    node = k
    for _ in range(4):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return None
        if node.target is aten.expand.default:
            s = _shape(node)
            return _static(s[1]) if s and len(s) == 5 else None
        if node.target not in _VIEWS:
            return None
        node = node.args[0]
    return None


def _attention_site(node: fx.Node, q: object, k: object, op: str) -> Site:
    qs, ks = _shape(q), _shape(k)
    heads = _static(qs[-3]) if qs and len(qs) >= 3 else None
    kv = _repeated_kv_heads(k) or (_static(ks[-3]) if ks and len(ks) >= 3 else None)
    hd = _static(qs[-1]) if qs else None
    val = node.meta.get("val")
    return Site(
        name=module_path(node) or node.name, kind=SiteKind.ATTENTION, ir=IRKind.FX,
        num_heads=heads, kv_heads=kv, head_dim=hd,
        dtype=_dtype(val) if isinstance(val, torch.Tensor) else "float32", op=op, handle=node,
    )


def _eager_attention(node: fx.Node) -> Site | None:
    """``node`` is a softmax: walk back to matmul(q, kᵀ) and forward to matmul(p, v)."""
    src = node.args[0]
    for _ in range(8):
        if not isinstance(src, fx.Node):
            return None
        if src.target is aten.matmul.default:
            break
        if src.target not in _PASS_THROUGH:
            return None
        src = src.args[0]
    else:
        return None
    sink, hops = node, 0
    while hops < 4:
        # torch.export adds _assert_tensor_metadata checks as extra users; they compute nothing.
        users = [u for u in sink.users if u.target is not aten._assert_tensor_metadata.default]
        if len(users) != 1:
            return None
        sink = users[0]
        if sink.target is aten.matmul.default and sink.args[0] is not None:
            q, kt = src.args[0], src.args[1]
            return _attention_site(sink, q, kt, "eager")
        if sink.target not in _PASS_THROUGH:
            return None
        hops += 1
    return None


_MERGED_SCORES = {aten.bmm.default: 0, aten.baddbmm.default: 1}  # op -> index of q in its args
_HEAD_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _merged_heads_attention(node: fx.Node) -> Site | None:
    """``node`` is a softmax over ``[B, H, q, k]`` scores that came from a ``[B*H, q, k]`` (b)bmm: walk back to
    the score op and forward to ``bmm(p, v)``."""
    src, heads_view = node.args[0], None
    for _ in range(8):
        if not isinstance(src, fx.Node):
            return None
        if src.target in _MERGED_SCORES:
            break
        if src.target in _HEAD_VIEWS:
            heads_view = src
        elif src.target not in _PASS_THROUGH:
            return None
        src = src.args[0]
    else:
        return None
    shape = _shape(heads_view)
    if shape is None or len(shape) != 4 or _static(shape[1]) is None:
        return None
    sink = node
    for _ in range(6):
        users = [u for u in sink.users if u.target is not aten._assert_tensor_metadata.default]
        if len(users) != 1:
            return None
        prev, sink = sink, users[0]
        if sink.target is aten.bmm.default:
            if sink.args[0] is not prev:
                return None
            i = _MERGED_SCORES[src.target]
            q = src.args[i]
            qs, val = _shape(q), sink.meta.get("val")
            heads = int(shape[1])
            return Site(
                name=module_path(sink) or sink.name, kind=SiteKind.ATTENTION, ir=IRKind.FX,
                num_heads=heads, kv_heads=heads, head_dim=_static(qs[-1]) if qs else None,
                dtype=_dtype(val) if isinstance(val, torch.Tensor) else "float32", op="eager_bmm", handle=sink,
            )
        if sink.target not in _PASS_THROUGH and sink.target not in _HEAD_VIEWS:
            return None
    return None


def module_tree(gm: fx.GraphModule) -> dict[str, tuple[str, ...]]:
    """The captured model's modules (a ``lora_fx.sites.ModuleTree``): as ``capture`` recorded them, or for a
    GraphModule from elsewhere the modules its nodes were called from."""
    recorded = meta(gm).get("modules")
    if recorded is not None:
        return dict(recorded)
    tree: dict[str, tuple[str, ...]] = {}
    for node in gm.graph.nodes:
        for path, kind in (node.meta.get("nn_module_stack") or {}).values():
            if isinstance(kind, type):
                kind = f"{kind.__module__}.{kind.__qualname__}"
            if path and isinstance(kind, str) and not path.startswith("_empty_nn_module_stack"):
                tree.setdefault(path, (kind,))
    return tree


def _whole_module(tree: dict[str, tuple[str, ...]], node: fx.Node, name: str) -> str | None:
    """The nn.MultiheadAttention that runs a linear on its child's weight (out_proj): PEFT adapts the two as one."""
    path = module_path(node)
    if path and name.startswith(f"{path}.") and MULTIHEAD_ATTENTION in tree.get(path, ()):
        return path
    return None


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every linear and attention site of ``gm``, in graph order."""
    output_layer = meta(gm).get("output_layer")
    tree = module_tree(gm)
    sites: list[Site] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.meta.get(INSERTED):
            continue
        site = _linear_site(gm, node, output_layer)
        if site is None and node.target is aten.scaled_dot_product_attention.default:
            site = _attention_site(node, node.args[0], node.args[1], "sdpa")
        elif site is None and node.target in _SOFTMAX_OPS:
            site = _eager_attention(node) or _merged_heads_attention(node)
        elif site is not None:
            site.part_of = _whole_module(tree, node, site.name)
        if site is not None:
            sites.append(site)
    return sites
