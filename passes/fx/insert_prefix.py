"""Insert learned key/value prefixes (prefix-tuning) at the attention sites of a captured GraphModule.

At each attention site, ``T`` learned vectors ``P_k``, ``P_v`` ``[kv_heads, T, head_dim]`` are
broadcast over the batch and concatenated in front of the site's keys and values, after rotary
embedding (the prefixes take none, as under PEFT where they sit in the KV cache). The attention
mask gains T always-visible columns; ``is_causal`` becomes an explicit mask offset by T. Positions
of the real tokens move to ``T .. T+n-1``, which is what PEFT's cache of length T does to
transformers models, so PEFT's prefix adapters give PEFT's outputs here. Encoder-decoder models (BART,
T5, Marian, Pegasus...; roles found from the graph by ``seq2seq_roles``) follow PEFT's SEQ_2_SEQ_LM: only
the decoder's self-attention takes prefixes, read from PEFT's blocks (``seq2seq_block``), and only the
decoder's positions move. Bloom (heads merged into the batch axis, ALiBi) moves no positions under PEFT; its
ALiBi bias is recomputed for T + n keys as PEFT's mask with T ones in front makes Bloom compute it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from lora_fx.config import PrefixConfig
from lora_fx.errors import AdapterError, ConfigError, TargetNotFoundError, UnsupportedError
from lora_fx.passes.fx.capture import meta
from lora_fx.passes.fx.find_sites import INSERTED, _PASS_THROUGH, _SOFTMAX_OPS, find_sites
from lora_fx.passes.result import PassResult
from lora_fx.sites import Site, SiteKind

aten = torch.ops.aten

PREFIXED = "lora_fx_prefixed"
# Where the pass keeps its record in ``meta(gm)``: T, the sites (in layer order) and their shapes.
META_PREFIX = "prefix"
ENCODER = "prefix_encoder"
KEY, VALUE = "prefix_key", "prefix_value"

_SDPA = aten.scaled_dot_product_attention.default
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_RESHAPES = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
_TRANSPOSES = {aten.transpose.int, aten.permute.default}
# Nodes a position index may flow through before it reaches rotary cos/sin or a position embedding.
_STOP = {aten.linear.default, aten.matmul.default, aten.mm.default, aten.addmm.default, _SDPA, aten.bmm.default}


@dataclass
class PrefixSite:
    """An attention site as the pass rewrites it: the shapes of its prefixes."""

    site: Site
    kv_heads: int
    head_dim: int
    repeats: int  # repeat_kv before the attention: the prefix is repeated the same way


def _sdpa_arg(node: fx.Node, name: str, default: Any = None) -> Any:
    i = _SDPA_ARGS.index(name)
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _set_sdpa_arg(node: fx.Node, name: str, value: Any) -> None:
    i = _SDPA_ARGS.index(name)
    if len(node.args) > i:
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _val(node: Any) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _repeat_kv(node: fx.Node) -> tuple[int, int] | None:
    """(kv_heads, repeats) when ``node`` is transformers' repeat_kv: expand [B, kv, rep, S, D] then reshape."""
    if not (isinstance(node, fx.Node) and node.target in _RESHAPES):
        return None
    src = node.args[0]
    if not (isinstance(src, fx.Node) and src.target is aten.expand.default):
        return None
    shape = src.args[1]
    if len(shape) != 5 or not isinstance(shape[1], int) or not isinstance(shape[2], int):
        return None
    return shape[1], shape[2]


# The score op of an eager site -> the index of q in its args (k follows): matmul(q, kᵀ); with merged heads
# (Bloom) bmm(q, kᵀ) or baddbmm(bias, q, kᵀ).
_SCORE_OPS = {aten.matmul.default: 0, aten.bmm.default: 0, aten.baddbmm.default: 1}


def _eager_nodes(sink: fx.Node) -> tuple[fx.Node, fx.Node, list[fx.Node]]:
    """For an eager site (the matmul / bmm(p, v) node): the score op, the softmax and the nodes between them."""
    path: list[fx.Node] = []
    softmax = sink.args[0]
    while isinstance(softmax, fx.Node) and softmax.target not in _SOFTMAX_OPS:
        softmax = softmax.args[0]
    src = softmax.args[0]
    while isinstance(src, fx.Node) and src.target not in _SCORE_OPS:
        path.append(src)
        src = src.args[0]
    return src, softmax, path


def _score_qk(scores: fx.Node) -> tuple[Any, Any]:
    """(q, kᵀ) of a score op."""
    i = _SCORE_OPS[scores.target]
    return scores.args[i], scores.args[i + 1]


def _static(x: Any) -> int | None:
    return x if isinstance(x, int) else None


def describe(site: Site) -> PrefixSite:
    """The prefix shapes of an attention site, looking through repeat_kv for grouped-query models."""
    node = site.handle
    if site.op == "eager_bmm":
        # Heads merged into the batch axis ([B*H, ...]): the shapes come from the [B, H, q, k] view find_sites read.
        if not site.num_heads or not site.head_dim:
            raise UnsupportedError(
                f"attention site {site.name}: its head count or head size is not a static number in the graph, so the "
                "prefix shape [heads, T, head_dim] is unknown; capture the model with its real config"
            )
        return PrefixSite(site, int(site.num_heads), int(site.head_dim), 1)
    if site.op == "sdpa":
        k = _sdpa_arg(node, "key")
    else:
        k = _eager_nodes(node)[0].args[1]
        if isinstance(k, fx.Node) and k.target in _TRANSPOSES:
            k = k.args[0]
    rep = _repeat_kv(k)
    kv_val = _val(k)
    head_dim = site.head_dim or (_static(kv_val.shape[-1]) if kv_val is not None else None)
    if rep is not None:
        kv_heads, repeats = rep
    else:
        kv_heads = _static(kv_val.shape[-3]) if kv_val is not None and kv_val.dim() >= 3 else site.kv_heads
        repeats = 1
    if not kv_heads or not head_dim:
        raise UnsupportedError(
            f"attention site {site.name}: the number of key/value heads or the head size is not a static number in "
            "the graph, so the prefix shape [kv_heads, T, head_dim] is unknown; capture the model with its real config"
        )
    return PrefixSite(site, int(kv_heads), int(head_dim), int(repeats))


