"""How ``insert_prefix`` puts T prefix keys/values into each attention form of an ONNX graph.

One rule per form, as onnxscript's rewrite rules: ``check`` reads the site and raises
``UnsupportedError`` saying why it refuses (before the pass changes anything), returning the facts
``rewrite`` needs; ``rewrite`` inserts the nodes. ``FORMS`` maps ``AttentionParts.op`` to the rule.

Attention forms and how the prefix enters each:

* decomposed (``MatMul(q, kᵀ)`` → scale → ``Add(mask)`` → ``Softmax`` → ``MatMul(·, v)``): ``Concat``
  on kᵀ and V, T zero columns in front of the additive mask. A T5 relative position bias added to the scores
  (a constant table ``Gather``-ed at bucketed ``memory - context`` positions, both numbered by ``Range``) is
  computed again as PEFT's cache of T prefixes makes T5 compute it: prefix key t at position t seen from query i
  at T + i gets the bucket of ``t - T - i`` (the real keys' ``j - i`` stay), through a copy of the model's own
  bucketing nodes, and a mask the bias meets on the way (SDPA exports merge them with ``Where``) gains T visible
  columns;
* the opset-23/24 ``Attention`` op (3-D or 4-D Q/K/V): ``Concat`` on its K and V inputs, its ``attn_mask``
  padded with T visible columns, ``is_causal=1`` replaced by an explicit causal mask offset by T
  (without a cache ONNX aligns ``is_causal`` upper-left, which would hide the real keys behind the
  prefix); an opset-24 ``nonpad_kv_seqlen`` grows by T instead, and ``is_causal``, which the op then
  aligns to it, stays. An ``attn_mask`` carrying a T5 relative position bias is computed again over T + k keys
  as in the decomposed form. Opset-25 sliding windows are refused;
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
  prefix entry, ``past``, ORT refuses together with ``attention_bias``);
* heads merged into the batch axis (Bloom: ``MatMul`` on ``[batch*heads, ...]`` around a ``[batch, heads, q, -1]``
  Reshape of the scores): ``Concat`` on kᵀ and V in that layout (row ``b*heads + h`` holds head h), T zero columns
  in front of the mask added after the Reshape, and a bias over the keys added before it (ALiBi) computed again
  for T + k keys, as PEFT's cache makes the model compute it: from the ``[batch, keys]`` mask its ``CumSum``
  counts, with T ones in front, or from its ``Range(0, keys)`` lengthened by T. Refused: any other key bias,
  views that name the key length.

Refused, naming the site and the reason, before anything changes: sites that already take a KV cache
(past inputs or used present outputs), masks whose visible value or key axis cannot be told from the
graph, a relative position bias in a fused op's bias input or one whose positions are not ``[1, keys]`` minus
``[queries, 1]``, packed QKV inputs of ``MultiHeadAttention``, ``mask_index`` / in-op rotary of
``com.microsoft.Attention``, explicit ``position_ids`` of ``GroupQueryAttention``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from lora_fx.errors import UnsupportedError
from lora_fx.passes.onnx.find_sites import INSERTED, MS, const_tensor, is_inserted
from lora_fx.passes.onnx.prefix_nodes import (
    additive_mask,
    batched,
    causal_visible,
    emit,
    emit_const,
    input_at,
    is_used,
    merged_batched,
    pad_front,
    rank_of,
    set_input,
    static_dim,
    visible_fill,
)
from lora_fx.sites import Site


def refusal(site: Site, parts: Any, reason: str) -> str:
    return f"attention site {site.name} ({parts.op} node {parts.node.name!r}) cannot take a prefix: {reason}"


def _refuse_cache(site: Site, parts: Any, past: list[int], present: list[int]) -> None:
    node = parts.node
    if any(input_at(node, i) is not None for i in past) or any(is_used(node.outputs[i]) for i in present if i < len(node.outputs)):
        raise UnsupportedError(refusal(
            site, parts, "it reads or writes a KV cache (past_key/past_value inputs or used present outputs), so the prefix "
            "would have to live in the cache the caller keeps. Export the model without the KV cache (use_cache=False) "
            "for prefix-tuning, or prepend the prefixes to the cache yourself"))


def _from_range(value: ir.Value | None, depth: int = 6) -> bool:
    while value is not None and depth > 0:
        node = value.producer()
        if node is None:
            return False
        if node.op_type == "Range":
            return True
        if node.op_type not in ("Unsqueeze", "Slice", "Add", "Reshape", "Cast"):
            return False
        value, depth = node.inputs[0], depth - 1
    return False


def relative_position_bias(value: ir.Value | None, budget: int = 48) -> ir.Node | None:
    """The ``Gather`` of a T5-style relative position bias (a constant table indexed by bucketed ``memory -
    context`` positions, both numbered by ``Range``) among the inputs of ``value``, or None."""
    seen: set[int] = set()
    queue = [value]
    while queue and len(seen) < budget:
        v = queue.pop(0)
        node = v.producer() if v is not None else None
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Gather" and const_tensor(node.inputs[0]) is not None and _relative_positions(node) is not None:
            return node
        if node.op_type not in ("MatMul", "Softmax"):
            queue.extend(node.inputs)
    return None


def _relative_positions(gather: ir.Node) -> ir.Node | None:
    """The ``Sub(memory, context)`` of two ``Range``-numbered positions that ``gather``'s indices are bucketed from."""
    inner: set[int] = set()
    back = [gather.inputs[1]]
    while back and len(inner) < 40:
        u = back.pop(0)
        src = u.producer() if u is not None else None
        if src is None or id(src) in inner:
            continue
        inner.add(id(src))
        if src.op_type == "Sub" and all(_from_range(i) for i in src.inputs[:2]):
            return src
        back.extend(src.inputs)
    return None


def carries_relative_position_bias(parts: Any) -> bool:
    """Whether the site's scores get a T5-style relative position bias (through the scores before its Softmax, or
    its op's mask and bias inputs)."""
    node = parts.node
    inputs = [node.inputs[0]] if parts.op in ("decomposed", "merged_heads") else list(node.inputs[3:])
    return any(relative_position_bias(v) is not None for v in inputs if v is not None)


