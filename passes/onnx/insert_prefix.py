"""Insert learned key/value prefixes (prefix-tuning) at the attention sites of an ONNX model.

The same job as ``passes/fx/insert_prefix.py`` on an ``onnx_ir.Model``: T learned keys and values
per attention site are placed in front of the site's K and V, the additive mask gains T visible
(zero) columns, and the real tokens' positions move to ``T .. T+n-1`` (as PEFT's KV-cache prefix
does), so the rewritten file computes what the FX-rewritten model and PEFT compute.

ONNX layout, read by export and ``fold_lora`` (which refuses to fold prefixes):

* initializers ``<site>.prefix_key`` / ``<site>.prefix_value`` ``[kv_heads, T, head_dim]`` in the
  model's dtype;
* ``metadata_props["lora_fx.prefix"]``: JSON ``{"num_virtual_tokens": T, "sites": {site: {"kv_heads",
  "head_dim", "key", "value"}}}`` (``key``/``value`` are the initializer names) and
  ``metadata_props["lora_fx.prefix_config"]``: the PrefixConfig JSON.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir
import torch

from lora_fx.config import PrefixConfig
from lora_fx.errors import AdapterError, ConfigError, UnsupportedError
from lora_fx.passes.onnx.find_sites import INSERTED, attention_parts, const_tensor, find_sites
from lora_fx.passes.result import PassResult
from lora_fx.sites import Site

PREFIX_KEY = "lora_fx.prefix"
PREFIX_CONFIG_KEY = "lora_fx.prefix_config"
_STOP = {"MatMul", "Gemm", "Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention"}
_MASK_OPS = {"LessOrEqual", "Less", "Greater", "GreaterOrEqual", "GatherND", "And", "Equal", "Where"}


def prefix_names(site: str) -> tuple[str, str]:
    return f"{site}.prefix_key", f"{site}.prefix_value"


def prefix_metadata(model: ir.Model) -> dict[str, Any]:
    text = model.metadata_props.get(PREFIX_KEY)
    return json.loads(text) if text else {}


def _const(graph_nodes: list[ir.Node], array: np.ndarray, name: str) -> ir.Value:
    node = ir.node("Constant", [], attributes={"value": ir.tensor(array, name=name)}, metadata_props={INSERTED: "prefix"})
    node.outputs[0].name = name
    graph_nodes.append(node)
    return node.outputs[0]


def _op(graph_nodes: list[ir.Node], op: str, inputs: list[ir.Value], name: str, **attributes: Any) -> ir.Value:
    node = ir.node(op, inputs, attributes=attributes or None, name=name, metadata_props={INSERTED: "prefix"})
    node.outputs[0].name = name
    graph_nodes.append(node)
    return node.outputs[0]


class InsertPrefix:
    """Concatenate per-site key/value prefixes at decomposed attention sites and move positions by T.

    Matches the decomposed attention exporters write (``MatMul(q, kᵀ)`` → scale → ``Add(mask)`` →
    ``Softmax`` → ``MatMul(·, v)``, K possibly repeated for grouped-query models) and positions: a
    ``Range`` reaching ``Cos``/``Sin`` (rotary) or a constant-table ``Gather`` (position embeddings),
    and a ``Slice`` of a ``…position_ids`` initializer (BERT). Refuses, naming the site and the
    reason, the fused forms whose prefix goes through a KV-cache input: the opset-23 ``Attention``
    op and ``com.microsoft`` ``MultiHeadAttention`` / ``GroupQueryAttention`` / ``Attention``.
    """

    def __init__(self, config: PrefixConfig, sites: Sequence[Site],
                 prefixes: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.config = config
        self.sites = list(sites)
        self.prefixes = prefixes or {}

    def __call__(self, model: ir.Model) -> PassResult:
        if prefix_metadata(model):
            raise AdapterError("this model already has prefixes; prefix-tuning is inserted once per model")
        T = self.config.num_virtual_tokens
        plan = []
        for site in self.sites:  # validate everything before the first change
            parts = attention_parts(site.handle)
            if parts is None:
                raise UnsupportedError(f"node {site.handle.name!r} of site {site.name} is no longer an attention site")
            if parts.op != "decomposed":
                raise UnsupportedError(
                    f"attention site {site.name} is a fused {parts.op} node; its keys and values are computed inside the op, "
                    "so a prefix would have to enter through its past_key/past_value (KV cache) inputs, which also shifts "
                    "its causal mask and needs present outputs. lora_fx does not rewrite that form: export the model "
                    "without attention fusion (torch.onnx.export(..., dynamo=True) at opset 18, before optimize_for_ort)"
                )
            if not parts.kv_heads or not parts.head_dim or not parts.num_heads:
                raise UnsupportedError(f"attention site {site.name}: head counts or head size are unknown, so the prefix shape is too")
            if site.name in self.prefixes:
                pk, pv = self.prefixes[site.name]
                want = (parts.kv_heads, T, parts.head_dim)
                if tuple(pk.shape) != want or tuple(pv.shape) != want:
                    raise AdapterError(f"prefixes for {site.name} have shapes {tuple(pk.shape)}, {tuple(pv.shape)}; expected {want}")
            plan.append((site, parts))
        graph = model.graph
        record: dict[str, Any] = {"num_virtual_tokens": T, "sites": {}}
        changed = []
        for site, parts in plan:
            record["sites"][site.name] = self._rewrite(graph, site, parts, T)
            changed.append(site.name)
        changed += offset_positions(graph, T)
        model.metadata_props[PREFIX_KEY] = json.dumps(record, sort_keys=True)
        model.metadata_props[PREFIX_CONFIG_KEY] = self.config.to_json()
        return PassResult(model, True, changed)

    def _rewrite(self, graph: ir.Graph, site: Site, parts: Any, T: int) -> dict[str, Any]:
        kv, hd, heads = parts.kv_heads, parts.head_dim, parts.num_heads
        dtype = parts.output.dtype or ir.DataType.FLOAT
        if site.name in self.prefixes:
            pk, pv = (t.detach().to(torch.float32) for t in self.prefixes[site.name])
        elif self.config.init_weights == "zero":
            pk, pv = torch.zeros(kv, T, hd), torch.zeros(kv, T, hd)
        else:
            pk, pv = torch.randn(kv, T, hd), torch.randn(kv, T, hd)
        k_name, v_name = prefix_names(site.name)
        values = {}
        for name, t in ((k_name, pk), (v_name, pv)):
            tensor = ir.Tensor(t.numpy().astype(dtype.numpy()), name=name)
            value = ir.Value(name=name, shape=ir.Shape([kv, T, hd]), type=ir.TensorType(dtype), const_value=tensor)
            graph.register_initializer(value)
            values[name] = value
        softmax = parts.node
        scores, path = _scores_of(softmax)
        sink = next(u for u in _prob_users(softmax))
        tag = f"{site.name}/prefix"

        def batched(p: ir.Value, like: ir.Value, which: str, transpose: bool, nodes: list[ir.Node]) -> ir.Value:
            if heads != kv:  # the graph repeats K and V to every query head (repeat_kv); the prefix likewise
                p = _op(nodes, "Unsqueeze", [p, _const(nodes, np.array([1], np.int64), f"{tag}/{which}/axis1")], f"{tag}/{which}/unsq1")
                p = _op(nodes, "Expand", [p, _const(nodes, np.array([kv, heads // kv, T, hd], np.int64), f"{tag}/{which}/rep_shape")], f"{tag}/{which}/rep")
                p = _op(nodes, "Reshape", [p, _const(nodes, np.array([heads, T, hd], np.int64), f"{tag}/{which}/heads_shape")], f"{tag}/{which}/heads")
            if transpose:
                p = _op(nodes, "Transpose", [p], f"{tag}/{which}/t", perm=[0, 2, 1])
            p = _op(nodes, "Unsqueeze", [p, _const(nodes, np.array([0], np.int64), f"{tag}/{which}/axis0")], f"{tag}/{which}/unsq0")
            batch = _op(nodes, "Shape", [like], f"{tag}/{which}/batch", start=0, end=1)
            ones = _const(nodes, np.array([1, 1, 1], np.int64), f"{tag}/{which}/ones")
            shape = _op(nodes, "Concat", [batch, ones], f"{tag}/{which}/shape", axis=0)
            # Expand broadcasts [1, H, ., .] against [B, 1, 1, 1]: the prefix for every batch row.
            return _op(nodes, "Expand", [p, shape], f"{tag}/{which}/batched")

        # K: scores = MatMul(q, [Mul](kᵀ, s)); the prefix joins kᵀ on its last axis, before the scale.
        kt_consumer, kt_index = scores, 1
        producer = scores.inputs[1].producer()
        if producer is not None and producer.op_type in ("Mul", "Div") and const_tensor(producer.inputs[1]) is not None:
            kt_consumer, kt_index = producer, 0
        kt = kt_consumer.inputs[kt_index]
        nodes: list[ir.Node] = []
        pk_b = batched(values[k_name], kt, "key", True, nodes)
        new_kt = _op(nodes, "Concat", [pk_b, kt], f"{tag}/key/concat", axis=-1)
        graph.insert_before(kt_consumer, nodes)
        kt_consumer.replace_input_with(kt_index, new_kt)
        # V: MatMul(p, v) with v [B, H, S, D]: the prefix joins on the sequence axis.
        v = sink.inputs[1]
        nodes = []
        pv_b = batched(values[v_name], v, "value", False, nodes)
        new_v = _op(nodes, "Concat", [pv_b, v], f"{tag}/value/concat", axis=2)
        graph.insert_before(sink, nodes)
        sink.replace_input_with(1, new_v)
        # The additive mask gains T zero (visible) columns in front.
        on_path = {id(n) for n in path} | {id(scores)}
        for node in path:
            if node.op_type != "Add":
                continue
            for i, inp in enumerate(node.inputs[:2]):
                src = inp.producer() if inp is not None else None
                if inp is None or (src is not None and id(src) in on_path) or const_tensor(inp) is not None:
                    continue
                nodes = []
                padded = _pad_front(nodes, inp, T, f"{tag}/mask")
                graph.insert_before(node, nodes)
                node.replace_input_with(i, padded)
        return {"kv_heads": kv, "head_dim": hd, "key": k_name, "value": v_name}


def _pad_front(nodes: list[ir.Node], mask: ir.Value, T: int, tag: str) -> ir.Value:
    """``mask`` with T zero columns in front of its last axis.

    Built from the mask's runtime shape (Shape → zeros → CastLike → Concat), so it needs neither the
    rank nor the dtype in the graph's type information (TorchScript exports often lack both).
    """
    shape = _op(nodes, "Shape", [mask], f"{tag}/shape")
    lead = _op(nodes, "Slice", [shape, _const(nodes, np.array([0], np.int64), f"{tag}/start"),
                                _const(nodes, np.array([-1], np.int64), f"{tag}/end")], f"{tag}/lead")
    zeros_shape = _op(nodes, "Concat", [lead, _const(nodes, np.array([T], np.int64), f"{tag}/T")], f"{tag}/zeros_shape", axis=0)
    zeros = _op(nodes, "ConstantOfShape", [zeros_shape], f"{tag}/zeros_f")
    zeros = _op(nodes, "CastLike", [zeros, mask], f"{tag}/zeros")
    return _op(nodes, "Concat", [zeros, mask], f"{tag}/padded", axis=-1)


def _prob_users(softmax: ir.Node):
    value = softmax.outputs[0]
    for _ in range(4):
        users = [u for u, _ in value.uses() if u.op_type != "IsNaN"]
        if len(users) != 1:
            return
        if users[0].op_type == "MatMul":
            yield users[0]
            return
        value = users[0].outputs[0]


def _scores_of(softmax: ir.Node) -> tuple[ir.Node, list[ir.Node]]:
    """The MatMul(q, kᵀ) feeding ``softmax`` and the nodes between them."""
    path: list[ir.Node] = []
    frontier = [softmax.inputs[0]]
    for _ in range(8):
        nxt = []
        for value in frontier:
            node = value.producer() if value is not None else None
            if node is None:
                continue
            if node.op_type == "MatMul" and const_tensor(node.inputs[1]) is None and const_tensor(node.inputs[0]) is None:
                return node, path
            path.append(node)
            nxt.extend(i for i in node.inputs if i is not None and const_tensor(i) is None)
        frontier = nxt
    raise UnsupportedError(f"softmax {softmax.name!r}: no MatMul(q, kᵀ) found before it")


def _reaches_position_use(value: ir.Value, limit: int = 40) -> bool:
    seen: set[int] = set()
    stack, hit = [value], False
    while stack and len(seen) < limit:
        v = stack.pop()
        for user, idx in v.uses():
            if id(user) in seen:
                continue
            seen.add(id(user))
            if user.op_type in ("Cos", "Sin"):
                hit = True
            elif user.op_type == "Gather" and idx == 1 and const_tensor(user.inputs[0]) is not None:
                hit = True
            elif user.op_type in _STOP:
                continue
            elif user.op_type in _MASK_OPS:
                return False
            else:
                stack.extend(o for o in user.outputs)
    return hit


def _position_edges(value: ir.Value, depth: int = 0) -> list[tuple[ir.Value, ir.Node, int]]:
    """The edges ``(value, user, input index)`` at or below ``value`` to offset: those whose
    downstream is position-only.

    Exporters share one ``Range`` between the positions and the causal mask (common subexpression
    elimination), so the offset goes on the edges that lead to positions alone, never on the mask's.
    """
    edges = []
    for user, idx in list(value.uses()):
        if user.op_type in _STOP or user.op_type in _MASK_OPS or user.metadata_props.get(INSERTED):
            continue
        if user.op_type in ("Cos", "Sin") or (user.op_type == "Gather" and idx == 1 and const_tensor(user.inputs[0]) is not None):
            edges.append((value, user, idx))
        elif user.op_type not in ("Shape", "Size") and all(_reaches_position_use(o) for o in user.outputs):
            edges.append((value, user, idx))
        elif depth < 8:
            for o in user.outputs:
                edges += _position_edges(o, depth + 1)
    return edges


def _is_index_table(value: ir.Value | None) -> bool:
    """A constant integer tensor: a ``position_ids`` buffer, whatever the exporter named it."""
    tensor = const_tensor(value)
    return tensor is not None and tensor.dtype in (ir.DataType.INT64, ir.DataType.INT32)


def position_sources(graph: ir.Graph) -> list[tuple[ir.Value, list[tuple[ir.Node, int]]]]:
    """Each value holding real-token positions (below a ``Range``, a slice of a constant index
    table such as BERT's ``position_ids`` buffer, a ``position_ids`` input) with the uses of it
    that lead to positions only."""
    found: list[tuple[ir.Value, ir.Node, int]] = []
    for node in list(graph):
        if node.metadata_props.get(INSERTED):
            continue
        if node.op_type == "Range" or (node.op_type == "Slice" and _is_index_table(node.inputs[0])):
            found += _position_edges(node.outputs[0])
    for value in graph.inputs:
        if value.name == "position_ids":
            found += [(value, u, i) for u, i in value.uses()]
    grouped: dict[int, tuple[ir.Value, list[tuple[ir.Node, int]]]] = {}
    for value, user, idx in found:
        grouped.setdefault(id(value), (value, []))[1].append((user, idx))
    return list(grouped.values())


def offset_positions(graph: ir.Graph, T: int) -> list[str]:
    """Add T to the positions (see the FX pass: PEFT's cache of T prefixes does this)."""
    changed = []
    for value, edges in position_sources(graph):
        nodes: list[ir.Node] = []
        dtype = value.dtype or ir.DataType.INT64
        t = _const(nodes, np.array(T, dtype=dtype.numpy()), f"{value.name}/prefix_offset/T")
        add = ir.node("Add", [value, t], name=f"{value.name}/prefix_offset", metadata_props={INSERTED: "prefix"})
        add.outputs[0].name = f"{value.name}/prefix_offset"
        if value.dtype is not None:  # TorchScript exports often carry no type here; leave it to inference
            add.outputs[0].dtype, add.outputs[0].shape = value.dtype, value.shape
        nodes.append(add)
        producer = value.producer()
        if producer is None:
            graph.insert_before(next(iter(graph)), nodes)
        else:
            graph.insert_after(producer, nodes)
        for user, i in edges:
            user.replace_input_with(i, add.outputs[0])
        changed.append(f"positions:{value.name}")
    return changed


def select_attention_sites(sites: Sequence[Site], config: PrefixConfig) -> list[Site]:
    from lora_fx.passes.fx.insert_prefix import select_attention_sites as select

    return select(sites, config)


def insert_prefix(model: ir.Model, config: PrefixConfig, prefixes: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> PassResult:
    return InsertPrefix(config, select_attention_sites(find_sites(model), config), prefixes)(model)


def apply_prefix(model: ir.Model, config: PrefixConfig) -> ir.Model:
    """``lora_fx.apply(onnx_model, PrefixConfig(...))``."""
    if not isinstance(config, PrefixConfig):
        raise ConfigError(f"apply_prefix takes a PrefixConfig, got {type(config).__name__}")
    if config.prefix_projection:
        raise UnsupportedError(
            "prefix_projection (an MLP producing the prefixes) is a training-time reparameterization; an ONNX model holds "
            "the raw prefixes. Use prefix_projection=False here, or train with projection on the torch graph and export"
        )
    insert_prefix(model, config)
    return model


__all__ = ["InsertPrefix", "PREFIX_KEY", "PREFIX_CONFIG_KEY", "apply_prefix", "insert_prefix", "offset_positions",
           "position_sources", "prefix_metadata", "prefix_names"]
