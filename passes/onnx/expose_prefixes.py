"""Make the key/value prefixes of an ONNX model swappable: graph inputs with their trained defaults.

Prefixes cannot be folded into weights, so a deployed prefix-tuned model keeps them as ONNX Runtime
adapter slots, like LoRA's (``passes/onnx/expose_adapters.py``): each ``<site>.prefix_key`` /
``<site>.prefix_value`` ``[kv_heads, T, head_dim]`` initializer becomes a graph input that keeps
a same-named initializer as its default, so a run without an adapter uses the prefixes the model
was exported with, and ``RunOptions.add_active_adapter`` (or a feed of that name) swaps them per
request. T stays static: every adapter for one exported file has the same number of virtual tokens.
The model also gets the ``lora_fx.prefix`` record ``insert_prefix`` writes, so ``fold_lora`` refuses it.
Sites that share one prefix initializer (an encoder-decoder's decoder layers reading one block of PEFT's
SEQ_2_SEQ_LM embeddings) name it in their records; it becomes one graph input.
The parameters of modules trained in full beside the prefixes (``modules_to_save``, the SEQ_CLS head) become
slots as LoRA's do (``expose_adapters._expose_saved``): under their model names, defaulting to their base values
(what PEFT runs for an adapter that does not train them), listed in the ``lora_fx.modules_to_save`` metadata.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import onnx_ir as ir

from lora_fx.errors import AdapterError
from lora_fx.passes.onnx.insert_prefix import PREFIX_KEY, prefix_metadata
from lora_fx.passes.result import PassResult

_NAME = re.compile(r"^(?P<site>.+)\.prefix_(?P<which>key|value)$")


def _natural(name: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def record_prefixes(model: ir.Model) -> dict:
    """The ``lora_fx.prefix`` record, built from the prefix initializers when the model has none
    (a torch graph exported with ``torch.onnx.export`` keeps the parameter names, not the record)."""
    record = prefix_metadata(model)
    if record:
        return record
    sites: dict[str, dict] = {}
    T = None
    for name, value in model.graph.initializers.items():
        m = _NAME.match(name)
        if m is None or value.shape is None or len(value.shape) != 3:
            continue
        kv, t, hd = (int(d) for d in value.shape)
        if T is not None and t != T:
            raise AdapterError(f"prefix initializers disagree on the number of virtual tokens ({T} and {t} at {name})")
        T = t
        rec = sites.setdefault(m["site"], {"kv_heads": kv, "head_dim": hd})
        rec[m["which"]] = name
    incomplete = [s for s, rec in sites.items() if "key" not in rec or "value" not in rec]
    if incomplete:
        raise AdapterError(f"sites {incomplete} have a key or a value prefix but not both")
    if not sites:
        return {}
    # Layer order, which PEFT's prompt_embeddings blocks follow: numbers in names compare as numbers (h.2 before h.10).
    record = {"num_virtual_tokens": T, "sites": dict(sorted(sites.items(), key=lambda kv: _natural(kv[0])))}
    model.metadata_props[PREFIX_KEY] = json.dumps(record)
    return record


class ExposePrefixes:
    """Turn each recorded prefix initializer into a graph input defaulting to that initializer.

    Matches the initializers named in ``lora_fx.prefix`` (or, without the record, every initializer
    named ``<site>.prefix_key`` / ``<site>.prefix_value`` of shape ``[kv_heads, T, head_dim]``).
    Prefixes that are graph inputs already are left alone. ``saved`` (``{parameter name: (module, base value)}``):
    parameters of modules trained in full, each an initializer of that name, made inputs defaulting to the base
    value; ``changed`` names them by module.
    """

    def __init__(self, saved: Mapping[str, tuple[str, Any]] | None = None) -> None:
        self.saved = dict(saved or {})

    def __call__(self, model: ir.Model) -> PassResult:
        from lora_fx.passes.onnx.expose_adapters import _expose_saved

        record = record_prefixes(model)
        if not record:
            raise AdapterError("this model has no prefixes to expose; apply a PrefixConfig before exporting")
        graph = model.graph
        inputs = {v.name for v in graph.inputs}
        changed = []
        for site, rec in record["sites"].items():
            for which in ("key", "value"):
                name = rec[which]
                value = graph.initializers.get(name)
                if value is None:
                    raise AdapterError(f"prefix initializer {name} of site {site} is missing from the graph")
                if name in inputs:
                    continue  # an input already, or the one initializer of sites sharing a prefix
                graph.inputs.append(value)
                inputs.add(name)
                changed.append(name)
        changed += _expose_saved(model, self.saved)
        return PassResult(model, bool(changed), changed)


def expose_prefixes(model: ir.Model, saved: Mapping[str, tuple[str, Any]] | None = None) -> PassResult:
    return ExposePrefixes(saved)(model)