def select_attention_sites(sites: Sequence[Site], config: PrefixConfig) -> list[Site]:
    """The attention sites ``config.target_modules`` selects (all when it is None), in graph order."""
    import re

    attention = [s for s in sites if s.kind is SiteKind.ATTENTION]
    if not attention:
        # ONNX sites carry the layers of control-flow subgraphs apart (passes.onnx.find_sites.Sites), with why.
        hidden = [s for s in getattr(sites, "unreachable", ()) if s.kind is SiteKind.ATTENTION]
        if hidden:
            raise TargetNotFoundError(
                f"this model's main graph has no attention site for prefix-tuning, only {len(hidden)} inside "
                f"control-flow subgraphs: {sites.unreachable_note}"
            )
        raise TargetNotFoundError(
            "this model has no attention site for prefix-tuning (no scaled_dot_product_attention and no "
            "matmul-softmax-matmul attention in the graph); use LoRA (LoraConfig) on its linear sites instead"
        )
    tm = config.target_modules
    if tm is None:
        return attention
    if isinstance(tm, str):
        chosen = [s for s in attention if re.fullmatch(tm, s.name)]
    else:
        chosen = [s for s in attention if s.name in tm or any(s.name.endswith(f".{n}") for n in tm)]
    if not chosen:
        names = "\n  ".join(s.name for s in attention)
        raise TargetNotFoundError(f"target_modules={tm!r} matches no attention site of this model; attention sites:\n  {names}")
    return chosen


def _refuse_shared_attention(sites: Sequence[Site]) -> None:
    """One attention module run by several layers (ALBERT) needs a prefix per layer, but prefixes are
    named by module path: refuse before anything is inserted."""
    names = [s.name for s in sites]
    shared = sorted({n for n in names if names.count(n) > 1})
    if shared:
        raise UnsupportedError(
            f"attention module {shared[0]} runs {names.count(shared[0])} times per forward (layers sharing weights); "
            "prefix-tuning needs a prefix per layer and names prefixes by module path, so it cannot be applied "
            "to this model. Use LoRA (LoraConfig) instead"
        )


# ---- relative position bias (T5) -------------------------------------------------------------------
_ARANGES = {aten.arange.default, aten.arange.start, aten.arange.start_step}
_SKIP_COPY = {aten._assert_tensor_metadata.default}


@dataclass
class RelativeBias:
    """A T5-style relative position bias reaching an attention site: ``sub`` is ``memory - context``
    (``[1, k] - [q, 1]`` key and query positions), ``nodes`` the chain from it to ``end``, the
    ``[1, heads, q, k]`` bias the site adds to its scores; ``bidirectional`` for an encoder's buckets."""

    sub: fx.Node
    end: fx.Node
    nodes: list[fx.Node]
    bidirectional: bool


def _from_arange(node: Any, depth: int = 6) -> bool:
    while isinstance(node, fx.Node) and depth > 0:
        if node.target in _ARANGES:
            return True
        if node.target not in (aten.unsqueeze.default, aten.slice.Tensor, aten.add.Tensor, aten.view.default):
            return False
        node, depth = node.args[0], depth - 1
    return False


def _relative_sub(indices: fx.Node, budget: int = 30) -> fx.Node | None:
    """The ``memory - context`` node the bucket indices of a relative-position embedding come from."""
    seen, queue = set(), [indices]
    while queue and len(seen) < budget:
        n = queue.pop(0)
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.target is aten.sub.Tensor and len(n.args) == 2 and all(_from_arange(a) for a in n.args):
            mem, ctx = _val(n.args[0]), _val(n.args[1])
            if mem is not None and ctx is not None and mem.dim() == 2 and ctx.dim() == 2 and mem.shape[0] == 1 and ctx.shape[1] == 1:
                return n
        queue.extend(a for a in n.all_input_nodes)
    return None


def relative_bias(start: Any, budget: int = 48) -> RelativeBias | None:
    """The relative position bias (T5's ``compute_bias``: an embedding of bucketed ``memory - context``
    positions) among the inputs of ``start`` (an additive mask or score term), or None."""
    if not isinstance(start, fx.Node):
        return None
    seen, queue, emb, sub = set(), [start], None, None
    while queue and len(seen) < budget:
        n = queue.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n.target is aten.embedding.default and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr":
            # (A rewritten graph also holds the prefix columns' copy, whose positions carry no shapes: passed over.)
            sub = _relative_sub(n.args[1])
            if sub is not None:
                emb = n
                break
        if n.op == "call_function" and n.target not in _STOP:
            queue.extend(n.all_input_nodes)
    if sub is None:
        return None
    # The chain from sub: nodes all of whose inputs are in it (or parameters); it ends where a mask or the scores join.
    chain, order = {sub}, [sub]
    for n in list(sub.graph.nodes):
        if n in chain or n.op != "call_function" or n.target in _SKIP_COPY or not any(a in chain for a in n.all_input_nodes):
            continue
        if all(a in chain or a.op == "get_attr" for a in n.all_input_nodes):
            chain.add(n)
            order.append(n)
    end, queue, seen = None, [start], set()
    while queue and end is None:
        n = queue.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n in chain:
            end = n
        else:
            queue.extend(n.all_input_nodes)
    if end is None or emb not in chain:
        return None
    needed, stack = set(), [end]
    while stack:
        n = stack.pop()
        if n in needed or n not in chain:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    nodes = [n for n in order if n in needed]
    bidirectional = any(n.target is aten.abs.default for n in nodes)
    return RelativeBias(sub, end, nodes, bidirectional)


def site_relative_bias(site: Site) -> RelativeBias | None:
    """The relative position bias added to a site's scores (eager: a term before the softmax; SDPA: in its mask)."""
    node = site.handle
    if site.op == "sdpa":
        return relative_bias(_sdpa_arg(node, "attn_mask"))
    _scores, _softmax, path = _eager_nodes(node)
    on_path = set(path)
    for n in path:
        if n.target is aten.add.Tensor:
            for a in n.args[:2]:
                if isinstance(a, fx.Node) and a not in on_path:
                    rb = relative_bias(a)
                    if rb is not None:
                        return rb
    return None


def _prefix_bias(graph: fx.Graph, anchor: fx.Node, rb: RelativeBias, T: int, like: fx.Node) -> fx.Node:
    """The bias of the T prefix keys in front of ``like``'s k key columns: ``[1, heads, q, T + k]``, the prefix
    columns as PEFT's cache gives them (keys at 0..T-1, queries at T + i: relative position j - T - i), the k real
    columns zero, to add to a mask or bias that was padded with T zero columns."""
    mem = _call(graph, anchor, aten.arange.start, -T, 0, device=_device(rb.sub))
    mem = _call(graph, anchor, aten.unsqueeze.default, mem, 0)
    env = {rb.sub: _call(graph, anchor, aten.sub.Tensor, mem, rb.sub.args[1])}
    for n in rb.nodes[1:]:
        copy = graph.node_copy(n, lambda a: env.get(a, a))
        copy.meta[INSERTED] = True
        env[n] = copy
    k = _call(graph, anchor, aten.sym_size.int, like, -1)
    return _call(graph, anchor, aten.constant_pad_nd.default, env[rb.end], [0, k], 0.0)


