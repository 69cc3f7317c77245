"""Insert learned key/value prefixes (prefix-tuning) at the attention sites of an ONNX model.

The same job as ``passes/fx/insert_prefix.py`` on an ``onnx_ir.Model``: T learned keys and values
per attention site are placed in front of the site's K and V, the mask gains T visible columns, a
causal mask is offset by T (every query sees the T prefix tokens), and the real tokens' positions
move to ``T .. T+n-1`` (as PEFT's KV-cache prefix does), so the rewritten file computes what the
FX-rewritten model and PEFT compute. Prefix keys get no rotary embedding: they join K after it.

Attention forms and how the prefix enters each:

* decomposed (``MatMul(q, kᵀ)`` → scale → ``Add(mask)`` → ``Softmax`` → ``MatMul(·, v)``): ``Concat``
  on kᵀ and V, T zero columns in front of the additive mask;
* the opset-23/24 ``Attention`` op (3-D or 4-D Q/K/V): ``Concat`` on its K and V inputs, its ``attn_mask``
  padded with T visible columns, ``is_causal=1`` replaced by an explicit causal mask offset by T
  (without a cache ONNX aligns ``is_causal`` upper-left, which would hide the real keys behind the
  prefix); an opset-24 ``nonpad_kv_seqlen`` grows by T instead, and ``is_causal``, which the op then
  aligns to it, stays. Opset-25 sliding windows are refused;
* ``com.microsoft.MultiHeadAttention``: ``Concat`` on key and value, the packed ``bias`` added to Q/K/V
  by explicit nodes first (it must not reach the prefix), ``key_padding_mask`` / ``attention_bias``
  padded, ``unidirectional=1`` replaced by an explicit causal bias offset by T;
* ``com.microsoft.GroupQueryAttention``: the prefix enters as ``past_key`` / ``past_value`` (the op
  only appends new tokens to a cache), ``total_sequence_length`` grows by T and ``seqlens_k`` becomes
  T+S-1 for every row, so the op's causal mask and its rotary positions (past length + i) are those of
  T cached tokens. ONNX Runtime's CPU kernel (1.31) runs a past with a multi-token query at batch 1 only;
  batched prompts then stop with its "batch_size must be 1" error.
* ``com.microsoft.Attention`` (packed QKV weight): unpacked into ``MatMul`` + ``Split`` +
  ``MultiHeadAttention`` with the same bias, ``attention_bias`` and attributes, then as above (its own
  prefix entry, ``past``, ORT refuses together with ``attention_bias``).

Refused, naming the site and the reason, before anything changes: sites that already take a KV cache
(past inputs or used present outputs), masks whose visible value or key axis cannot be told from the
graph, packed QKV inputs of ``MultiHeadAttention``, ``mask_index`` / in-op rotary of
``com.microsoft.Attention``, explicit ``position_ids`` of ``GroupQueryAttention``.

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
from lora_fx.passes.onnx.find_sites import INSERTED, MS, attention_parts, const_tensor, find_sites
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
    """Put per-site key/value prefixes in front of K and V at every attention site and move positions by T.

    Matches the decomposed attention exporters write (``MatMul(q, kᵀ)`` → scale → ``Add(mask)`` →
    ``Softmax`` → ``MatMul(·, v)``, K possibly repeated for grouped-query models), the opset-23
    ``Attention`` op, ``com.microsoft`` ``MultiHeadAttention``, ``GroupQueryAttention`` and ``Attention``
    (see the module docstring for how the prefix enters each), and positions: a ``Range`` reaching
    ``Cos``/``Sin`` (rotary) or a constant-table ``Gather`` (position embeddings), a ``Slice`` of a
    ``…position_ids`` initializer (BERT), a ``position_ids`` graph input. Refuses, naming the site and
    the reason and before changing anything, sites that already read or write a KV cache; unpacks
    ``com.microsoft.Attention``'s packed QKV weight into ``MultiHeadAttention`` first.
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
            if not parts.kv_heads or not parts.head_dim or not parts.num_heads:
                raise UnsupportedError(f"attention site {site.name}: head counts or head size are unknown, so the prefix shape is too")
            how = _FORMS.get(parts.op)
            if how is None:
                raise UnsupportedError(_refusal(site, parts, f"lora_fx has no rule for the {parts.op} form"))
            facts = how[0](site, parts, model.graph)
            if site.name in self.prefixes:
                pk, pv = self.prefixes[site.name]
                want = (parts.kv_heads, T, parts.head_dim)
                if tuple(pk.shape) != want or tuple(pv.shape) != want:
                    raise AdapterError(f"prefixes for {site.name} have shapes {tuple(pk.shape)}, {tuple(pv.shape)}; expected {want}")
            plan.append((site, parts, how[1], facts))
        graph = model.graph
        record: dict[str, Any] = {"num_virtual_tokens": T, "sites": {}}
        changed = []
        for site, parts, rewrite, facts in plan:
            values = self._initializers(graph, site, parts, T)
            rewrite(graph, site, parts, T, values, facts)
            record["sites"][site.name] = {"kv_heads": parts.kv_heads, "head_dim": parts.head_dim,
                                          "key": values[0].name, "value": values[1].name}
            changed.append(site.name)
        changed += offset_positions(graph, T)
        model.metadata_props[PREFIX_KEY] = json.dumps(record, sort_keys=True)
        model.metadata_props[PREFIX_CONFIG_KEY] = self.config.to_json()
        return PassResult(model, True, changed)

    def _initializers(self, graph: ir.Graph, site: Site, parts: Any, T: int) -> tuple[ir.Value, ir.Value]:
        """The site's ``prefix_key`` / ``prefix_value`` initializers ``[kv_heads, T, head_dim]``."""
        kv, hd = parts.kv_heads, parts.head_dim
        dtype = parts.output.dtype or (parts.q.dtype if parts.q is not None else None) or ir.DataType.FLOAT
        if site.name in self.prefixes:
            pk, pv = (t.detach().to(torch.float32) for t in self.prefixes[site.name])
        elif self.config.init_weights == "zero":
            pk, pv = torch.zeros(kv, T, hd), torch.zeros(kv, T, hd)
        else:
            pk, pv = torch.randn(kv, T, hd), torch.randn(kv, T, hd)
        values = []
        for name, t in zip(prefix_names(site.name), (pk, pv)):
            tensor = ir.Tensor(t.numpy().astype(dtype.numpy()), name=name)
            value = ir.Value(name=name, shape=ir.Shape([kv, T, hd]), type=ir.TensorType(dtype), const_value=tensor)
            graph.register_initializer(value)
            values.append(value)
        return values[0], values[1]