def _refuse_relative_bias(site: Site, parts: Any, mask: ir.Value | None, what: str) -> None:
    if relative_position_bias(mask) is not None:
        # Rebuilt where the exporter wrote it (the decomposed scores, the opset-23 Attention op's attn_mask); a fused
        # op's bias input may have been rearranged by the fusion, so its chain back to the positions is not trusted.
        raise UnsupportedError(refusal(
            site, parts, f"its {what} carries a relative position bias (T5), which PEFT's prefix-tuning extends over "
            "the prefix keys; lora_fx rebuilds that bias where torch.onnx writes it (the decomposed scores, or the "
            f"opset-23 Attention op's attn_mask), not in the {what} of a {parts.op} site. Prefix the file as exported, "
            "before fusing attention (torch.onnx.export(..., dynamo=True) or the TorchScript exporter), or apply the "
            "PrefixConfig to the torch model (lora_fx.capture of T5ForConditionalGeneration) and export it with "
            "lora_fx.export_onnx"))


_ELEMENTWISE_MASKS = {"Where": (0,), "And": (0, 1), "Or": (0, 1), "Add": (0, 1), "Sub": (0,)}


def _relative_bias_plan(site: Site, parts: Any, term: ir.Value) -> dict[str, Any]:
    """How ``term``, a score term carrying a relative position bias, is computed again for T prefix keys: the
    ``Sub(memory, context)`` it buckets and, for every tensor the bias meets on its way to the scores (the mask an
    SDPA export merges in with ``Where``), the input to widen by T visible columns. Refuses a bias it cannot read."""
    gather = relative_position_bias(term)
    sub = _relative_positions(gather)

    def axes(value: ir.Value) -> list[int] | None:
        node = value.producer()
        while node is not None and node.op_type in ("Cast", "Add"):
            node = node.inputs[0].producer() if node.inputs[0] is not None else None
        if node is None or node.op_type != "Unsqueeze":
            return None
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            t = const_tensor(node.inputs[1])
            return None if t is None else [int(a) for a in np.asarray(t.numpy()).reshape(-1)]
        return list(node.attributes.get_ints("axes", [])) or None

    memory, context = axes(sub.inputs[0]), axes(sub.inputs[1])
    if memory != [0] or context not in ([1], [-1]):
        raise UnsupportedError(refusal(
            site, parts, "its relative position bias buckets a Sub of two positions that are not key positions "
            f"[1, keys] minus query positions [queries, 1] (Unsqueeze axes {memory} and {context}), so lora_fx cannot "
            "tell which to extend by the T prefix keys"))
    between = {id(n) for n in _ancestor_nodes(term, 1 << 30)}
    chain, frontier = [], [sub]
    seen = {id(sub)}
    while frontier:  # the nodes from the Sub to the term: those computed from the relative positions
        for out in frontier.pop().outputs:
            for user, _ in out.uses():
                if id(user) in between and id(user) not in seen:
                    seen.add(id(user))
                    chain.append(user)
                    frontier.append(user)
    computed = {id(o) for n in [sub, *chain] for o in n.outputs}
    pads = []
    for node in chain:
        for i, inp in enumerate(node.inputs):
            if inp is None or id(inp) in computed or _constant(inp) or rank_of(inp) == 0:
                continue
            if node.op_type not in _ELEMENTWISE_MASKS or i not in _ELEMENTWISE_MASKS[node.op_type]:
                raise UnsupportedError(refusal(
                    site, parts, f"its relative position bias meets another tensor at {node.op_type} node {node.name!r}, "
                    "which lora_fx cannot give T prefix columns"))
            if static_dim(inp, -1) != 1:
                # Where's condition and And/Or operands are boolean masks: True shows the prefix; added ones are additive.
                fill = np.array([True]) if node.op_type in ("Where", "And", "Or") else None
                pads.append((node, i, fill))
    return {"sub": sub, "pads": pads}


def _check_mask(site: Site, parts: Any, mask: ir.Value | None, what: str) -> None:
    if mask is None:
        return
    _refuse_relative_bias(site, parts, mask, what)
    if mask.dtype is None:
        raise UnsupportedError(refusal(site, parts, f"the dtype of its {what} is unknown, so the visible value of the "
                                        "T prefix columns (True, 1 or 0.0) is too; run shape inference first"))
    if static_dim(mask, -1) == 1:
        raise UnsupportedError(refusal(site, parts, f"its {what} broadcasts over the key axis (last dim 1); expand it "
                                        "to the key length before inserting a prefix"))


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


def _score_chain(scores: ir.Node, seen: list[ir.Node]) -> list[ir.Node]:
    """The nodes of ``seen`` that read the scores, directly or through each other. The search back from the
    Softmax also meets the mask's own nodes (``Where``/``Expand`` of an eager attention's ``scores * s + mask``,
    found at the depth of the ``Mul``); those are not between the scores and the Softmax."""
    among = {id(n) for n in seen}
    chain: set[int] = set()
    frontier = [scores]
    while frontier:
        for out in frontier.pop().outputs:
            for user, _ in out.uses():
                if id(user) in among and id(user) not in chain:
                    chain.add(id(user))
                    frontier.append(user)
    return [n for n in seen if id(n) in chain]


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
                return node, _score_chain(node, path)
            path.append(node)
            nxt.extend(i for i in node.inputs if i is not None and const_tensor(i) is None)
        frontier = nxt
    raise UnsupportedError(f"softmax {softmax.name!r}: no MatMul(q, kᵀ) found before it")


def _grow_key_axis(scores: ir.Node, sink: ir.Node, T: int) -> None:
    """The scores and probabilities (every value from the scores MatMul to the ``MatMul(·, v)``) have T more keys
    now; a static key length the exporter recorded (fixed-size inputs: ViT's patches) would contradict that,
    and ONNX Runtime refuses a model whose shapes disagree. Outputs of the key-side Mul likewise."""
    frontier, seen = [scores], {id(sink)}
    while frontier:
        node = frontier.pop()
        for out in node.outputs:
            shape = out.shape
            if shape is not None and len(shape) and isinstance(shape[-1], int):
                out.shape = ir.Shape([*shape[:-1], shape[-1] + T])
            for user, _ in out.uses():
                if id(user) not in seen and not is_inserted(user):
                    seen.add(id(user))
                    frontier.append(user)