# ---- encoder-decoder structure ---------------------------------------------------------------------
_PROJECTIONS = {aten.linear.default: 0, aten.addmm.default: 1, aten.mm.default: 0, aten.matmul.default: 0}


def _projection_input(node: Any, budget: int = 40) -> fx.Node | None:
    """The activation a query or key tensor was projected from: the input of the first linear met walking
    back along first arguments (through views, transposes, scaling, LoRA's add), or None."""
    while isinstance(node, fx.Node) and budget > 0:
        budget -= 1
        i = _PROJECTIONS.get(node.target)
        if i is not None:
            x = node.args[i]
            # mm/matmul count as a projection only with a weight (a get_attr, maybe transposed) on the right.
            if node.target in (aten.mm.default, aten.matmul.default):
                w = node.args[1]
                while isinstance(w, fx.Node) and w.target in _TRANSPOSES | {aten.t.default}:
                    w = w.args[0]
                if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                    node = node.args[0]
                    continue
            return x if isinstance(x, fx.Node) else None
        if node.op != "call_function" or not node.args:
            return None
        first = node.args[0]
        # A concatenation: the last part (the real keys behind an inserted prefix; rotary's halves share a source).
        node = first[-1] if isinstance(first, (list, tuple)) and first else first
    return None


def _query_key(site: Site) -> tuple[Any, Any]:
    node = site.handle
    if site.op == "sdpa":
        return _sdpa_arg(node, "query"), _sdpa_arg(node, "key")
    return _score_qk(_eager_nodes(node)[0])