# ---- decomposed attention -------------------------------------------------------------------------


def _check_decomposed(site: Site, parts: Any, graph: ir.Graph) -> None:
    return None


def _rewrite_decomposed(graph: ir.Graph, site: Site, parts: Any, T: int, values: tuple[ir.Value, ir.Value], facts: Any) -> None:
    kv, hd, heads = parts.kv_heads, parts.head_dim, parts.num_heads
    softmax = parts.node
    scores, path = _scores_of(softmax)
    sink = next(u for u in _prob_users(softmax))
    tag = f"{site.name}/prefix"
    # The graph repeats K and V to every query head (repeat_kv) when heads != kv; the prefix likewise.
    reps = heads // kv if heads != kv else 1
    # K: scores = MatMul(q, [Mul](kᵀ, s)); the prefix joins kᵀ on its last axis, before the scale.
    kt_consumer, kt_index = scores, 1
    producer = scores.inputs[1].producer()
    if producer is not None and producer.op_type in ("Mul", "Div") and const_tensor(producer.inputs[1]) is not None:
        kt_consumer, kt_index = producer, 0
    kt = kt_consumer.inputs[kt_index]
    nodes: list[ir.Node] = []
    pk_b = _batched(nodes, values[0], kv, reps, T, hd, kt, "bnhs", f"{tag}/key")
    new_kt = _op(nodes, "Concat", [pk_b, kt], f"{tag}/key/concat", axis=-1)
    graph.insert_before(kt_consumer, nodes)
    kt_consumer.replace_input_with(kt_index, new_kt)
    # V: MatMul(p, v) with v [B, H, S, D]: the prefix joins on the sequence axis.
    v = sink.inputs[1]
    nodes = []
    pv_b = _batched(nodes, values[1], kv, reps, T, hd, v, "bnsh", f"{tag}/value")
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


