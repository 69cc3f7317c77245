"""Insert learned key/value prefixes (prefix-tuning) at the attention sites of an ONNX model.

The same job as ``passes/fx/insert_prefix.py`` on an ``onnx_ir.Model``: T learned keys and values
per attention site are placed in front of the site's K and V, the mask gains T visible columns, a
causal mask is offset by T (every query sees the T prefix tokens), and the real tokens' positions
move to ``T .. T+n-1`` (as PEFT's KV-cache prefix does), so the rewritten file computes what the
FX-rewritten model and PEFT compute. Prefix keys get no rotary embedding: they join K after it.

How the prefix enters each attention form, and which sites are refused, is in
``prefix_forms``; the graph-building blocks are in ``prefix_nodes``; moving the real tokens'
positions by T is ``prefix_positions``. This module is the pass: it validates every site first,
then rewrites them and records the prefixes.

Encoder-decoder models (BART, Marian, Pegasus, mBART, T5; roles read from the graph by ``seq2seq_roles``:
a cross-attention projects its keys from the encoder's output) follow PEFT's SEQ_2_SEQ_LM: only the
decoder's self-attention takes prefixes, decoder layer l reads block ``2 l mod num_layers`` of PEFT's
``prompt_embeddings`` (sites reading one block share one initializer, as ``lora_fx.export_onnx`` writes
them), and only the decoder's positions move. Encoder and cross-attention sites named in
``target_modules`` are refused. T5's relative position bias (computed once, shared by the decoder layers) is
computed again over the T prefix keys by ``prefix_forms``, as PEFT's cache makes T5 compute it; a model with such a
bias and no encoder-decoder roles (a T5 encoder alone), which PEFT never prefixes, is refused.

ONNX layout, read by export and ``fold_lora`` (which refuses to fold prefixes):

* initializers ``<site>.prefix_key`` / ``<site>.prefix_value`` ``[kv_heads, T, head_dim]`` in the
  model's dtype;
* ``metadata_props["lora_fx.prefix"]``: JSON ``{"num_virtual_tokens": T, "sites": {site: {"kv_heads",
  "head_dim", "key", "value"}}}`` (``key``/``value`` are the initializer names; an encoder-decoder's
  record adds each site's ``block``, ``num_blocks`` and ``num_transformer_submodules: 2``) and
  ``metadata_props["lora_fx.prefix_config"]``: the PrefixConfig JSON.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Sequence

import onnx_ir as ir
import torch

from lora_fx.config import PrefixConfig
from lora_fx.errors import AdapterError, ConfigError, UnsupportedError
from lora_fx.passes.fx.insert_prefix import _check_submodules
from lora_fx.passes.onnx.find_sites import _projection_node, attention_parts, const_tensor, find_sites, is_inserted, linear_parts, site_name
from lora_fx.passes.onnx.prefix_forms import FORMS, carries_relative_position_bias, forget_widened, refusal
from lora_fx.passes.onnx.prefix_nodes import MIN_OPSET, lower_to_opset
from lora_fx.passes.onnx.prefix_positions import offset_positions, position_sources
from lora_fx.passes.result import PassResult
from lora_fx.sites import Site, SiteKind

PREFIX_KEY = "lora_fx.prefix"


PREFIX_CONFIG_KEY = "lora_fx.prefix_config"


def prefix_names(site: str) -> tuple[str, str]:
    return f"{site}.prefix_key", f"{site}.prefix_value"


def prefix_metadata(model: ir.Model) -> dict[str, Any]:
    text = model.metadata_props.get(PREFIX_KEY)
    return json.loads(text) if text else {}


def _ancestors(values: Sequence[ir.Value]) -> set[int]:
    """ids of every value the given values are computed from (themselves included)."""
    seen: set[int] = set()
    stack = list(values)
    while stack:
        value = stack.pop()
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        node = value.producer()
        if node is not None:
            stack.extend(node.inputs)
    return seen


@dataclass
class Seq2SeqRoles:
    """The attention sites of an encoder-decoder graph by role (each in graph order) and ``encoder_values``, the
    ids of every value the encoder's output is computed from (its positions among them)."""

    encoder: list[Site]
    decoder: list[Site]
    cross: list[Site]
    encoder_values: set[int]