def _check_decomposed(site: Site, parts: Any, graph: ir.Graph) -> dict[int, dict[str, Any]]:
    """The plan of each score term carrying a relative position bias, by the term's id."""
    scores, path = _scores_of(parts.node)
    on_path = {id(n) for n in path} | {id(scores)}
    plans = {}
    for node in path:
        if node.op_type == "Add":
            for inp in node.inputs[:2]:
                src = inp.producer() if inp is not None else None
                if inp is not None and (src is None or id(src) not in on_path) and relative_position_bias(inp) is not None:
                    plans[id(inp)] = _relative_bias_plan(site, parts, inp)
    return plans


def _rewrite_decomposed(graph: ir.Graph, site: Site, parts: Any, T: int, values: tuple[ir.Value, ir.Value], facts: Any) -> None:
    kv, hd, heads = parts.kv_heads, parts.head_dim, parts.num_heads
    softmax = parts.node
    scores, path = _scores_of(softmax)
    sink = next(u for u in _prob_users(softmax))
    tag = f"{site.name}/prefix"
    # The graph repeats K and V to every query head (repeat_kv) when heads != kv; the prefix likewise.
    reps = heads // kv if heads != kv else 1
    # K: scores = MatMul(q, [Mul](kᵀ, s)); the prefix joins kᵀ on its last axis, before the scale.
    kt_consumer, kt_index, kt = _key_input(scores, sink, T)
    nodes: list[ir.Node] = []
    pk_b = batched(nodes, values[0], kv, reps, T, hd, kt, "bnhs", f"{tag}/key")
    new_kt = emit(nodes, "Concat", [pk_b, kt], f"{tag}/key/concat", axis=-1)
    graph.insert_before(kt_consumer, nodes)
    kt_consumer.replace_input_with(kt_index, new_kt)
    # V: MatMul(p, v) with v [B, H, S, D]: the prefix joins on the sequence axis.
    v = sink.inputs[1]
    nodes = []
    pv_b = batched(nodes, values[1], kv, reps, T, hd, v, "bnsh", f"{tag}/value")
    new_v = emit(nodes, "Concat", [pv_b, v], f"{tag}/value/concat", axis=2)
    graph.insert_before(sink, nodes)
    sink.replace_input_with(1, new_v)
    # The additive mask gains T zero (visible) columns in front.
    on_path = {id(n) for n in path} | {id(scores)}
    masks = 0  # a model may add a position bias and a mask in two Adds: node names must stay unique
    for node in path:
        if node.op_type != "Add":
            continue
        for i, inp in enumerate(node.inputs[:2]):
            src = inp.producer() if inp is not None else None
            if inp is None or (src is not None and id(src) in on_path) or const_tensor(inp) is not None:
                continue
            if id(inp) in facts:
                # T5: the relative position bias (with the mask an SDPA export merges in) computed again for the T
                # prefix keys at positions 0..T-1 in front, seen from queries at T..T+n-1, as PEFT's cache makes it.
                node.replace_input_with(i, _widened_relative_bias(graph, inp, facts[id(inp)], T))
                _remove_unused(graph, inp)
                continue
            nodes = []
            padded = pad_front(nodes, inp, T, f"{tag}/mask" + (f"_{masks}" if masks else ""))
            masks += 1
            graph.insert_before(node, nodes)
            node.replace_input_with(i, padded)