# ---- fused attention ops ----------------------------------------------------------------------------

def _refusal(site: Site, parts: Any, reason: str) -> str:
    return f"attention site {site.name} ({parts.op} node {parts.node.name!r}) cannot take a prefix: {reason}"


def _used(value: ir.Value | None) -> bool:
    return value is not None and (bool(value.uses()) or value.is_graph_output())


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def _set_input(node: ir.Node, i: int, value: ir.Value) -> None:
    """Input ``i`` of ``node`` becomes ``value``; optional inputs the node left out are added (as absent) first."""
    if len(node.inputs) <= i:
        node.resize_inputs(i + 1)
    node.replace_input_with(i, value)


def _rank(value: ir.Value | None) -> int | None:
    return len(value.shape) if value is not None and value.shape is not None else None


def _static_dim(value: ir.Value | None, axis: int) -> int | None:
    if value is None or value.shape is None or not -len(value.shape) <= axis < len(value.shape):
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None


def _refuse_cache(site: Site, parts: Any, past: list[int], present: list[int]) -> None:
    node = parts.node
    if any(_input(node, i) is not None for i in past) or any(_used(node.outputs[i]) for i in present if i < len(node.outputs)):
        raise UnsupportedError(_refusal(
            site, parts, "it reads or writes a KV cache (past_key/past_value inputs or used present outputs), so the prefix "
            "would have to live in the cache the caller keeps. Export the model without the KV cache (use_cache=False) "
            "for prefix-tuning, or prepend the prefixes to the cache yourself"))


def _check_mask(site: Site, parts: Any, mask: ir.Value | None, what: str) -> None:
    if mask is None:
        return
    if mask.dtype is None:
        raise UnsupportedError(_refusal(site, parts, f"the dtype of its {what} is unknown, so the visible value of the "
                                        "T prefix columns (True, 1 or 0.0) is too; run shape inference first"))
    if _static_dim(mask, -1) == 1:
        raise UnsupportedError(_refusal(site, parts, f"its {what} broadcasts over the key axis (last dim 1); expand it "
                                        "to the key length before inserting a prefix"))