def seq2seq_roles(sites: Sequence[Site]) -> Seq2SeqRoles | None:
    """The roles of an encoder-decoder model's attention sites, or None for a model without cross-attention.

    A cross-attention projects its keys from another activation than its queries, one its queries do not
    depend on (the encoder's output); the encoder's sites are those that output depends on, the decoder's
    self-attention the rest."""
    attention = [s for s in sites if s.kind is SiteKind.ATTENTION and isinstance(s.handle, ir.Node)]
    sources = {}
    for s in attention:
        parts = attention_parts(s.handle)
        if parts is None:
            continue
        q, k = (_projection_node(v) for v in (parts.q, parts.k))
        qp, kp = (linear_parts(n) if n is not None else None for n in (q, k))
        if qp is not None and kp is not None and qp.x is not kp.x:
            sources[id(s)] = (qp.x, kp.x)
    if not sources:
        return None
    encoder_values = _ancestors([k for _, k in sources.values()])
    cross = [s for s in attention if id(s) in sources and id(sources[id(s)][0]) not in encoder_values]
    if not cross:
        return None
    encoder_values = _ancestors([sources[id(s)][1] for s in cross])
    crossing = {id(s) for s in cross}
    rest = [s for s in attention if id(s) not in crossing]
    in_encoder = {id(s) for s in rest if any(id(o) in encoder_values for o in s.handle.outputs)}
    encoder = [s for s in rest if id(s) in in_encoder]
    decoder = [s for s in rest if id(s) not in in_encoder]
    return Seq2SeqRoles(encoder, decoder, cross, encoder_values)


def encoder_decoder_roles(sites: Sequence[Site]) -> tuple[list[Site], list[Site]] | None:
    """(cross-attention sites, encoder self-attention sites) of an encoder-decoder model, or None."""
    roles = seq2seq_roles(sites)
    return None if roles is None else (roles.cross, roles.encoder)


def seq2seq_blocks(roles: Seq2SeqRoles, chosen: Sequence[Site]) -> dict[str, int]:
    """The block of PEFT's SEQ_2_SEQ_LM ``prompt_embeddings`` each chosen site reads; refuses, naming the site
    and its role, a site PEFT's prefix never reaches (the encoder's self-attention, a cross-attention)."""
    from lora_fx.passes.fx.insert_prefix import seq2seq_layer_blocks

    # By name: the pass finds the sites again, so the Site objects differ from the chosen ones.
    decoder = {s.name for s in roles.decoder}
    others = [s for s in chosen if s.name not in decoder]
    if others:
        role = "a cross-attention" if any(s.name == others[0].name for s in roles.cross) else "the encoder's self-attention"
        raise UnsupportedError(
            f"attention site {others[0].name} cannot take a prefix: it is {role} in an encoder-decoder model, and PEFT's "
            "prefix-tuning (SEQ_2_SEQ_LM) reaches only the decoder's self-attention (transformers drops the cache in the "
            "encoder and PEFT empties the cross-attention cache), so there is no PEFT behaviour to match there. Select "
            f"decoder self-attention sites only ({', '.join(s.name for s in roles.decoder) or 'none found'}), or use LoRA "
            "(LoraConfig) on the encoder"
        )
    return seq2seq_layer_blocks([s.name for s in roles.encoder], [s.name for s in roles.decoder], [s.name for s in chosen])


_MERGED_BACK = {"Add", "Mul", "Div", "Sub", "Where", "Cast", "Identity", "Reshape"}
_MERGED_FORWARD = {"Reshape", "Cast", "Dropout", "Identity", "Where"}


def _rank(value: ir.Value | None) -> int | None:
    return len(value.shape) if value is not None and value.shape is not None else None


def merged_heads_attention(model: ir.Model) -> list[tuple[str, ir.Node, bool]]:
    """Attention computed with the heads merged into the batch axis (Bloom): ``MatMul`` on ``[batch*heads, ...]``
    operands, reshaped to ``[batch, heads, q, k]`` for the mask and ``Softmax``, reshaped back into ``MatMul(·, v)``,
    that find_sites did not take for an attention site (the head count of that view unreadable). Each as (module
    name, its Softmax, whether a tensor is added to the scores before the reshape: Bloom's ALiBi)."""
    found = []
    for node in model.graph:
        if node.op_type != "Softmax" or node.domain != "" or is_inserted(node) or attention_parts(node) is not None:
            continue
        # (value, a Reshape passed, a non-constant term added before it) back to the score MatMul.
        frontier, scores = [(node.inputs[0], False, False)], None
        for _ in range(8):
            nxt = []
            for value, reshaped, biased in frontier:
                prod = value.producer() if value is not None else None
                if prod is None or prod.domain != "":
                    continue
                if prod.op_type == "MatMul" and _rank(prod.inputs[0]) == 3 and _rank(prod.inputs[1]) == 3:
                    if reshaped:
                        scores = (prod, biased)
                    continue
                if prod.op_type == "Reshape":
                    nxt.append((prod.inputs[0], True, biased))
                elif prod.op_type in _MERGED_BACK:
                    terms = [i for i in prod.inputs if i is not None and const_tensor(i) is None]
                    # Between the MatMul and the Reshape (met after it, walking back): a bias on [batch*heads, q, k].
                    added = reshaped and prod.op_type in ("Add", "Sub") and len(terms) > 1
                    nxt.extend((i, reshaped, biased or added) for i in terms)
            if scores is not None or not nxt:
                break
            frontier = nxt
        if scores is None:
            continue
        value, sink = node.outputs[0], None
        for _ in range(4):
            users = [u for u, _ in value.uses() if u.op_type != "IsNaN"]
            if len(users) != 1:
                break
            if users[0].op_type == "MatMul" and users[0].inputs[0] is value and _rank(value) == 3:
                sink = users[0]
                break
            if users[0].op_type not in _MERGED_FORWARD:
                break
            value = users[0].outputs[0]
        if sink is not None:
            found.append((site_name(node), node, scores[1]))
    return found