def _ancestors(starts: Sequence[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(starts)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _erase_unused(graph: fx.Graph, nodes: set[fx.Node]) -> None:
    """Erase the computed nodes among ``nodes`` that nothing reads any more, users before their inputs; nodes
    outside ``nodes`` (whatever was dead before this pass) and inputs and parameters are left alone."""
    for n in reversed(list(graph.nodes)):
        if n in nodes and n.op == "call_function" and not n.users and not n.is_impure():
            graph.erase_node(n)


@dataclass
class Seq2SeqRoles:
    """The attention sites of an encoder-decoder graph by role: the encoder's self-attention, the decoder's
    self-attention and the cross-attention (keys and values from the encoder's output), each in graph order;
    ``encoder_nodes``, every node the encoder's output depends on."""

    encoder: list[Site]
    decoder: list[Site]
    cross: list[Site]
    encoder_nodes: set[fx.Node]


def seq2seq_roles(sites: Sequence[Site]) -> Seq2SeqRoles | None:
    """The roles of an encoder-decoder model's attention sites (BART, T5, Marian, Pegasus...), or None for a
    model without cross-attention.

    A cross-attention site projects its keys from another activation than its queries, one its queries do not
    depend on (the encoder's output): self-attention projects both from one hidden state, fused or not."""
    attention = [s for s in sites if s.kind is SiteKind.ATTENTION and isinstance(s.handle, fx.Node)]
    sources = {}
    for s in attention:
        q, k = _query_key(s)
        sources[id(s)] = (_projection_input(q), _projection_input(k))
    candidates = [s for s in attention if None not in sources[id(s)] and sources[id(s)][0] is not sources[id(s)][1]]
    if not candidates:
        return None
    encoder_nodes = _ancestors([sources[id(s)][1] for s in candidates])
    # The encoder's output never depends on the decoder's hidden states: a key source that does is no encoder.
    cross = [s for s in candidates if sources[id(s)][0] not in encoder_nodes]
    if not cross:
        return None
    if len(cross) != len(candidates):
        encoder_nodes = _ancestors([sources[id(s)][1] for s in cross])
    crossing = {id(s) for s in cross}
    encoder = [s for s in attention if id(s) not in crossing and s.handle in encoder_nodes]
    decoder = [s for s in attention if id(s) not in crossing and s.handle not in encoder_nodes]
    return Seq2SeqRoles(encoder, decoder, cross, encoder_nodes)


def peft_prefix_sites(sites: Sequence[Site], chosen: Sequence[Site], explicit: bool) -> tuple[list[Site], dict[str, int] | None]:
    """PEFT's prefix-tuning on this model: (the sites to prefix, the block of PEFT's SEQ_2_SEQ_LM
    ``prompt_embeddings`` each reads; None for models without an encoder-decoder structure).

    PEFT reaches an encoder-decoder model (BART, T5, Marian, Pegasus...) only through ``past_key_values``
    (SEQ_2_SEQ_LM, ``num_transformer_submodules=2``): the decoder's self-attention gets the prefix;
    transformers drops the cache in the encoder and PEFT empties the cross-attention cache. A T5 encoder
    alone (bidirectional relative bias, no decoder) is refused: PEFT's FEATURE_EXTRACTION on T5EncoderModel
    fails or changes nothing. Other models: the chosen sites, as they are."""
    sites = [s for s in sites if s.kind is SiteKind.ATTENTION]
    roles = seq2seq_roles(sites)
    if roles is None:
        biases = [site_relative_bias(s) for s in sites]
        if any(b is not None and b.bidirectional for b in biases) and not any(b is not None and not b.bidirectional for b in biases):
            raise UnsupportedError(
                "this model's attention uses T5's relative position bias and has no decoder self-attention: PEFT's "
                "prefix-tuning never reaches a T5 encoder (transformers drops past_key_values there; PEFT with "
                "FEATURE_EXTRACTION fails on a mask or changes nothing), so lora_fx has no PEFT behaviour to match. "
                "Capture the encoder-decoder model (T5ForConditionalGeneration, PEFT's SEQ_2_SEQ_LM) or use LoRA (LoraConfig)"
            )
        return list(chosen), None
    decoder_ids = {id(s) for s in roles.decoder}
    cross_ids = {id(s) for s in roles.cross}
    others = [s for s in chosen if id(s) not in decoder_ids]
    if explicit and others:
        role = "a cross-attention" if id(others[0]) in cross_ids else "the encoder's self-attention"
        raise UnsupportedError(
            f"attention site {others[0].name} cannot take a prefix: it is {role} in an encoder-decoder model, and PEFT's "
            "prefix-tuning (SEQ_2_SEQ_LM) reaches only the decoder's self-attention (transformers drops the cache in "
            "the encoder and PEFT empties the cross-attention cache), so there is no PEFT behaviour to match there. "
            "Select decoder self-attention sites only, or use LoRA (LoraConfig) on the encoder"
        )
    decoder = [s for s in chosen if id(s) in decoder_ids]
    if not decoder:
        raise UnsupportedError(
            "this encoder-decoder model has no decoder self-attention lora_fx can find, the only place PEFT's "
            "prefix-tuning reaches; use LoRA (LoraConfig) on this model"
        )
    return decoder, seq2seq_layer_blocks([s.name for s in roles.encoder], [s.name for s in roles.decoder],
                                         [s.name for s in decoder])


def seq2seq_layer_blocks(encoder: Sequence[str], decoder: Sequence[str], chosen: Sequence[str]) -> dict[str, int]:
    """The ``seq2seq_block`` of each chosen decoder self-attention site (by name), for both front ends; refuses a
    model with more decoder than encoder layers, where PEFT itself fails."""
    num_layers = len(encoder)
    if num_layers < len(decoder):
        raise UnsupportedError(
            f"this encoder-decoder model has {num_layers} encoder and {len(decoder)} decoder layers; PEFT's "
            "SEQ_2_SEQ_LM prefix layout sizes the prefixes by the encoder's layer count (num_layers), so decoder layers "
            f"from {num_layers} on get no prefix and PEFT fails there (IndexError), leaving no PEFT behaviour to match. "
            "Use LoRA (LoraConfig) on this model"
        )
    layers = list(decoder)
    return {name: seq2seq_block(layers.index(name), num_layers) for name in chosen}


def seq2seq_block(layer: int, num_layers: int) -> int:
    """The block of PEFT's ``prompt_embeddings`` that decoder layer ``layer`` reads under SEQ_2_SEQ_LM.

    PEFT views the embeddings as ``num_layers * 2`` (key, value) rows, repeats them twice and splits
    them into per-layer (self key, self value, cross key, cross value) groups of four, so decoder layer
    l reads row 4 l mod 2 num_layers: the key/value pair of block 2 l mod num_layers (with an even
    layer count, layers l and l + num_layers/2 share one block)."""
    return (2 * layer) % num_layers


class PrefixEncoder(torch.nn.Module):
    """PEFT's reparameterization: embedding [T, token_dim] -> Linear -> tanh -> Linear to num_layers*2*token_dim."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, hidden: int, num_layers: int, zero: bool) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(num_virtual_tokens, token_dim)
        self.transform = torch.nn.Sequential(
            torch.nn.Linear(token_dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, num_layers * 2 * token_dim)
        )
        if zero:
            torch.nn.init.zeros_(self.transform[-1].weight)
            torch.nn.init.zeros_(self.transform[-1].bias)

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)


class InsertPrefix:
    """Add key/value prefixes at attention sites and move the real tokens' positions by T.

    Matches:

    * ``aten.scaled_dot_product_attention`` with no mask, a boolean or an additive mask, ``is_causal``,
      ``enable_gqa``, and keys/values repeated by transformers' ``repeat_kv`` (expand + reshape) for
      grouped-query attention: the prefixes are ``[kv_heads, T, head_dim]`` and repeated the same way;
    * the eager form ``matmul(q, kᵀ) → [scale] → [+mask | where | masked_fill] → softmax → matmul(·, v)``;
    * the merged-heads form (Bloom, site op ``eager_bmm``): ``baddbmm(bias, q, kᵀ)`` or ``bmm(q, kᵀ)`` on
      ``[B*H, ...]`` → view ``[B, H, q, k]`` → [+mask] → softmax → view → ``bmm(·, v)``: the prefixes enter in
      that layout, and a bias over the keys is recomputed for T + k keys from its mask padded with T ones
      (Bloom's ALiBi from ``cumsum(mask)``) or its key ``arange`` lengthened by T (no mask), as under PEFT;
    * positions: an ``arange`` that reaches rotary ``cos``/``sin``, an embedding's indices or the rows of
      a sin/cos table (GPT-J), a ``cumsum`` of a mask that reaches a position embedding (OPT, RoBERTa),
      a slice of a ``position_ids`` buffer (BERT) and a ``position_ids`` graph input get ``+ T``.
    """

    def __init__(self, config: PrefixConfig, sites: Sequence[Site], blocks: dict[str, int] | None = None) -> None:
        self.config = config
        self.sites = list(sites)
        # Encoder-decoder (T5) models: the block of PEFT's prompt_embeddings each site reads; sites sharing a
        # block share their prefix parameters, as under PEFT.
        self.blocks = blocks

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        info = meta(gm)
        if info.get(META_PREFIX):
            raise AdapterError("this model already has prefixes; prefix-tuning is inserted once per model")
        T = self.config.num_virtual_tokens
        _refuse_shared_attention(self.sites)
        described = [describe(s) for s in self.sites]
        for ps in described:
            if ps.site.handle.meta.get(PREFIXED):
                raise AdapterError(f"site {ps.site.name} already has a prefix")
            if ps.site.op == "eager_bmm":
                bias = _key_bias(ps.site)
                if bias is not None:
                    _key_bias_root(gm.graph, bias, ps.site.name)  # refuse before anything changes
        changed: list[str] = []
        # Encoder-decoder models: the encoder's positions stay, as under PEFT (its cache is the decoder's alone).
        roles = seq2seq_roles(find_sites(gm)) if self.blocks else None
        keep = roles.encoder_nodes if roles is not None else frozenset()
        # PEFT's num_layers: the blocks of prompt_embeddings (an encoder-decoder's encoder layer count).
        self.num_blocks = len(roles.encoder) if roles is not None else len(described)
        sources = self._prefix_sources(gm, described)
        widened: dict[fx.Node, fx.Node] = {}  # a score bias shared by the layers (Bloom's ALiBi) -> its T + k version
        for ps, (pk, pv) in zip(described, sources):
            if ps.site.op == "sdpa":
                self._rewrite_sdpa(gm.graph, ps, pk, pv, T)
            elif ps.site.op == "eager_bmm":
                self._rewrite_merged(gm.graph, ps, pk, pv, T, widened)
            else:
                self._rewrite_eager(gm.graph, ps, pk, pv, T)
            ps.site.handle.meta[PREFIXED] = True
            changed.append(ps.site.name)
        changed += offset_positions(gm.graph, T, keep)
        # The widened copies replace the original score bias in every layer; its nodes would still run each
        # forward for nothing (the exported ONNX graph would drop them, the GraphModule does not).
        _erase_unused(gm.graph, _ancestors(list(widened)))
        gm.graph.lint()
        gm.recompile()
        info[META_PREFIX] = {
            "num_virtual_tokens": T,
            "projection": bool(self.config.prefix_projection),
            "sites": {ps.site.name: {"kv_heads": ps.kv_heads, "head_dim": ps.head_dim, "layer": i,
                                     **({"block": self.blocks[ps.site.name]} if self.blocks else {})}
                      for i, ps in enumerate(described)},
        }
        if self.blocks:
            info[META_PREFIX]["num_transformer_submodules"] = 2
            info[META_PREFIX]["num_blocks"] = self.num_blocks
        return PassResult(gm, True, changed)

    # ---- where each site's prefixes come from --------------------------------------------------
    def _prefix_sources(self, gm: fx.GraphModule, described: list[PrefixSite]) -> list[tuple[fx.Node, fx.Node]]:
        graph = gm.graph
        T = self.config.num_virtual_tokens
        zero = self.config.init_weights == "zero"
        # Before every site and every node a site rewrite touches (the eager form's score matmul).
        first = next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))
        ref = _site_param(gm)
        out = []
        if not self.config.prefix_projection:
            shared: dict[tuple[int, str], torch.nn.Parameter] = {}
            for ps in described:
                module = _module_at(gm, ps.site.name)
                for name in (KEY, VALUE):
                    if hasattr(module, name):
                        raise AdapterError(f"site {ps.site.name} already has a {name}")
                    # PEFT's nn.Embedding starts N(0, 1); "zero" starts at zero.
                    data = torch.zeros if zero else torch.randn
                    block = (self.blocks[ps.site.name], name) if self.blocks else None
                    if block not in shared or block is None:
                        shared[block] = torch.nn.Parameter(data(ps.kv_heads, T, ps.head_dim, dtype=ref.dtype, device=ref.device))
                    module.register_parameter(name, shared[block])
                with graph.inserting_before(first):
                    pk = graph.get_attr(f"{ps.site.name}.{KEY}")
                    pv = graph.get_attr(f"{ps.site.name}.{VALUE}")
                out.append((pk, pv))
            return out
        shapes = {(ps.kv_heads, ps.head_dim) for ps in described}
        if len(shapes) != 1:
            raise UnsupportedError(
                f"prefix_projection needs every attention site to have the same kv_heads and head_dim (PEFT's encoder "
                f"emits one size for all layers); this model has {sorted(shapes)}. Use prefix_projection=False"
            )
        kv, hd = shapes.pop()
        token_dim = kv * hd
        hidden = self.config.encoder_hidden_size or token_dim
        encoder = PrefixEncoder(T, token_dim, hidden, self.num_blocks, zero).to(device=ref.device, dtype=ref.dtype)
        gm.add_module(ENCODER, encoder)
        with graph.inserting_before(first):
            emb = _call(graph, None, aten.linear.default, graph.get_attr(f"{ENCODER}.embedding.weight"),
                        graph.get_attr(f"{ENCODER}.transform.0.weight"), graph.get_attr(f"{ENCODER}.transform.0.bias"))
            h = _call(graph, None, aten.tanh.default, emb)
            h = _call(graph, None, aten.linear.default, h, graph.get_attr(f"{ENCODER}.transform.2.weight"),
                      graph.get_attr(f"{ENCODER}.transform.2.bias"))
            # PEFT's layout: [T, layers * 2 (key, value), kv_heads, head_dim].
            h = _call(graph, None, aten.view.default, h, [T, 2 * self.num_blocks, kv, hd])
            encoder_nodes = [emb, emb.args[0], *emb.args[1:], h.args[0], h.args[0].args[0], *h.args[0].args[1:], h]
            for i, ps in enumerate(described):
                block = self.blocks[ps.site.name] if self.blocks else i
                pair = []
                for j in (0, 1):
                    s = _call(graph, None, aten.select.int, h, 1, 2 * block + j)
                    encoder_nodes.append(s)
                    end = _call(graph, None, aten.permute.default, s, [1, 0, 2])
                    # fold_prefix finds each site's key/value tensor by this mark and the encoder by the other.
                    end.meta[PREFIXED] = "prefix_source"
                    pair.append(end)
                out.append((pair[0], pair[1]))
            for n in encoder_nodes:
                if n.op == "call_function":
                    n.meta[PREFIXED] = "prefix_encoder"
        return out

    # ---- per-site rewrites ---------------------------------------------------------------------
    def _batched(self, graph: fx.Graph, anchor: fx.Node, p: fx.Node, ps: PrefixSite, like: fx.Node, transpose: bool) -> fx.Node:
        """``p`` [kv, T, D] → repeated for repeat_kv → [B, heads, T, D] (or [B, heads, D, T]) in ``like``'s dtype."""
        T = self.config.num_virtual_tokens
        val = _val(like)
        if ps.repeats > 1:
            p = _call(graph, anchor, aten.unsqueeze.default, p, 1)
            p = _call(graph, anchor, aten.expand.default, p, [ps.kv_heads, ps.repeats, T, ps.head_dim])
            p = _call(graph, anchor, aten.reshape.default, p, [ps.kv_heads * ps.repeats, T, ps.head_dim])
        if val is not None and val.dtype != torch.float32:
            p = _call(graph, anchor, aten._to_copy.default, p, dtype=val.dtype)
        if transpose:
            p = _call(graph, anchor, aten.transpose.int, p, 1, 2)
        p = _call(graph, anchor, aten.unsqueeze.default, p, 0)
        batch = _call(graph, anchor, aten.sym_size.int, like, 0)
        return _call(graph, anchor, aten.expand.default, p, [batch, -1, -1, -1])

    def _rewrite_sdpa(self, graph: fx.Graph, ps: PrefixSite, pk: fx.Node, pv: fx.Node, T: int) -> None:
        node = ps.site.handle
        q, k, v = (_sdpa_arg(node, n) for n in ("query", "key", "value"))
        mask, causal = _sdpa_arg(node, "attn_mask"), bool(_sdpa_arg(node, "is_causal", False))
        with graph.inserting_before(node):
            new_k = _call(graph, node, aten.cat.default, [self._batched(graph, node, pk, ps, k, False), k], 2)
            new_v = _call(graph, node, aten.cat.default, [self._batched(graph, node, pv, ps, v, False), v], 2)
            if mask is not None:
                new_mask = _pad_mask(graph, node, mask, T, visible=True)
                rb = relative_bias(mask)
                if rb is not None:
                    if _val(mask) is None or _val(mask).dtype == torch.bool:
                        raise UnsupportedError(f"attention site {ps.site.name}: its mask carries a relative position bias "
                                               "but is not an additive float mask; lora_fx cannot give the prefix keys their bias")
                    new_mask = _call(graph, node, aten.add.Tensor, new_mask, _prefix_bias(graph, node, rb, T, mask))
            elif causal:
                # SDPA's is_causal aligns top-left (query i sees keys j <= i); behind T prefixes that is j <= i + T.
                q_len = _call(graph, node, aten.sym_size.int, q, 2)
                k_len = _call(graph, node, aten.sym_size.int, new_k, 2)
                rows = _call(graph, node, aten.arange.default, q_len, device=_device(q))
                rows = _call(graph, node, aten.add.Tensor, _call(graph, node, aten.unsqueeze.default, rows, 1), T)
                cols = _call(graph, node, aten.unsqueeze.default, _call(graph, node, aten.arange.default, k_len, device=_device(q)), 0)
                new_mask = _call(graph, node, aten.le.Tensor, cols, rows)
            else:
                new_mask = None
        _set_sdpa_arg(node, "key", new_k)
        _set_sdpa_arg(node, "value", new_v)
        if new_mask is not None:
            _set_sdpa_arg(node, "attn_mask", new_mask)
        if causal:
            _set_sdpa_arg(node, "is_causal", False)

    def _rewrite_eager(self, graph: fx.Graph, ps: PrefixSite, pk: fx.Node, pv: fx.Node, T: int) -> None:
        sink = ps.site.handle
        scores, _softmax, path = _eager_nodes(sink)
        kt, v = scores.args[1], sink.args[1]
        with graph.inserting_before(scores):
            new_kt = _call(graph, scores, aten.cat.default, [self._batched(graph, scores, pk, ps, kt, True), kt], 3)
        scores.args = (scores.args[0], new_kt) + tuple(scores.args[2:])
        with graph.inserting_before(sink):
            new_v = _call(graph, sink, aten.cat.default, [self._batched(graph, sink, pv, ps, v, False), v], 2)
        sink.args = (sink.args[0], new_v) + tuple(sink.args[2:])
        _pad_path_masks(graph, scores, path, T)

    def _rewrite_merged(self, graph: fx.Graph, ps: PrefixSite, pk: fx.Node, pv: fx.Node, T: int,
                        widened: dict[fx.Node, fx.Node]) -> None:
        """Bloom's form: q, kᵀ and v are ``[B*H, ...]``; the prefixes go in that layout (keys ``[B*H, hd, T]``,
        values ``[B*H, T, hd]``, batch-major as ``[B, H]`` merges) and a score bias over the keys (ALiBi) is
        recomputed for T + k keys."""
        sink = ps.site.handle
        scores, _softmax, path = _eager_nodes(sink)
        i = _SCORE_OPS[scores.target]
        kt, v = scores.args[i + 1], sink.args[1]
        batch = _merged_batch(path)
        bias = _key_bias(ps.site)
        args = list(scores.args)
        if bias is not None:
            if bias not in widened:
                widened[bias] = _widened_key_bias(graph, bias, T, ps.site.name)
            args[0] = widened[bias]
        with graph.inserting_before(scores):
            new_kt = _call(graph, scores, aten.cat.default, [self._merged(graph, scores, pk, ps, kt, batch, True), kt], 2)
        args[i + 1] = new_kt
        scores.args = tuple(args)
        with graph.inserting_before(sink):
            new_v = _call(graph, sink, aten.cat.default, [self._merged(graph, sink, pv, ps, v, batch, False), v], 1)
        sink.args = (sink.args[0], new_v) + tuple(sink.args[2:])
        _pad_path_masks(graph, scores, path, T)

    def _merged(self, graph: fx.Graph, anchor: fx.Node, p: fx.Node, ps: PrefixSite, like: fx.Node, batch: Any,
                transpose: bool) -> fx.Node:
        """``p`` [H, T, D] → ``[B*H, T, D]`` (or ``[B*H, D, T]``) in ``like``'s dtype, row ``b*H + h`` holding head h."""
        T = self.config.num_virtual_tokens
        val = _val(like)
        if val is not None and val.dtype != torch.float32:
            p = _call(graph, anchor, aten._to_copy.default, p, dtype=val.dtype)
        if transpose:
            p = _call(graph, anchor, aten.transpose.int, p, 1, 2)
        p = _call(graph, anchor, aten.unsqueeze.default, p, 0)
        p = _call(graph, anchor, aten.expand.default, p, [batch, -1, -1, -1])
        rows, cols = (ps.head_dim, T) if transpose else (T, ps.head_dim)
        return _call(graph, anchor, aten.reshape.default, p, [-1, rows, cols])


def _merged_batch(path: Sequence[fx.Node]) -> Any:
    """B of a merged-heads site: the first size of the ``[B, H, q, k]`` view of its scores (find_sites requires it)."""
    for n in reversed(path):
        if n.target in _RESHAPES and len(n.args) > 1 and len(n.args[1]) == 4:
            return n.args[1][0]
    raise UnsupportedError("attention with merged heads but no [B, H, q, k] view of its scores; report this model")


_CONVERSIONS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default}


def _key_bias(site: Site) -> fx.Node | None:
    """The score bias over the keys of a merged-heads site (``baddbmm``'s first argument), None if it has none
    or it is broadcast over the keys (it then needs no prefix columns)."""
    scores = _eager_nodes(site.handle)[0]
    if scores.target is not aten.baddbmm.default:
        return None
    bias = scores.args[0]
    val = _val(bias)
    if val is None:
        raise UnsupportedError(f"attention site {site.name}: its score bias has no recorded shape; re-capture with torch.export")
    if val.dim() == 0 or (isinstance(val.shape[-1], int) and val.shape[-1] == 1):
        return None
    return bias


def _key_bias_root(graph: fx.Graph, bias: fx.Node, site: str) -> tuple[fx.Node, bool]:
    """Where a key bias numbers its keys: (the model's 2-D mask its ``cumsum`` counts, True) or (the ``arange``
    over the keys, False). Raises when it is neither, before the pass changes anything."""
    ancestors = _ancestors([bias])
    cumsum = next((n for n in graph.nodes if n in ancestors and n.target is aten.cumsum.default), None)
    if cumsum is not None:
        root = cumsum.args[0]
        # Back to the model's 2-D mask itself, so the sizes the chain reads from it (sym_size) follow the padding.
        while isinstance(root, fx.Node) and root.target in _CONVERSIONS:
            root = root.args[0]
        val = _val(root)
        if val is None or val.dim() != 2:
            raise UnsupportedError(
                f"attention site {site}: its score bias counts positions with a cumsum of something other than a "
                "[batch, keys] mask, so lora_fx cannot number the prefix keys as PEFT's cache does; use LoRA (LoraConfig)"
            )
        return root, True
    k = _val(bias).shape[-1]
    aranges = [n for n in graph.nodes if n in ancestors and n.target in _ARANGES and _counts_keys(n, k)]
    if len(aranges) != 1:
        raise UnsupportedError(
            f"attention site {site} adds a bias over its keys (shape {tuple(_val(bias).shape)}) that lora_fx cannot "
            "recompute for the prefix keys (no cumsum of a mask and no single arange numbering the keys); use "
            "LoRA (LoraConfig) on this model"
        )
    return aranges[0], False


def _widened_key_bias(graph: fx.Graph, bias: fx.Node, T: int, site: str) -> fx.Node:
    """``bias`` (a ``[.., k]`` score term numbering the keys: Bloom's ALiBi) recomputed for T prefix keys in front.

    PEFT's cache of T prefixes makes the model number its keys from a mask with T ones in front (ALiBi from
    ``cumsum(mask) - 1``: prefix key t gets ``slope * t``, real key j ``slope * (T + cumsum_j - 1) * mask_j``) or,
    without a mask, from ``arange(T + k)``. The nodes from that mask (or arange) to ``bias`` are copied with the mask
    padded by T ones (the arange lengthened by T), sizes read from the mask following it."""
    ancestors = _ancestors([bias])
    root, is_mask = _key_bias_root(graph, bias, site)
    with graph.inserting_before(bias.next):
        if is_mask:
            start = _call(graph, bias, aten.constant_pad_nd.default, root, [T, 0], 1)
        else:
            end = root.args[0] if root.target is aten.arange.default else root.args[1]
            longer = end + T if isinstance(end, int) else _call(graph, bias, operator.add, end, T)
            if root.target is aten.arange.default:
                start = _call(graph, bias, aten.arange.default, longer, **root.kwargs)
            else:
                start = _call(graph, bias, root.target, root.args[0], longer, *root.args[2:], **root.kwargs)
        env: dict[fx.Node, fx.Node] = {root: start}
        for n in list(graph.nodes):
            if n is start:
                break
            if n in ancestors and n not in env and any(a in env for a in n.all_input_nodes):
                copy = graph.node_copy(n, lambda a: env.get(a, a))
                copy.meta[INSERTED] = True
                # The copy has T more keys: the traced shapes of the original would mislead later passes.
                copy.meta.pop("val", None)
                copy.meta.pop("tensor_meta", None)
                env[n] = copy
    return env[bias]


def _counts_keys(node: fx.Node, k: Any) -> bool:
    """Whether an arange numbers the keys: from 0 (a slope table's arange starts at 1) over the key axis's length."""
    val = _val(node)
    if val is None or val.dim() != 1 or str(val.shape[0]) != str(k):
        return False
    return node.target is aten.arange.default or node.args[0] == 0


def _pad_path_masks(graph: fx.Graph, scores: fx.Node, path: Sequence[fx.Node], T: int) -> None:
    """Give the masks joining the scores between ``scores`` and the softmax T visible columns in front."""
    on_path = set(path) | {scores}
    for n in path:
        if n.target is aten.add.Tensor:
            i = next((i for i, a in enumerate(n.args[:2]) if isinstance(a, fx.Node) and a not in on_path and _val(a) is not None and _val(a).dim() >= 2), None)
            if i is None:
                continue
            with graph.inserting_before(n):
                padded = _pad_mask(graph, n, n.args[i], T, visible=True)
                rb = relative_bias(n.args[i])
                if rb is not None:
                    # PEFT's cache gives the prefix keys their real relative-position bias, not 0.
                    padded = _call(graph, n, aten.add.Tensor, padded, _prefix_bias(graph, n, rb, T, n.args[i]))
            n.args = tuple(padded if j == i else a for j, a in enumerate(n.args))
        elif n.target is aten.where.self:
            with graph.inserting_before(n):
                padded = _pad_mask(graph, n, n.args[0], T, visible=True)
            n.args = (padded,) + tuple(n.args[1:])
        elif n.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            with graph.inserting_before(n):
                padded = _pad_mask(graph, n, n.args[1], T, visible=False)
            n.args = (n.args[0], padded) + tuple(n.args[2:])


def _pad_mask(graph: fx.Graph, anchor: fx.Node, mask: fx.Node, T: int, *, visible: bool) -> fx.Node:
    """``mask`` with T columns in front on its key axis: True/0.0 where ``visible`` means "attend"."""
    val = _val(mask)
    if val is None:
        raise UnsupportedError(f"attention at {anchor.name}: the mask has no recorded shape; re-capture with torch.export")
    if val.dim() == 0 or (isinstance(val.shape[-1], int) and val.shape[-1] == 1):
        # A mask broadcast over the key axis: it says nothing per key, so the prefixes need no column.
        return mask
    if val.dtype == torch.bool:
        fill: Any = bool(visible)
    else:
        fill = 0.0 if visible else 1.0
    return _call(graph, anchor, aten.constant_pad_nd.default, mask, [T, 0], fill)


def _device(node: fx.Node) -> torch.device:
    val = _val(node)
    return val.device if val is not None else torch.device("cpu")


def _call(graph: fx.Graph, like: fx.Node | None, op: Any, *args: Any, **kwargs: Any) -> fx.Node:
    n = graph.call_function(op, args, kwargs)
    n.meta[INSERTED] = True
    if like is not None:
        n.meta["nn_module_stack"] = like.meta.get("nn_module_stack", {})
    return n


def _site_param(gm: fx.GraphModule) -> torch.Tensor:
    """A floating-point parameter of the model: the prefixes take its dtype and device."""
    for p in gm.parameters():
        if p.is_floating_point():
            return p
    return torch.empty(0)


def _module_at(gm: fx.GraphModule, path: str) -> torch.nn.Module:
    from lora_fx.passes.fx.insert_lora import _module_at as module_at

    return module_at(gm, path)


def _reaches_position_use(node: fx.Node, limit: int = 40) -> bool:
    """Whether ``node``'s values flow into rotary cos/sin or an embedding's indices (and not into a mask)."""
    seen, stack, hit = set(), [node], False
    while stack and len(seen) < limit:
        n = stack.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            if user.target in (aten.cos.default, aten.sin.default):
                hit = True
            elif user.target is aten.embedding.default and user.args[1] is n:
                hit = True
            elif user.target is aten.index.Tensor and _is_table(user.args[0]) and n in user.args[1]:
                hit = True  # rows of a precomputed sin/cos table (GPT-J's embed_positions[position_ids])
            elif user.target in _STOP or user.target in _SOFTMAX_OPS:
                continue
            elif user.target in (aten.le.Tensor, aten.lt.Tensor, aten.ge.Tensor, aten.gt.Tensor, aten.index.Tensor):
                # A mask computation: positions here are relative and must not move.
                return False
            else:
                stack.append(user)
    return hit


def _is_table(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _relative_aranges(graph: fx.Graph) -> set[fx.Node]:
    """The aranges numbering key and query positions of a relative position bias (``memory - context``)."""
    out: set[fx.Node] = set()
    for n in graph.nodes:
        if n.target is aten.embedding.default and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr":
            sub = _relative_sub(n.args[1])
            if sub is None:
                continue
            stack = list(sub.args)
            while stack:
                a = stack.pop()
                if isinstance(a, fx.Node):
                    if a.target in _ARANGES:
                        out.add(a)
                    else:
                        stack.extend(a.all_input_nodes)
    return out


def position_sources(graph: fx.Graph) -> list[fx.Node]:
    """The nodes holding the real tokens' positions: aranges into rotary or position embeddings,
    slices of a ``position_ids`` buffer, a ``position_ids`` input, and running counts of real tokens
    (``cumsum`` of a mask, as OPT and RoBERTa number positions) into a position embedding."""
    out = []
    relative = _relative_aranges(graph)
    for n in graph.nodes:
        if n.meta.get(INSERTED):
            continue
        if n.op == "placeholder" and n.name == "position_ids":
            out.append(n)
        elif n.op == "call_function" and n.target in (aten.arange.default, aten.arange.start, aten.arange.start_step,
                                                      aten.cumsum.default):
            # PEFT's cache of T prefixes makes these count from T: OPT takes the cumsum of a mask with T
            # ones in front, RoBERTa adds the cache length to its cumsum; both are the cumsum + T.
            # Positions of a relative bias (T5) stay: the prefix columns of the bias carry the shift.
            if _reaches_position_use(n) and n not in relative:
                out.append(n)
        elif n.op == "call_function" and n.target is aten.slice.Tensor:
            src = n.args[0]
            if isinstance(src, fx.Node) and src.op == "get_attr" and str(src.target).endswith("position_ids"):
                out.append(n)
    return out


def offset_positions(graph: fx.Graph, T: int, keep: set[fx.Node] | frozenset = frozenset()) -> list[str]:
    """Add T to every position source but those in ``keep`` (an encoder's, which PEFT's cache never reaches):
    under PEFT the cache of T prefixes puts real tokens at T .. T+n-1."""
    changed = []
    for n in position_sources(graph):
        if n in keep:
            continue
        with graph.inserting_after(n):
            shifted = _call(graph, n, aten.add.Tensor, n, T)
        n.replace_all_uses_with(shifted, delete_user_cb=lambda user: user is not shifted)
        changed.append(f"positions:{n.name}")
    return changed


def select_prefix_sites(sites: Sequence[Site], config: PrefixConfig) -> tuple[list[Site], dict[str, int] | None]:
    """The attention sites PEFT's prefix-tuning reaches that ``config`` selects, and (encoder-decoder models)
    the block of PEFT's ``prompt_embeddings`` each reads."""
    chosen = select_attention_sites(sites, config)
    chosen, blocks = peft_prefix_sites(sites, chosen, explicit=config.target_modules is not None)
    _check_submodules(config, blocks)
    return chosen, blocks


def peft_num_layers(sites: Sequence[Site], chosen: Sequence[Site], blocks: dict[str, int] | None) -> int:
    """PEFT's ``num_layers`` for these prefixed sites: the number of blocks in ``prompt_embeddings``. An
    encoder-decoder model sizes them by its encoder (BART's and T5's ``num_hidden_layers``), however many
    decoder layers read them; other models by the prefixed sites."""
    if not blocks:
        return len(chosen)
    roles = seq2seq_roles(sites)
    return len(roles.encoder) if roles is not None else len(chosen)


def _check_submodules(config: PrefixConfig, blocks: dict[str, int] | None) -> None:
    want = config.num_transformer_submodules
    if want is not None and want != (2 if blocks else 1):
        raise AdapterError(
            f"this prefix-tuning config has num_transformer_submodules={want} (PEFT's "
            f"{'encoder-decoder' if want == 2 else 'decoder-only / encoder-only'} layout), but the model is "
            f"{'an encoder-decoder' if blocks else 'not an encoder-decoder'}; "
            "was the adapter trained on another model?"
        )


def insert_prefix(gm: fx.GraphModule, config: PrefixConfig, sites: Sequence[Site] | None = None) -> PassResult:
    chosen, blocks = select_prefix_sites(find_sites(gm) if sites is None else sites, config)
    return InsertPrefix(config, chosen, blocks)(gm)


def _task_type(model_class: str) -> str:
    if model_class.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if model_class.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if model_class.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return "FEATURE_EXTRACTION"


def apply_prefix(gm: fx.GraphModule, config: PrefixConfig) -> fx.GraphModule:
    """``lora_fx.apply(gm, PrefixConfig(...))``: insert the prefixes, freeze everything else."""
    from lora_fx.passes.fx.freeze_base import freeze_base

    if not isinstance(config, PrefixConfig):
        raise ConfigError(f"apply_prefix takes a PrefixConfig, got {type(config).__name__}")
    info = meta(gm)
    if info.get("lora_sites") and info.get("adapters", {}).get("default") is not None and not info.get(META_PREFIX):
        raise AdapterError("this model already holds a LoRA adapter; apply prefix-tuning to a fresh capture")
    insert_prefix(gm, config)
    rec = info[META_PREFIX]
    if rec.get("num_transformer_submodules") == 2:
        config.num_transformer_submodules = 2
        if config.task_type is None:
            config.task_type = "SEQ_2_SEQ_LM"
    shapes = {(s["kv_heads"], s["head_dim"]) for s in rec["sites"].values()}
    if len(shapes) == 1:
        kv, hd = next(iter(shapes))
        # Record what PEFT records for this model, so the saved config loads in PEFT unchanged.
        config.token_dim = config.token_dim or kv * hd
        config.num_attention_heads = config.num_attention_heads or kv
        config.num_layers = config.num_layers or rec.get("num_blocks", len(rec["sites"]))
        config.encoder_hidden_size = config.encoder_hidden_size or config.token_dim
    if config.task_type is None:
        # PEFT only injects prefixes through a task-specific PeftModel; a file without task_type loads as a no-op.
        config.task_type = _task_type(str(info.get("model_class") or ""))
    if config.base_model_name_or_path is None and info.get("name_or_path"):
        config.base_model_name_or_path = info["name_or_path"]
    freeze_base(gm)
    info.setdefault("adapters", {})["default"] = config
    return gm


__all__ = ["InsertPrefix", "PrefixEncoder", "PrefixSite", "Seq2SeqRoles", "apply_prefix", "describe", "insert_prefix", "offset_positions",
           "position_sources", "relative_bias", "select_attention_sites", "select_prefix_sites", "seq2seq_roles"]