def _check_onnx_attention(site: Site, parts: Any, graph: ir.Graph) -> dict[str, Any]:
    node = parts.node
    _refuse_cache(site, parts, past=[4, 5], present=[1, 2])
    if len(node.outputs) > 3 and _used(node.outputs[3]):
        raise UnsupportedError(_refusal(site, parts, "its qk_matmul_output is used, and it would gain T columns"))
    windows = [w for w in ("left_window_size", "right_window_size") if node.attributes.get_int(w, -1) >= 0]
    if windows:
        # A window counts keys from the query's position; whether T prefix keys fall out of it is a choice
        # PEFT's KV-cache prefix makes per model, not one this pass can read from the graph.
        raise UnsupportedError(_refusal(site, parts, f"it attends over a sliding window ({', '.join(windows)}), "
                                        "which the prefix keys would fall out of"))
    q, k = node.inputs[0], node.inputs[1]
    rank = _rank(q) or _rank(k)
    if rank == 4:
        k_heads = _static_dim(k, 1)
    elif rank == 3:
        k_heads = node.attributes.get_int("kv_num_heads", 0) or None
    else:
        raise UnsupportedError(_refusal(site, parts, "the rank of Q/K (3-D or 4-D) is unknown; run shape inference first"))
    if not k_heads or k_heads % parts.kv_heads:
        raise UnsupportedError(_refusal(site, parts, f"K carries {k_heads} heads, not a multiple of the site's "
                                        f"{parts.kv_heads} key/value heads"))
    _check_mask(site, parts, _input(node, 3), "attn_mask")
    return {"rank": rank, "reps": k_heads // parts.kv_heads}


def _rewrite_onnx_attention(graph: ir.Graph, site: Site, parts: Any, T: int, values: tuple[ir.Value, ir.Value],
                            facts: dict[str, Any]) -> None:
    node, tag = parts.node, f"{site.name}/prefix"
    rank, reps = facts["rank"], facts["reps"]
    q, k = node.inputs[0], node.inputs[1]
    nodes: list[ir.Node] = []
    seq_axis = _concat_key_value(nodes, node, parts, values, T, rank, reps, tag)
    mask = _input(node, 3)
    if mask is not None:
        mask = _pad_front(nodes, mask, T, f"{tag}/mask", fill=_visible_fill(mask.dtype))
    causal = node.attributes.get_int("is_causal", 0) if "is_causal" in node.attributes else 0
    nonpad = _input(node, 6)
    if nonpad is not None:
        # opset 24: the valid keys per row, padding after them; the prefix adds T valid keys in front. The op
        # aligns is_causal to them (offset nonpad - S), so T more shifts the causal rule by T too: it stays.
        t = _op(nodes, "CastLike", [_const(nodes, np.array(T, np.int64), f"{tag}/T"), nonpad], f"{tag}/T_like")
        _set_input(node, 6, _op(nodes, "Add", [nonpad, t], f"{tag}/nonpad_kv_seqlen"))
        causal = 0
    if causal:
        # is_causal aligns upper-left (query i sees keys 0..i); with T keys in front it would hide real keys,
        # so the same rule offset by T becomes an explicit mask and the attribute is cleared.
        visible = _causal_visible(nodes, q, seq_axis, k, seq_axis, T, f"{tag}/causal")
        if mask is None:
            mask = visible
        elif mask.dtype == ir.DataType.BOOL:
            mask = _op(nodes, "And", [mask, visible], f"{tag}/causal/and")
        else:
            mask = _op(nodes, "Add", [mask, _additive(nodes, visible, mask, f"{tag}/causal")], f"{tag}/causal/add")
        node.attributes["is_causal"] = ir.AttrInt64("is_causal", 0)
    graph.insert_before(node, nodes)
    if mask is not None:
        _set_input(node, 3, mask)


def _concat_key_value(nodes: list[ir.Node], node: ir.Node, parts: Any, values: tuple[ir.Value, ir.Value], T: int,
                      rank: int, reps: int, tag: str) -> int:
    """Put the batched prefixes in front of ``node``'s key (input 1) and value (input 2), 3-D [B, S, heads*hd] or
    4-D [B, heads, S, hd]; returns the sequence axis."""
    layout, seq_axis = ("bnsh", 2) if rank == 4 else ("bsh", 1)
    for i, which in ((1, "key"), (2, "value")):
        kv_in = node.inputs[i]
        p = _batched(nodes, values[i - 1], parts.kv_heads, reps, T, parts.head_dim, kv_in, layout, f"{tag}/{which}")
        node.replace_input_with(i, _op(nodes, "Concat", [p, kv_in], f"{tag}/{which}/concat", axis=seq_axis))
    return seq_axis


def _check_mha(site: Site, parts: Any, graph: ir.Graph) -> dict[str, Any]:
    node = parts.node
    _refuse_cache(site, parts, past=[6, 7, 8, 9], present=[1, 2])
    if len(node.outputs) > 3 and _used(node.outputs[3]):
        raise UnsupportedError(_refusal(site, parts, "its output_qk is used, and it would gain T columns"))
    q, k, v, bias = node.inputs[0], _input(node, 1), _input(node, 2), _input(node, 3)
    if k is None or v is None:
        raise UnsupportedError(_refusal(site, parts, "Q, K and V come packed in the query input, so there is no key "
                                        "input to put the prefix in front of; unpack them into query/key/value first"))
    rank = _rank(k)
    if rank not in (3, 4) or _rank(v) != rank:
        raise UnsupportedError(_refusal(site, parts, f"its key/value are {rank}-D (packed KV or unknown); lora_fx puts "
                                        "prefixes into 3-D [B, S, hidden] or 4-D [B, heads, S, head_dim] keys and values"))
    widths = None
    if bias is not None:
        widths = (_static_dim(q, -1), _static_dim(k, -1), _static_dim(v, -1))
        if rank != 3 or not all(widths):
            raise UnsupportedError(_refusal(site, parts, "its packed bias would be added to the prefix too, and the widths "
                                            "of Q/K/V needed to split it out are unknown (or K/V are 4-D)"))
    heads = node.attributes.get_int("num_heads", 0)
    if heads % parts.kv_heads:
        raise UnsupportedError(_refusal(site, parts, f"{heads} heads are no multiple of {parts.kv_heads} key/value heads"))
    kpm = _input(node, 4)
    if kpm is not None and _rank(kpm) != 2:
        raise UnsupportedError(_refusal(site, parts, "its key_padding_mask is not the 2-D [batch, kv_sequence] form (mask "
                                        "index or unknown rank), which is the one that can gain T visible columns"))
    _check_mask(site, parts, kpm, "key_padding_mask")
    _check_mask(site, parts, _input(node, 5), "attention_bias")
    return {"rank": rank, "reps": heads // parts.kv_heads, "widths": widths}


def _rewrite_mha(graph: ir.Graph, site: Site, parts: Any, T: int, values: tuple[ir.Value, ir.Value],
                 facts: dict[str, Any]) -> None:
    node, tag = parts.node, f"{site.name}/prefix"
    rank, reps = facts["rank"], facts["reps"]
    nodes: list[ir.Node] = []
    bias = _input(node, 3)
    if bias is not None:
        # The op adds its packed [q | k | v] bias to the whole key and value, prefix included; PEFT's prefix takes
        # no bias, so the bias goes onto the real Q, K, V by explicit Adds and leaves the op.
        start = 0
        for i, (which, width) in enumerate(zip(("query", "key", "value"), facts["widths"])):
            part = _op(nodes, "Slice", [bias, _const(nodes, np.array([start], np.int64), f"{tag}/bias/{which}/start"),
                                        _const(nodes, np.array([start + width], np.int64), f"{tag}/bias/{which}/end")],
                       f"{tag}/bias/{which}")
            node.replace_input_with(i, _op(nodes, "Add", [node.inputs[i], part], f"{tag}/bias/{which}/add"))
            start += width
        node.replace_input_with(3, None)
    q, k = node.inputs[0], node.inputs[1]
    seq_axis = _concat_key_value(nodes, node, parts, values, T, rank, reps, tag)
    kpm = _input(node, 4)
    if kpm is not None:
        node.replace_input_with(4, _pad_front(nodes, kpm, T, f"{tag}/key_padding_mask", fill=_visible_fill(kpm.dtype)))
    attn_bias = _input(node, 5)
    if attn_bias is not None:
        attn_bias = _pad_front(nodes, attn_bias, T, f"{tag}/attention_bias")
    if node.attributes.get_int("unidirectional", 0) if "unidirectional" in node.attributes else 0:
        # Without a past input the op's causal rule is upper-left (query i sees keys 0..i); the prefix would hide the
        # real keys behind it, so the rule offset by T becomes an explicit additive bias.
        visible = _causal_visible(nodes, q, 1, k, seq_axis, T, f"{tag}/causal")
        additive = _additive(nodes, visible, q, f"{tag}/causal")
        # attention_bias is 4-D [B or 1, N or 1, S_q, S_kv]
        additive = _op(nodes, "Unsqueeze", [additive, _const(nodes, np.array([0, 1], np.int64), f"{tag}/causal/axes")],
                       f"{tag}/causal/bias")
        attn_bias = additive if attn_bias is None else _op(nodes, "Add", [attn_bias, additive], f"{tag}/causal/add")
        node.attributes["unidirectional"] = ir.AttrInt64("unidirectional", 0)
    graph.insert_before(node, nodes)
    if attn_bias is not None:
        _set_input(node, 5, attn_bias)


def _check_gqa(site: Site, parts: Any, graph: ir.Graph) -> None:
    node = parts.node
    _refuse_cache(site, parts, past=[3, 4], present=[1, 2])
    if _input(node, 5) is None or _input(node, 6) is None:
        raise UnsupportedError(_refusal(site, parts, "seqlens_k or total_sequence_length is missing"))
    if _input(node, 9) is not None:
        raise UnsupportedError(_refusal(site, parts, "it takes explicit position_ids, which lora_fx does not offset by T "
                                        "here; let the op derive positions (drop the input) or offset them before the op"))
    _check_mask(site, parts, _input(node, 10), "attention_bias")
    return None


def _rewrite_gqa(graph: ir.Graph, site: Site, parts: Any, T: int, values: tuple[ir.Value, ir.Value], facts: Any) -> None:
    node, tag = parts.node, f"{site.name}/prefix"
    nodes: list[ir.Node] = []
    ref = node.inputs[0]  # the query: batch size
    # The op appends the new keys after `past`: the prefix is a T-token cache, [B, kv_heads, T, head_dim].
    for i, which in ((3, "key"), (4, "value")):
        _set_input(node, i, _batched(nodes, values[i - 3], parts.kv_heads, 1, T, parts.head_dim, ref, "bnsh",
                                     f"{tag}/past_{which}"))
    total, seqlens = node.inputs[6], node.inputs[5]
    t = _op(nodes, "CastLike", [_const(nodes, np.array(T, np.int64), f"{tag}/T"), total], f"{tag}/T_like")
    new_total = _op(nodes, "Add", [total, t], f"{tag}/total_sequence_length")
    # The op reads row b as past = seqlens_k[b] + 1 - S cached tokens followed by S new ones (positions past..past+S-1).
    # Offsetting a right-padded row's seqlens_k by T would shorten its past below T; every row gets T+S-1 instead: the
    # padded tail is hidden from real queries by the causal mask anyway, and real tokens sit at T..T+n-1.
    one = _op(nodes, "CastLike", [_const(nodes, np.array(1, np.int64), f"{tag}/one"), total], f"{tag}/one_like")
    last = _op(nodes, "Sub", [new_total, one], f"{tag}/last")
    last = _op(nodes, "CastLike", [last, seqlens], f"{tag}/last_like")
    new_seqlens = _op(nodes, "Expand", [last, _op(nodes, "Shape", [seqlens], f"{tag}/seqlens_shape")], f"{tag}/seqlens_k")
    node.replace_input_with(6, new_total)
    node.replace_input_with(5, new_seqlens)
    attn_bias = _input(node, 10)
    if attn_bias is not None:
        node.replace_input_with(10, _pad_front(nodes, attn_bias, T, f"{tag}/attention_bias"))
    graph.insert_before(node, nodes)


def _check_com_attention(site: Site, parts: Any, graph: ir.Graph) -> dict[str, Any]:
    node = parts.node
    _refuse_cache(site, parts, past=[4, 6], present=[1])
    w = const_tensor(_input(node, 1))
    sizes = list(node.attributes.get_ints("qkv_hidden_sizes", [])) if "qkv_hidden_sizes" in node.attributes else []
    hidden = parts.num_heads * parts.head_dim
    if w is None or len(w.shape) != 2 or int(w.shape[1]) != 3 * hidden or any(n != hidden for n in sizes):
        raise UnsupportedError(_refusal(site, parts, "its packed QKV weight is not a constant [hidden, 3*hidden] of equal "
                                        "q/k/v widths, so it cannot be unpacked into MultiHeadAttention's query/key/value"))
    if _input(node, 3) is not None:
        raise UnsupportedError(_refusal(site, parts, "it takes a mask_index, which has no padded form for keys that include "
                                        "a prefix; give the op an additive attention_bias instead"))
    if node.attributes.get_int("do_rotary", 0) if "do_rotary" in node.attributes else 0:
        raise UnsupportedError(_refusal(site, parts, "it applies rotary embedding inside the op"))
    _check_mask(site, parts, _input(node, 5), "attention_bias")
    return {"rank": 3, "reps": 1, "widths": (hidden, hidden, hidden)}


def _rewrite_com_attention(graph: ir.Graph, site: Site, parts: Any, T: int, values: tuple[ir.Value, ir.Value],
                           facts: dict[str, Any]) -> None:
    """com.microsoft.Attention → MatMul + Split + MultiHeadAttention (same bias, attention_bias and attributes), then
    MultiHeadAttention's rule. The op itself cannot take the prefix: its only way in, `past`, ORT refuses together
    with attention_bias, and its projections happen inside."""
    node, tag = parts.node, f"{site.name}/prefix/unpacked"
    nodes: list[ir.Node] = []
    qkv = _op(nodes, "MatMul", [node.inputs[0], node.inputs[1]], f"{tag}/qkv")
    hidden = facts["widths"][0]
    split = ir.node("Split", [qkv, _const(nodes, np.array([hidden] * 3, np.int64), f"{tag}/sizes")], attributes={"axis": -1},
                    num_outputs=3, name=f"{tag}/split", metadata_props={INSERTED: "prefix"})
    for out, which in zip(split.outputs, ("q", "k", "v")):
        out.name = f"{tag}/{which}"
    nodes.append(split)
    keep = {k: v for k, v in node.attributes.items() if k in ("num_heads", "scale", "unidirectional", "mask_filter_value")}
    mha = ir.node("MultiHeadAttention", [*split.outputs, _input(node, 2), None, _input(node, 5)], attributes=keep,
                  domain=MS, name=f"{node.name}/mha", metadata_props=dict(node.metadata_props))
    nodes.append(mha)
    graph.insert_before(node, nodes)
    old = node.outputs[0]
    ir.convenience.replace_all_uses_with(old, mha.outputs[0])
    for i, out in enumerate(graph.outputs):
        if out is old:
            graph.outputs[i] = mha.outputs[0]
    graph.remove(node, safe=True)
    mha.outputs[0].name, mha.outputs[0].shape, mha.outputs[0].type = old.name, old.shape, old.type
    unpacked = type(parts)(mha, split.outputs[0], split.outputs[1], split.outputs[2], mha.outputs[0], parts.num_heads,
                           parts.kv_heads, parts.head_dim, f"{MS}.MultiHeadAttention")
    _rewrite_mha(graph, site, unpacked, T, values, facts)


_FORMS = {
    "decomposed": (_check_decomposed, _rewrite_decomposed),
    "Attention": (_check_onnx_attention, _rewrite_onnx_attention),
    f"{MS}.MultiHeadAttention": (_check_mha, _rewrite_mha),
    f"{MS}.GroupQueryAttention": (_check_gqa, _rewrite_gqa),
    f"{MS}.Attention": (_check_com_attention, _rewrite_com_attention),
}


# ---- building blocks ------------------------------------------------------------------------------


def _batched(nodes: list[ir.Node], p: ir.Value, kv: int, reps: int, T: int, hd: int, like: ir.Value, layout: str,
             tag: str) -> ir.Value:
    """Prefix ``p`` ``[kv, T, hd]`` as a batch of ``like``'s size, each kv head repeated ``reps`` times (in
    repeat_kv's order: head h uses kv head h // reps), in ``layout``: ``bnsh`` [B, H, T, hd], ``bnhs`` [B, H, hd, T]
    (a transposed key) or ``bsh`` [B, T, H*hd]."""
    heads = kv * reps
    if reps > 1:
        p = _op(nodes, "Unsqueeze", [p, _const(nodes, np.array([1], np.int64), f"{tag}/axis1")], f"{tag}/unsq1")
        p = _op(nodes, "Expand", [p, _const(nodes, np.array([kv, reps, T, hd], np.int64), f"{tag}/rep_shape")], f"{tag}/rep")
        p = _op(nodes, "Reshape", [p, _const(nodes, np.array([heads, T, hd], np.int64), f"{tag}/heads_shape")], f"{tag}/heads")
    if layout == "bnhs":
        p = _op(nodes, "Transpose", [p], f"{tag}/t", perm=[0, 2, 1])
    elif layout == "bsh":
        p = _op(nodes, "Transpose", [p], f"{tag}/t", perm=[1, 0, 2])
        p = _op(nodes, "Reshape", [p, _const(nodes, np.array([T, heads * hd], np.int64), f"{tag}/flat_shape")], f"{tag}/flat")
    p = _op(nodes, "Unsqueeze", [p, _const(nodes, np.array([0], np.int64), f"{tag}/axis0")], f"{tag}/unsq0")
    batch = _op(nodes, "Shape", [like], f"{tag}/batch", start=0, end=1)
    ones = _const(nodes, np.ones(2 if layout == "bsh" else 3, np.int64), f"{tag}/ones")
    shape = _op(nodes, "Concat", [batch, ones], f"{tag}/shape", axis=0)
    # Expand broadcasts [1, ...] against [B, 1, ...]: the prefix for every batch row.
    return _op(nodes, "Expand", [p, shape], f"{tag}/batched")


def _visible_fill(dtype: ir.DataType | None) -> np.ndarray | None:
    """What a visible mask entry holds: True for boolean masks, 1 for integer padding masks, 0 (additive) else."""
    if dtype == ir.DataType.BOOL:
        return np.array([True])
    if dtype is not None and dtype.is_integer():
        return np.array([1], dtype=dtype.numpy())
    return None


def _causal_visible(nodes: list[ir.Node], q: ir.Value, q_axis: int, k: ir.Value, k_axis: int, T: int, tag: str) -> ir.Value:
    """Boolean ``[S_q, T + S_kv]``: query i sees the T prefix keys and real keys 0..i (key column j <= i + T)."""
    def length(value: ir.Value, axis: int, which: str) -> ir.Value:
        dim = _op(nodes, "Shape", [value], f"{tag}/{which}_len", start=axis, end=axis + 1)
        return _op(nodes, "Squeeze", [dim], f"{tag}/{which}_n")

    zero = _const(nodes, np.array(0, np.int64), f"{tag}/zero")
    one = _const(nodes, np.array(1, np.int64), f"{tag}/one")
    t = _const(nodes, np.array(T, np.int64), f"{tag}/T")
    rows = _op(nodes, "Range", [zero, length(q, q_axis, "q"), one], f"{tag}/rows")
    rows = _op(nodes, "Unsqueeze", [rows, _const(nodes, np.array([1], np.int64), f"{tag}/axis1")], f"{tag}/rows_col")
    last = _op(nodes, "Add", [rows, t], f"{tag}/last_visible")
    total = _op(nodes, "Add", [length(k, k_axis, "kv"), t], f"{tag}/total")
    cols = _op(nodes, "Range", [zero, total, one], f"{tag}/cols")
    return _op(nodes, "LessOrEqual", [cols, last], f"{tag}/visible")


def _additive(nodes: list[ir.Node], visible: ir.Value, like: ir.Value, tag: str) -> ir.Value:
    """0 where ``visible``, -inf elsewhere, in ``like``'s dtype."""
    zero = _const(nodes, np.array(0.0, np.float32), f"{tag}/zero_f")
    hidden = _const(nodes, np.array(-np.inf, np.float32), f"{tag}/hidden_f")
    add = _op(nodes, "Where", [visible, zero, hidden], f"{tag}/additive_f")
    return _op(nodes, "CastLike", [add, like], f"{tag}/additive")


def _pad_front(nodes: list[ir.Node], mask: ir.Value, T: int, tag: str, fill: np.ndarray | None = None) -> ir.Value:
    """``mask`` with T visible columns in front of its last axis: zeros (additive masks) or ``fill``.

    Built from the mask's runtime shape (Shape → ConstantOfShape → Concat), so it needs neither the
    rank nor (for additive masks, cast like the mask) the dtype in the graph's type information
    (TorchScript exports often lack both).
    """
    shape = _op(nodes, "Shape", [mask], f"{tag}/shape")
    lead = _op(nodes, "Slice", [shape, _const(nodes, np.array([0], np.int64), f"{tag}/start"),
                                _const(nodes, np.array([-1], np.int64), f"{tag}/end")], f"{tag}/lead")
    zeros_shape = _op(nodes, "Concat", [lead, _const(nodes, np.array([T], np.int64), f"{tag}/T")], f"{tag}/zeros_shape", axis=0)
    if fill is None:
        zeros = _op(nodes, "ConstantOfShape", [zeros_shape], f"{tag}/zeros_f")
        visible = _op(nodes, "CastLike", [zeros, mask], f"{tag}/zeros")
    else:
        visible = _op(nodes, "ConstantOfShape", [zeros_shape], f"{tag}/visible", value=ir.tensor(fill))
    return _op(nodes, "Concat", [visible, mask], f"{tag}/padded", axis=-1)


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