def refuse_merged_heads(model: ir.Model) -> None:
    """Refuse a model with merged-heads attention find_sites could not read (see ``merged_heads_attention``), naming
    the FX route: prefixing the other sites alone would silently differ from PEFT."""
    found = merged_heads_attention(model)
    if not found:
        return
    name, node, biased = found[0]
    bias = (" and adds a bias over the keys to its scores (Bloom's ALiBi), which PEFT's cache recomputes for the T "
            "prefix keys in front" if biased else "")
    raise UnsupportedError(
        f"attention site {name} (Softmax node {node.name!r}{f', and {len(found) - 1} more like it' if len(found) > 1 else ''}) "
        f"cannot take a prefix in ONNX: it computes attention with the heads merged into the batch axis (MatMul on "
        f"[batch*heads, ...] around a [batch, heads, q, k] Reshape, as Bloom does){bias}, and the graph does not say how "
        "many heads that view has (neither a constant in its target nor a static shape). Apply the PrefixConfig to the "
        "torch model instead: gm = lora_fx.capture(model, kwargs=...); "
        "lora_fx.apply(gm, PrefixConfig(...)) (or lora_fx.load_adapter(gm, peft_dir)); then "
        "lora_fx.export_onnx(gm, path, kwargs=..., mode='adapters'), whose file holds the prefixes as adapter slots"
    )