def _check_onnx_attention(site: Site, parts: Any, graph: ir.Graph) -> dict[str, Any]:
    node = parts.node
    _refuse_cache(site, parts, past=[4, 5], present=[1, 2])
    if len(node.outputs) > 3 and is_used(node.outputs[3]):
        raise UnsupportedError(refusal(site, parts, "its qk_matmul_output is used, and it would gain T columns"))
    windows = [w for w in ("left_window_size", "right_window_size") if node.attributes.get_int(w, -1) >= 0]
    if windows:
        # A window counts keys from the query's position; whether T prefix keys fall out of it is a choice
        # PEFT's KV-cache prefix makes per model, not one this pass can read from the graph.
        raise UnsupportedError(refusal(site, parts, f"it attends over a sliding window ({', '.join(windows)}), "
                                        "which the prefix keys would fall out of"))
    q, k = node.inputs[0], node.inputs[1]
    rank = rank_of(q) or rank_of(k)
    if rank == 4:
        k_heads = static_dim(k, 1)
    elif rank == 3:
        k_heads = node.attributes.get_int("kv_num_heads", 0) or None
    else:
        raise UnsupportedError(refusal(site, parts, "the rank of Q/K (3-D or 4-D) is unknown; run shape inference first"))
    if not k_heads or k_heads % parts.kv_heads:
        raise UnsupportedError(refusal(site, parts, f"K carries {k_heads} heads, not a multiple of the site's "
                                        f"{parts.kv_heads} key/value heads"))
    mask = input_at(node, 3)
    if mask is not None and relative_position_bias(mask) is not None:
        # T5 exported at opset 23: its relative position bias (merged with the mask) is the op's attn_mask.
        return {"rank": rank, "reps": k_heads // parts.kv_heads, "bias": _relative_bias_plan(site, parts, mask)}
    _check_mask(site, parts, mask, "attn_mask")
    return {"rank": rank, "reps": k_heads // parts.kv_heads}


def _rewrite_onnx_attention(graph: ir.Graph, site: Site, parts: Any, T: int, values: tuple[ir.Value, ir.Value],
                            facts: dict[str, Any]) -> None:
    node, tag = parts.node, f"{site.name}/prefix"
    rank, reps = facts["rank"], facts["reps"]
    q, k = node.inputs[0], node.inputs[1]
    nodes: list[ir.Node] = []
    seq_axis = _concat_key_value(nodes, node, parts, values, T, rank, reps, tag)
    mask = input_at(node, 3)
    if mask is not None and "bias" in facts:
        old_mask, mask = mask, _widened_relative_bias(graph, mask, facts["bias"], T)
        node.replace_input_with(3, mask)
        _remove_unused(graph, old_mask)
    elif mask is not None:
        mask = pad_front(nodes, mask, T, f"{tag}/mask", fill=visible_fill(mask.dtype))
    causal = node.attributes.get_int("is_causal", 0) if "is_causal" in node.attributes else 0
    nonpad = input_at(node, 6)
    if nonpad is not None:
        # opset 24: the valid keys per row, padding after them; the prefix adds T valid keys in front. The op
        # aligns is_causal to them (offset nonpad - S), so T more shifts the causal rule by T too: it stays.
        t = emit(nodes, "CastLike", [emit_const(nodes, np.array(T, np.int64), f"{tag}/T"), nonpad], f"{tag}/T_like")
        set_input(node, 6, emit(nodes, "Add", [nonpad, t], f"{tag}/nonpad_kv_seqlen"))
        causal = 0
    if causal:
        # is_causal aligns upper-left (query i sees keys 0..i); with T keys in front it would hide real keys,
        # so the same rule offset by T becomes an explicit mask and the attribute is cleared.
        visible = causal_visible(nodes, q, seq_axis, k, seq_axis, T, f"{tag}/causal")
        if mask is None:
            mask = visible
        elif mask.dtype == ir.DataType.BOOL:
            mask = emit(nodes, "And", [mask, visible], f"{tag}/causal/and")
        else:
            mask = emit(nodes, "Add", [mask, additive_mask(nodes, visible, mask, f"{tag}/causal")], f"{tag}/causal/add")
        node.attributes["is_causal"] = ir.AttrInt64("is_causal", 0)
    graph.insert_before(node, nodes)
    if mask is not None:
        set_input(node, 3, mask)


def _concat_key_value(nodes: list[ir.Node], node: ir.Node, parts: Any, values: tuple[ir.Value, ir.Value], T: int,
                      rank: int, reps: int, tag: str) -> int:
    """Put the batched prefixes in front of ``node``'s key (input 1) and value (input 2), 3-D [B, S, heads*hd] or
    4-D [B, heads, S, hd]; returns the sequence axis."""
    layout, seq_axis = ("bnsh", 2) if rank == 4 else ("bsh", 1)
    for i, which in ((1, "key"), (2, "value")):
        kv_in = node.inputs[i]
        p = batched(nodes, values[i - 1], parts.kv_heads, reps, T, parts.head_dim, kv_in, layout, f"{tag}/{which}")
        node.replace_input_with(i, emit(nodes, "Concat", [p, kv_in], f"{tag}/{which}/concat", axis=seq_axis))
    return seq_axis


def _check_mha(site: Site, parts: Any, graph: ir.Graph) -> dict[str, Any]:
    node = parts.node
    _refuse_cache(site, parts, past=[6, 7, 8, 9], present=[1, 2])
    if len(node.outputs) > 3 and is_used(node.outputs[3]):
        raise UnsupportedError(refusal(site, parts, "its output_qk is used, and it would gain T columns"))
    q, k, v, bias = node.inputs[0], input_at(node, 1), input_at(node, 2), input_at(node, 3)
    if k is None or v is None:
        raise UnsupportedError(refusal(site, parts, "Q, K and V come packed in the query input, so there is no key "
                                        "input to put the prefix in front of; unpack them into query/key/value first"))
    rank = rank_of(k)
    if rank not in (3, 4) or rank_of(v) != rank:
        raise UnsupportedError(refusal(site, parts, f"its key/value are {rank}-D (packed KV or unknown); lora_fx puts "
                                        "prefixes into 3-D [B, S, hidden] or 4-D [B, heads, S, head_dim] keys and values"))
    widths = None
    if bias is not None:
        widths = (static_dim(q, -1), static_dim(k, -1), static_dim(v, -1))
        if rank != 3 or not all(widths):
            raise UnsupportedError(refusal(site, parts, "its packed bias would be added to the prefix too, and the widths "
                                            "of Q/K/V needed to split it out are unknown (or K/V are 4-D)"))
    heads = node.attributes.get_int("num_heads", 0)
    if heads % parts.kv_heads:
        raise UnsupportedError(refusal(site, parts, f"{heads} heads are no multiple of {parts.kv_heads} key/value heads"))
    kpm = input_at(node, 4)
    if kpm is not None and rank_of(kpm) != 2:
        raise UnsupportedError(refusal(site, parts, "its key_padding_mask is not the 2-D [batch, kv_sequence] form (mask "
                                        "index or unknown rank), which is the one that can gain T visible columns"))
    _check_mask(site, parts, kpm, "key_padding_mask")
    _check_mask(site, parts, input_at(node, 5), "attention_bias")
    return {"rank": rank, "reps": heads // parts.kv_heads, "widths": widths}


def _rewrite_mha(graph: ir.Graph, site: Site, parts: Any, T: int, values: tuple[ir.Value, ir.Value],
                 facts: dict[str, Any]) -> None:
    node, tag = parts.node, f"{site.name}/prefix"
    rank, reps = facts["rank"], facts["reps"]
    nodes: list[ir.Node] = []
    bias = input_at(node, 3)
    if bias is not None:
        # The op adds its packed [q | k | v] bias to the whole key and value, prefix included; PEFT's prefix takes
        # no bias, so the bias goes onto the real Q, K, V by explicit Adds and leaves the op.
        start = 0
        for i, (which, width) in enumerate(zip(("query", "key", "value"), facts["widths"])):
            part = emit(nodes, "Slice", [bias, emit_const(nodes, np.array([start], np.int64), f"{tag}/bias/{which}/start"),
                                        emit_const(nodes, np.array([start + width], np.int64), f"{tag}/bias/{which}/end")],
                       f"{tag}/bias/{which}")
            node.replace_input_with(i, emit(nodes, "Add", [node.inputs[i], part], f"{tag}/bias/{which}/add"))
            start += width
        node.replace_input_with(3, None)
    q, k = node.inputs[0], node.inputs[1]
    seq_axis = _concat_key_value(nodes, node, parts, values, T, rank, reps, tag)
    kpm = input_at(node, 4)
    if kpm is not None:
        node.replace_input_with(4, pad_front(nodes, kpm, T, f"{tag}/key_padding_mask", fill=visible_fill(kpm.dtype)))
    attn_bias = input_at(node, 5)
    if attn_bias is not None:
        attn_bias = pad_front(nodes, attn_bias, T, f"{tag}/attention_bias")
    if node.attributes.get_int("unidirectional", 0) if "unidirectional" in node.attributes else 0:
        # Without a past input the op's causal rule is upper-left (query i sees keys 0..i); the prefix would hide the
        # real keys behind it, so the rule offset by T becomes an explicit additive bias.
        visible = causal_visible(nodes, q, 1, k, seq_axis, T, f"{tag}/causal")
        additive = additive_mask(nodes, visible, q, f"{tag}/causal")
        # attention_bias is 4-D [B or 1, N or 1, S_q, S_kv]
        additive = emit(nodes, "Unsqueeze", [additive, emit_const(nodes, np.array([0, 1], np.int64), f"{tag}/causal/axes")],
                       f"{tag}/causal/bias")
        attn_bias = additive if attn_bias is None else emit(nodes, "Add", [attn_bias, additive], f"{tag}/causal/add")
        node.attributes["unidirectional"] = ir.AttrInt64("unidirectional", 0)
    graph.insert_before(node, nodes)
    if attn_bias is not None:
        set_input(node, 5, attn_bias)


def _check_gqa(site: Site, parts: Any, graph: ir.Graph) -> None:
    node = parts.node
    _refuse_cache(site, parts, past=[3, 4], present=[1, 2])
    if input_at(node, 5) is None or input_at(node, 6) is None:
        raise UnsupportedError(refusal(site, parts, "seqlens_k or total_sequence_length is missing"))
    if input_at(node, 9) is not None:
        raise UnsupportedError(refusal(site, parts, "it takes explicit position_ids, which lora_fx does not offset by T "
                                        "here; let the op derive positions (drop the input) or offset them before the op"))
    _check_mask(site, parts, input_at(node, 10), "attention_bias")
    return None


def _rewrite_gqa(graph: ir.Graph, site: Site, parts: Any, T: int, values: tuple[ir.Value, ir.Value], facts: Any) -> None:
    node, tag = parts.node, f"{site.name}/prefix"
    nodes: list[ir.Node] = []
    ref = node.inputs[0]  # the query: batch size
    # The op appends the new keys after `past`: the prefix is a T-token cache, [B, kv_heads, T, head_dim].
    for i, which in ((3, "key"), (4, "value")):
        set_input(node, i, batched(nodes, values[i - 3], parts.kv_heads, 1, T, parts.head_dim, ref, "bnsh",
                                     f"{tag}/past_{which}"))
    total, seqlens = node.inputs[6], node.inputs[5]
    t = emit(nodes, "CastLike", [emit_const(nodes, np.array(T, np.int64), f"{tag}/T"), total], f"{tag}/T_like")
    new_total = emit(nodes, "Add", [total, t], f"{tag}/total_sequence_length")
    # The op reads row b as past = seqlens_k[b] + 1 - S cached tokens followed by S new ones (positions past..past+S-1).
    # Offsetting a right-padded row's seqlens_k by T would shorten its past below T; every row gets T+S-1 instead: the
    # padded tail is hidden from real queries by the causal mask anyway, and real tokens sit at T..T+n-1.
    one = emit(nodes, "CastLike", [emit_const(nodes, np.array(1, np.int64), f"{tag}/one"), total], f"{tag}/one_like")
    last = emit(nodes, "Sub", [new_total, one], f"{tag}/last")
    last = emit(nodes, "CastLike", [last, seqlens], f"{tag}/last_like")
    new_seqlens = emit(nodes, "Expand", [last, emit(nodes, "Shape", [seqlens], f"{tag}/seqlens_shape")], f"{tag}/seqlens_k")
    node.replace_input_with(6, new_total)
    node.replace_input_with(5, new_seqlens)
    attn_bias = input_at(node, 10)
    if attn_bias is not None:
        node.replace_input_with(10, pad_front(nodes, attn_bias, T, f"{tag}/attention_bias"))
    graph.insert_before(node, nodes)


def _check_com_attention(site: Site, parts: Any, graph: ir.Graph) -> dict[str, Any]:
    node = parts.node
    _refuse_cache(site, parts, past=[4, 6], present=[1])
    w = const_tensor(input_at(node, 1))
    sizes = list(node.attributes.get_ints("qkv_hidden_sizes", [])) if "qkv_hidden_sizes" in node.attributes else []
    hidden = parts.num_heads * parts.head_dim
    if w is None or len(w.shape) != 2 or int(w.shape[1]) != 3 * hidden or any(n != hidden for n in sizes):
        raise UnsupportedError(refusal(site, parts, "its packed QKV weight is not a constant [hidden, 3*hidden] of equal "
                                        "q/k/v widths, so it cannot be unpacked into MultiHeadAttention's query/key/value"))
    if input_at(node, 3) is not None:
        raise UnsupportedError(refusal(site, parts, "it takes a mask_index, which has no padded form for keys that include "
                                        "a prefix; give the op an additive attention_bias instead"))
    if node.attributes.get_int("do_rotary", 0) if "do_rotary" in node.attributes else 0:
        raise UnsupportedError(refusal(site, parts, "it applies rotary embedding inside the op"))
    _check_mask(site, parts, input_at(node, 5), "attention_bias")
    return {"rank": 3, "reps": 1, "widths": (hidden, hidden, hidden)}


def _rewrite_com_attention(graph: ir.Graph, site: Site, parts: Any, T: int, values: tuple[ir.Value, ir.Value],
                           facts: dict[str, Any]) -> None:
    """com.microsoft.Attention → MatMul + Split + MultiHeadAttention (same bias, attention_bias and attributes), then
    MultiHeadAttention's rule. The op itself cannot take the prefix: its only way in, `past`, ORT refuses together
    with attention_bias, and its projections happen inside."""
    node, tag = parts.node, f"{site.name}/prefix/unpacked"
    nodes: list[ir.Node] = []
    qkv = emit(nodes, "MatMul", [node.inputs[0], node.inputs[1]], f"{tag}/qkv")
    hidden = facts["widths"][0]
    split = ir.node("Split", [qkv, emit_const(nodes, np.array([hidden] * 3, np.int64), f"{tag}/sizes")], attributes={"axis": -1},
                    num_outputs=3, name=f"{tag}/split", metadata_props={INSERTED: "prefix"})
    for out, which in zip(split.outputs, ("q", "k", "v")):
        out.name = f"{tag}/{which}"
    nodes.append(split)
    keep = {k: v for k, v in node.attributes.items() if k in ("num_heads", "scale", "unidirectional", "mask_filter_value")}
    mha = ir.node("MultiHeadAttention", [*split.outputs, input_at(node, 2), None, input_at(node, 5)], attributes=keep,
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


# ---- heads merged into the batch axis (Bloom) -------------------------------------------------------------

_WIDENED = "lora_fx.prefix.widened_key_bias"  # graph.meta: id(original value) -> its copy over T + k keys
_KEY_BIAS_SEARCH = 400  # nodes walked back from a score bias looking for the CumSum that numbers its keys


def _ints(value: ir.Value | None) -> list[int] | None:
    """The integers of a constant: an initializer, or a ``Constant`` node's ``value``/``value_ints``/``value_int``."""
    t = const_tensor(value)
    if t is not None:
        return [int(v) for v in np.asarray(t.numpy()).reshape(-1)]
    node = value.producer() if value is not None else None
    if node is not None and node.op_type == "Constant":
        if "value_ints" in node.attributes:
            return [int(v) for v in node.attributes.get_ints("value_ints")]
        if "value_int" in node.attributes:
            return [node.attributes.get_int("value_int")]
    return None


def _last_target_entry(shape: ir.Value) -> int | None:
    """The last entry of a Reshape target (a constant or a Concat of pieces), None where the graph computes it."""
    whole = _ints(shape)
    if whole is not None:
        return whole[-1] if whole else None
    node = shape.producer()
    if node is not None and node.op_type == "Concat" and node.inputs:
        piece = _ints(node.inputs[-1])
        return piece[-1] if piece else None
    return None


def _constant(value: ir.Value) -> bool:
    """A constant, or one cast like another tensor (an unoptimized export's ``CastLike(scale, scores)``)."""
    node = value.producer()
    return const_tensor(value) is not None or (node is not None and node.op_type in ("Cast", "CastLike")
                                               and const_tensor(node.inputs[0]) is not None)


def _ancestor_nodes(value: ir.Value, budget: int) -> list[ir.Node]:
    seen: dict[int, ir.Node] = {}
    stack = [value]
    while stack and len(seen) < budget:
        v = stack.pop()
        node = v.producer() if v is not None else None
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(node.inputs)
    return list(seen.values())


def _sequence_length(value: ir.Value | None) -> bool:
    """Whether ``value`` is a tensor's size on axis 1 (the sequence) read from its shape: ``Shape(x)[1]`` as
    ``Shape(start=1, end=2)``, ``Gather(Shape(x), 1)`` or ``Slice(Shape(x), 1, 2)``, through casts and reshapes."""
    for _ in range(6):
        node = value.producer() if value is not None else None
        if node is None:
            return False
        if node.op_type == "Shape":
            return node.attributes.get_int("start", 0) == 1 and node.attributes.get_int("end", 0) == 2
        if node.op_type in ("Gather", "Slice") and node.inputs[0] is not None and node.inputs[0].producer() is not None \
                and node.inputs[0].producer().op_type == "Shape" and "start" not in node.inputs[0].producer().attributes:
            if node.op_type == "Gather":
                return _ints(node.inputs[1]) == [1]
            return _ints(node.inputs[1]) == [1] and _ints(node.inputs[2]) == [2]
        if node.op_type not in ("Cast", "Squeeze", "Unsqueeze", "Reshape", "Identity"):
            return False
        value = node.inputs[0]
    return False


def _key_bias_root(site: Site, parts: Any, bias: ir.Value) -> tuple[ir.Value, bool]:
    """Where a score bias numbers its keys (Bloom's ALiBi): ``(the [batch, keys] mask its CumSum counts, True)``
    (``slope * (cumsum(mask) - 1) * mask``) or, exported without a mask, ``(the Range(0, keys) it counts, False)``.
    Refuses a bias lora_fx cannot recompute for T prefix keys."""
    ancestors = _ancestor_nodes(bias, _KEY_BIAS_SEARCH)
    cumsums = [n for n in ancestors if n.op_type == "CumSum" and n.domain in ("", "ai.onnx")]
    ranges = [n for n in ancestors if n.op_type == "Range" and n.domain in ("", "ai.onnx")]
    if len(cumsums) == 1:
        root = cumsums[0].inputs[0]
        while root is not None and root.producer() is not None and root.producer().op_type in ("Cast", "Identity"):
            root = root.producer().inputs[0]
        if (root is not None and _ints(cumsums[0].inputs[1]) in ([-1], [1]) and rank_of(root) == 2
                and not any(cumsums[0].attributes.get_int(a, 0) for a in ("exclusive", "reverse"))):
            return root, True
    elif (not cumsums and len(ranges) == 1 and _ints(ranges[0].inputs[0]) == [0] and _ints(ranges[0].inputs[2]) == [1]
          and _sequence_length(ranges[0].inputs[1])):
        return ranges[0].outputs[0], False
    raise UnsupportedError(refusal(
        site, parts, "it adds a bias over its keys to the scores that lora_fx cannot recompute for the prefix keys (neither "
        "a CumSum of a [batch, keys] mask nor a single Range(0, keys) numbers them, as in Bloom's ALiBi); PEFT's cache "
        "gives prefix keys a bias of their own. Use LoRA (LoraConfig) on this model, or apply the PrefixConfig to the "
        "torch model: gm = lora_fx.capture(model, kwargs=...); lora_fx.apply(gm, PrefixConfig(...)); "
        "lora_fx.export_onnx(gm, path, kwargs=..., mode='adapters')"))


def _check_merged(site: Site, parts: Any, graph: ir.Graph) -> dict[str, Any]:
    softmax = parts.node
    scores, chain = _scores_of(softmax)
    sink = parts.output.producer()
    if scores.inputs[0] is not parts.q or sink is None or sink.op_type != "MatMul":
        raise UnsupportedError(refusal(site, parts, "its score MatMul(q, kᵀ) or its MatMul(·, v) is not where "
                                        "find_sites saw it"))
    # Nodes between the probabilities and MatMul(·, v) (the Reshape back to [batch*heads, q, k]) count too.
    forward, value = [], softmax.outputs[0]
    while value is not sink.inputs[0]:
        user = next(u for u, _ in value.uses() if u.op_type != "IsNaN")
        forward.append(user)
        value = user.outputs[0]
    views = [n for n in chain + forward if n.op_type == "Reshape"]
    for view in views:
        if _last_target_entry(view.inputs[1]) != -1:
            # A view naming the key length (rather than -1) would contradict the T + k keys after the prefix.
            raise UnsupportedError(refusal(site, parts, f"its Reshape {view.name!r} of the scores does not leave the key "
                                            "axis to be inferred (-1), so it cannot take T more keys"))
    heads_view = next(v for v in views if v in chain)
    after_view = {id(n) for n in _score_chain(heads_view, chain)}
    on_path = {id(n) for n in chain} | {id(scores)}
    biases, masks = [], []
    for node in chain:
        terms = [(i, t) for i, t in enumerate(node.inputs) if t is not None and not _constant(t)
                 and (t.producer() is None or id(t.producer()) not in on_path)]
        if node.op_type in ("Reshape", "Cast", "Identity") or not terms:
            continue
        if node.op_type != "Add" or len(terms) != 1:
            raise UnsupportedError(refusal(site, parts, f"its scores meet another tensor at {node.op_type} node "
                                            f"{node.name!r}, which lora_fx cannot give T prefix columns"))
        i, term = terms[0]
        _refuse_relative_bias(site, parts, term, "score bias")
        if id(node) in after_view:
            masks.append((node, i))  # [batch, 1 or heads, q, k]: the mask, T visible columns in front
        elif static_dim(term, -1) != 1:
            biases.append((node, i, *_key_bias_root(site, parts, term)))  # [batch*heads, 1 or q, k]: ALiBi
    return {"scores": scores, "sink": sink, "biases": biases, "masks": masks}


def _widened_key_bias(graph: ir.Graph, bias: ir.Value, root: ir.Value, is_mask: bool, T: int) -> ir.Value:
    """``bias`` computed again for T prefix keys in front, as the model computes it under PEFT's cache of T prefixes:
    from ``root``, the model's ``[batch, keys]`` mask, with T ones in front (ALiBi: prefix key t gets ``slope * t``,
    real key j ``slope * (T + cumsum_j - 1) * mask_j``), or from the ``Range(0, keys)`` lengthened by T (no mask).
    The nodes from ``root`` to ``bias`` are copied once per graph (layers share them), sizes read from the mask
    following it."""
    # Keyed by id, holding the original too: it stays alive, so no later value takes its id.
    memo: dict[int, tuple[ir.Value, ir.Value]] = graph.meta.setdefault(_WIDENED, {})

    def widened(value: ir.Value | None) -> ir.Value | None:
        entry = memo.get(id(value)) if value is not None else None
        return entry[1] if entry is not None else None

    if widened(root) is None:
        nodes: list[ir.Node] = []
        if is_mask:
            tag = f"{root.name}/prefix_ones"
            lead = emit(nodes, "Shape", [root], f"{tag}/batch", start=0, end=1)
            shape = emit(nodes, "Concat", [lead, emit_const(nodes, np.array([T], np.int64), f"{tag}/T")], f"{tag}/shape", axis=0)
            if root.dtype is not None:
                ones = emit(nodes, "ConstantOfShape", [shape], tag, value=ir.tensor(np.ones(1, root.dtype.numpy())))
            else:
                ones = emit(nodes, "ConstantOfShape", [shape], f"{tag}/i64", value=ir.tensor(np.ones(1, np.int64)))
                ones = emit(nodes, "CastLike", [ones, root], tag)
            new = emit(nodes, "Concat", [ones, root], f"{root.name}/prefix_padded", axis=-1)
        else:
            start, limit, delta = root.producer().inputs
            tag = f"{root.name}/prefix_longer"
            t = emit(nodes, "CastLike", [emit_const(nodes, np.array(T, np.int64), f"{tag}/T"), limit], f"{tag}/T_like")
            new = emit(nodes, "Range", [start, emit(nodes, "Add", [limit, t], f"{tag}/limit"), delta], tag)
        if root.dtype is not None:
            new.dtype = root.dtype
        producer = root.producer()
        if producer is None:
            graph.insert_before(next(iter(graph)), nodes)
        else:
            graph.insert_after(producer, nodes)
        memo[id(root)] = (root, new)
    return _copy_widened(graph, bias, memo, T, {})


def _copy_widened(graph: ir.Graph, bias: ir.Value, memo: dict[int, tuple[ir.Value, ir.Value]], T: int,
                  pads: dict[tuple[int, int], np.ndarray | None]) -> ir.Value:
    """The nodes between a widened root (in ``memo``) and ``bias`` copied onto the widened values, once per graph;
    input ``i`` of a copied ``node`` listed in ``pads`` as ``(id(node), i)`` (a mask the bias meets) gains T visible
    columns in front (the fill, or additive zeros); other inputs not computed from the root are shared as they are."""
    def widened(value: ir.Value | None) -> ir.Value | None:
        entry = memo.get(id(value)) if value is not None else None
        return entry[1] if entry is not None else None

    chain = {id(n) for n in _ancestor_nodes(bias, 1 << 30)}
    for node in list(graph):
        if id(node) not in chain or widened(node.outputs[0]) is not None or is_inserted(node):
            continue
        if not any(widened(i) is not None for i in node.inputs):
            continue  # not computed from the root: shared as it is
        inputs, nodes = [], []
        for i, value in enumerate(node.inputs):
            if widened(value) is not None:
                inputs.append(widened(value))
            elif (id(node), i) in pads:
                inputs.append(pad_front(nodes, value, T, f"{node.name}/prefix_widened/input_{i}", fill=pads[(id(node), i)]))
            else:
                inputs.append(value)
        copy = ir.Node(node.domain, node.op_type, inputs,
                       [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()], num_outputs=len(node.outputs),
                       version=node.version, overload=node.overload, name=f"{node.name}/prefix_widened",
                       metadata_props={INSERTED: "prefix"})
        for old, new in zip(node.outputs, copy.outputs):
            # The copy has T more keys: the recorded shapes would contradict it.
            new.name = f"{old.name}/prefix_widened"
            if old.dtype is not None:
                new.dtype = old.dtype
            memo[id(old)] = (old, new)
        graph.insert_after(node, [*nodes, copy])
    return widened(bias)


def _widened_relative_bias(graph: ir.Graph, term: ir.Value, plan: dict[str, Any], T: int) -> ir.Value:
    """``term`` (a T5 relative position bias, merged with a mask or not) over T prefix keys in front: the relative
    positions ``memory - context`` gain T columns ``(t - T) - context`` for prefix key t (keys at 0..T-1, queries
    at T + context; the real keys' ``j - i`` stay), the bucketing and the table lookup run on them as the model's
    own nodes do (copied once per graph: layers share them), and the masks the bias meets gain T visible columns."""
    memo: dict[int, tuple[ir.Value, ir.Value]] = graph.meta.setdefault(_WIDENED, {})
    sub = plan["sub"]
    rel = sub.outputs[0]
    if id(rel) not in memo:
        nodes: list[ir.Node] = []
        tag = f"{sub.name}/prefix"
        memory, context = sub.inputs[0], sub.inputs[1]
        # In the positions' own dtype (T5 numbers them as int64, which an export without types leaves unsaid): no
        # CastLike, which an opset-14 file would get lowered to a Cast to the attention's float dtype.
        dtype = (memory.dtype or context.dtype or ir.DataType.INT64).numpy()
        keys = emit_const(nodes, np.arange(-T, 0).astype(dtype).reshape(1, T), f"{tag}/prefix_keys")
        front = emit(nodes, "Sub", [keys, context], f"{tag}/prefix_positions")
        new = emit(nodes, "Concat", [front, rel], f"{tag}/positions", axis=-1)
        if rel.dtype is not None:
            new.dtype = rel.dtype
        graph.insert_after(sub, nodes)
        memo[id(rel)] = (rel, new)
    return _copy_widened(graph, term, memo, T, {(id(node), i): fill for node, i, fill in plan["pads"]})


def _remove_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Remove the nodes ``value`` was computed from that nothing reads any longer (the original ALiBi, once every
    layer reads its widened copy)."""
    chain = {id(n) for n in _ancestor_nodes(value, 1 << 30)}
    for node in reversed([n for n in graph if id(n) in chain]):
        if not any(is_used(o) for o in node.outputs):
            graph.remove(node, safe=True)


def _key_input(scores: ir.Node, sink: ir.Node, T: int) -> tuple[ir.Node, int, ir.Value]:
    """Where kᵀ enters ``scores = MatMul(q, [Mul|Div](kᵀ, s))``: the node and input index the prefixed kᵀ replaces
    (the scale's when kᵀ is scaled before the MatMul) and kᵀ itself; the key axis of what lies between grows by T."""
    consumer, index = scores, 1
    producer = scores.inputs[1].producer()
    if producer is not None and producer.op_type in ("Mul", "Div") and const_tensor(producer.inputs[1]) is not None:
        consumer, index = producer, 0
    _grow_key_axis(scores, sink, T)
    if consumer is not scores:
        _grow_key_axis(consumer, scores, T)
    return consumer, index, consumer.inputs[index]


def _rewrite_merged(graph: ir.Graph, site: Site, parts: Any, T: int, values: tuple[ir.Value, ir.Value],
                    facts: dict[str, Any]) -> None:
    heads, tag = parts.num_heads, f"{site.name}/prefix"
    scores, sink = facts["scores"], facts["sink"]
    # K: scores = MatMul(q, [Mul](kᵀ, s)) on [batch*heads, hd, k]; the prefix joins kᵀ on its last axis, before a scale.
    kt_consumer, kt_index, kt = _key_input(scores, sink, T)
    nodes: list[ir.Node] = []
    pk = merged_batched(nodes, values[0], heads, kt, True, f"{tag}/key")
    new_kt = emit(nodes, "Concat", [pk, kt], f"{tag}/key/concat", axis=-1)
    graph.insert_before(kt_consumer, nodes)
    kt_consumer.replace_input_with(kt_index, new_kt)
    # V: MatMul(p, v) with v [batch*heads, k, hd]: the prefix joins on the key axis.
    v, nodes = sink.inputs[1], []
    pv = merged_batched(nodes, values[1], heads, v, False, f"{tag}/value")
    new_v = emit(nodes, "Concat", [pv, v], f"{tag}/value/concat", axis=1)
    graph.insert_before(sink, nodes)
    sink.replace_input_with(1, new_v)
    for n, (node, i) in enumerate(facts["masks"]):
        nodes = []
        padded = pad_front(nodes, node.inputs[i], T, f"{tag}/mask" + (f"_{n}" if n else ""))
        graph.insert_before(node, nodes)
        node.replace_input_with(i, padded)
    for node, i, root, is_mask in facts["biases"]:
        old = node.inputs[i]
        node.replace_input_with(i, _widened_key_bias(graph, old, root, is_mask, T))
        _remove_unused(graph, old)


def forget_widened(graph: ir.Graph) -> None:
    """Drop the pass's record of the widened key biases (in-memory only) once every site is rewritten."""
    graph.meta.pop(_WIDENED, None)


FORMS = {
    "decomposed": (_check_decomposed, _rewrite_decomposed),
    "Attention": (_check_onnx_attention, _rewrite_onnx_attention),
    f"{MS}.MultiHeadAttention": (_check_mha, _rewrite_mha),
    f"{MS}.GroupQueryAttention": (_check_gqa, _rewrite_gqa),
    f"{MS}.Attention": (_check_com_attention, _rewrite_com_attention),
    "merged_heads": (_check_merged, _rewrite_merged),
}
