"""Fold prefix-tuning's reparameterization (embedding + MLP) into raw prefixes.

After training with ``prefix_projection=True`` the encoder is a constant function: its output, the
prefixes themselves, replaces it. The graph then holds ``<site>.prefix_key`` / ``<site>.prefix_value``
``[kv_heads, T, head_dim]`` parameters like a model trained without projection, which is what
export turns into swappable initializers and what PEFT's files store.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from lora_fx.errors import AdapterError
from lora_fx.passes.fx.capture import meta
from lora_fx.passes.fx.insert_prefix import ENCODER, KEY, META_PREFIX, PREFIXED, _module_at
from lora_fx.passes.result import PassResult


class FoldPrefix:
    """Replace the ``prefix_encoder`` subgraph by one raw key and value parameter per prefixed site.

    Matches: the nodes ``insert_prefix`` added for ``prefix_projection`` (reading
    ``prefix_encoder.*``) down to each site's ``[kv_heads, T, head_dim]`` key and value tensors.
    A model without a projection encoder is left unchanged.
    """

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        from lora_fx.prefix_adapters import current_prefixes

        rec = meta(gm).get(META_PREFIX)
        if not rec:
            raise AdapterError("this model has no prefixes to fold; apply a PrefixConfig first")
        if not rec.get("projection"):
            return PassResult(gm, False, [])
        prefixes = current_prefixes(gm)
        graph = gm.graph
        encoder_nodes = [n for n in graph.nodes if n.op == "get_attr" and str(n.target).startswith(f"{ENCODER}.")]
        # The per-site key/value tensors are the permutes the pass emitted, in site order (key, value).
        ends = [n for n in graph.nodes if n.meta.get(PREFIXED) == "prefix_source"]
        if len(ends) != 2 * len(rec["sites"]):
            raise AdapterError("the prefix encoder's outputs are not where insert_prefix put them; re-apply the PrefixConfig")
        ref = next(iter(gm.parameters()))
        changed = []
        # Sites reading one block of PEFT's SEQ_2_SEQ_LM embeddings keep sharing one parameter, as in PEFT.
        shared: dict[tuple[int, str], torch.nn.Parameter] = {}
        for i, site in enumerate(rec["sites"]):
            module = _module_at(gm, site)
            for j, name in enumerate((KEY, KEY.replace("key", "value"))):
                key = (rec["sites"][site].get("block", i), name)
                if key not in shared:
                    value = prefixes[site][j].to(device=ref.device).clone()
                    shared[key] = torch.nn.Parameter(value, requires_grad=True)
                module.register_parameter(name, shared[key])
                end = ends[2 * i + j]
                with graph.inserting_before(end):
                    attr = graph.get_attr(f"{site}.{name}")
                end.replace_all_uses_with(attr)
            changed.append(site)
        # Remove the encoder's nodes, users first.
        for node in reversed(list(graph.nodes)):
            if node.meta.get(PREFIXED) in ("prefix_source", "prefix_encoder") and not node.users:
                graph.erase_node(node)
        for node in encoder_nodes:
            if not node.users:
                graph.erase_node(node)
        delattr(gm, ENCODER)
        rec["projection"] = False
        graph.lint()
        gm.recompile()
        return PassResult(gm, True, changed)


def fold_prefix(gm: fx.GraphModule) -> PassResult:
    return FoldPrefix()(gm)