class InsertPrefix:
    """Put per-site key/value prefixes in front of K and V at every attention site and move positions by T.

    Matches the decomposed attention exporters write (``MatMul(q, kᵀ)`` → scale → ``Add(mask)`` →
    ``Softmax`` → ``MatMul(·, v)``, K possibly repeated for grouped-query models, or with the heads merged
    into the batch axis and an ALiBi bias recomputed for T + k keys: Bloom), the opset-23
    ``Attention`` op, ``com.microsoft`` ``MultiHeadAttention``, ``GroupQueryAttention`` and ``Attention``
    (see ``prefix_forms`` for how the prefix enters each), and positions: a ``Range`` reaching
    ``Cos``/``Sin`` (rotary) or a constant-table ``Gather`` (position embeddings), a ``Slice`` of a
    ``…position_ids`` initializer (BERT), a ``position_ids`` graph input. Refuses, naming the site and
    the reason and before changing anything, sites that already read or write a KV cache; unpacks
    ``com.microsoft.Attention``'s packed QKV weight into ``MultiHeadAttention`` first. Of an
    encoder-decoder model it takes decoder self-attention sites only (see the module docstring) and leaves
    the encoder's positions as they are.
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
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        if opset < MIN_OPSET:
            raise UnsupportedError(
                f"prefix-tuning inserts ops of ONNX opset {MIN_OPSET} or later (Range), and this model imports opset {opset}: "
                f"convert it with onnx.version_converter.convert_version(model, {MIN_OPSET}), or re-export it at a newer opset"
            )
        refuse_merged_heads(model)
        # Encoder-decoder models: PEFT's SEQ_2_SEQ_LM prefix reaches the decoder's self-attention alone, decoder
        # layers read blocks of prompt_embeddings (sites sharing one share one initializer), and only the decoder's
        # positions move (the cache is the decoder's).
        roles = seq2seq_roles(find_sites(model))
        blocks = seq2seq_blocks(roles, self.sites) if roles is not None else None
        _check_submodules(self.config, blocks)
        keep = roles.encoder_values if roles is not None else frozenset()
        plan = []
        for site in self.sites:  # validate everything before the first change
            parts = attention_parts(site.handle)
            if parts is None:
                raise UnsupportedError(f"node {site.handle.name!r} of site {site.name} is no longer an attention site")
            if not parts.kv_heads or not parts.head_dim or not parts.num_heads:
                raise UnsupportedError(
                    f"attention site {site.name}: its head counts or head size are unknown (heads {parts.num_heads}, kv heads "
                    f"{parts.kv_heads}, head size {parts.head_dim}; the graph has no static shapes there and its projection is "
                    f"packed), so the prefix shape is too. Export with the dynamo exporter (torch.onnx.export(..., dynamo=True)), "
                    f"which records the shapes"
                )
            if roles is None and carries_relative_position_bias(parts):
                raise UnsupportedError(refusal(
                    site, parts, "its scores carry a relative position bias (T5) and the model has no decoder reading an "
                    "encoder: PEFT's prefix-tuning reaches a T5-style model only through the decoder's self-attention of "
                    "an encoder-decoder (SEQ_2_SEQ_LM) and never prefixes a T5 encoder, so there is no PEFT behaviour to "
                    "match here. Export the whole T5ForConditionalGeneration (use_cache=False) and prefix that file, or "
                    "use LoRA (LoraConfig) on the encoder"))
            how = FORMS.get(parts.op)
            if how is None:
                raise UnsupportedError(refusal(site, parts, f"lora_fx has no rule for the {parts.op} form"))
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
        plan_dtype = ir.DataType.FLOAT
        if blocks is not None:
            self._check_shared(blocks)
            record["num_transformer_submodules"] = 2
            record["num_blocks"] = len(roles.encoder)
        by_block: dict[int, tuple[ir.Value, ir.Value]] = {}
        for site, parts, rewrite, facts in plan:
            block = blocks[site.name] if blocks is not None else None
            values = by_block.get(block) if block is not None else None
            if values is None:
                values = self._initializers(graph, site, parts, T)
                if block is not None:
                    by_block[block] = values
            plan_dtype = values[0].dtype
            rewrite(graph, site, parts, T, values, facts)
            record["sites"][site.name] = {"kv_heads": parts.kv_heads, "head_dim": parts.head_dim,
                                          "key": values[0].name, "value": values[1].name}
            if block is not None:
                record["sites"][site.name]["block"] = block
            changed.append(site.name)
        forget_widened(graph)
        changed += offset_positions(graph, T, keep)
        if plan:
            # The builders write opset-15 ops; an older model gets its own opset's spelling of them.
            lower_to_opset(graph, opset, plan_dtype)
        # Not sort_keys: the sites' order is the layer order PEFT's prompt_embeddings blocks follow (h.10 sorts before h.2).
        model.metadata_props[PREFIX_KEY] = json.dumps(record)
        config = self.config
        if blocks is not None:
            # What PEFT records for this model, so the saved config loads in PEFT as SEQ_2_SEQ_LM (the only task whose
            # PeftModel gives an encoder-decoder this layout). lora_fx.apply guesses FEATURE_EXTRACTION from a
            # ...ForConditionalGeneration class it does not know, which would load in PEFT without the prefixes.
            task = config.task_type if config.task_type not in (None, "FEATURE_EXTRACTION") else "SEQ_2_SEQ_LM"
            config = dataclasses.replace(config, num_transformer_submodules=2, task_type=task)
        model.metadata_props[PREFIX_CONFIG_KEY] = config.to_json()
        return PassResult(model, True, changed)

    def _check_shared(self, blocks: dict[str, int]) -> None:
        first: dict[int, str] = {}
        for site, block in blocks.items():
            if site not in self.prefixes:
                continue
            other = first.setdefault(block, site)
            if other != site and not all(torch.equal(a, b) for a, b in zip(self.prefixes[other], self.prefixes[site])):
                raise AdapterError(
                    f"sites {other} and {site} read the same block {block} of PEFT's SEQ_2_SEQ_LM prompt_embeddings, "
                    "so they hold one prefix initializer, but the prefixes given for them differ; give both the same "
                    "values (PEFT's layout ties them)"
                )

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


def select_attention_sites(sites: Sequence[Site], config: PrefixConfig) -> list[Site]:
    from lora_fx.passes.fx.insert_prefix import select_attention_sites as select

    return select(sites, config)


def select_prefix_sites(sites: Sequence[Site], config: PrefixConfig) -> list[Site]:
    """The attention sites ``config`` selects that PEFT's prefix-tuning reaches: of an encoder-decoder model, without
    target_modules, the decoder's self-attention (named encoder or cross-attention sites are refused by the pass)."""
    chosen = select_attention_sites(sites, config)
    roles = seq2seq_roles(sites)
    if roles is None or config.target_modules is not None:
        return chosen
    decoder = {s.name for s in roles.decoder}
    return [s for s in chosen if s.name in decoder]


def insert_prefix(model: ir.Model, config: PrefixConfig, prefixes: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> PassResult:
    refuse_merged_heads(model)
    return InsertPrefix(config, select_prefix_sites(find_sites(model), config), prefixes)(model)


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


__all__ = ["InsertPrefix", "PREFIX_KEY", "PREFIX_CONFIG_KEY", "Seq2SeqRoles", "apply_prefix", "encoder_decoder_roles", "insert_prefix",
           "offset_positions", "merged_heads_attention", "position_sources", "prefix_metadata", "prefix_names", "refuse_merged_heads",
           "select_prefix_sites", "seq2seq_blocks", "seq2seq_roles"]
