"""Export of a prefix-tuned GraphModule: ONNX with the prefixes as swappable slots, plus adapter files.

``lora_fx.export_onnx(gm, path, kwargs=..., mode="adapters")`` lands here when the model holds
prefixes. A reparameterized model (``prefix_projection``) is exported with its prefixes folded
(the export runs on a copy; ``gm`` keeps training its encoder). The file gets the prefixes as graph
inputs with their trained values as defaults (``passes/onnx/expose_prefixes``); beside it,
``<stem>.adapters/<name>.onnx_adapter`` holds the same tensors for ONNX Runtime's adapter API and
``<stem>.adapters/<name>/`` the PEFT-format adapter (not written, with a warning, for prefixes on some layers
only: PEFT's prefix-tuning has no per-layer targets). Modules trained in full beside the prefixes
(``modules_to_save``, the SEQ_CLS head) become slots too, under their model names and defaulting to their
base values, as in LoRA's served export; their trained values go into both adapter files.

The file's ``lora_fx.prefix`` record lists the sites in the torch graph's layer order. Sites that share
one parameter (an encoder-decoder's decoder layers reading one block of PEFT's SEQ_2_SEQ_LM embeddings)
export as one initializer, named after one of them: every such site's record names that initializer, and
the record keeps each site's ``block``, ``num_blocks`` and ``num_transformer_submodules``.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def export_prefix_onnx(
    gm: Any,
    path: str | os.PathLike,
    kwargs: dict[str, Any],
    *,
    adapter_name: str = "default",
    optimize: bool = True,
    peft_dir: bool = True,
    custom_translation_table: dict | None = None,
) -> Any:
    from lora_fx.export import ExportMode, ExportResult, _saved_slots, adapters_dir, optimize_keeping_slots, save_model, to_onnx_ir
    from lora_fx.export import ignore_leafspec_warning
    from lora_fx.onnx_adapter import SUFFIX, OnnxAdapter, check_writable, stamp_fingerprint, trained_values, write_onnx_adapter
    from lora_fx.passes.fx.capture import meta
    from lora_fx.passes.fx.fold_prefix import fold_prefix
    from lora_fx.passes.fx.set_training_mode import set_training_mode
    from lora_fx.passes.onnx.expose_prefixes import expose_prefixes
    from lora_fx.passes.onnx.insert_prefix import PREFIX_CONFIG_KEY, PREFIX_KEY, prefix_metadata

    info = meta(gm)
    config = info.get("adapters", {}).get("default")
    if peft_dir:
        from lora_fx.prefix_adapters import fx_subset_reason

        skipped = fx_subset_reason(gm)
        if skipped:
            # The exported model and its .onnx_adapter hold any subset of layers; only PEFT's format cannot.
            warnings.warn(f"no PEFT directory written: {skipped}. The exported model and {adapter_name}.onnx_adapter "
                          "hold the prefixes (peft_dir=False says this is wanted); for a PEFT adapter, apply "
                          "PrefixConfig without target_modules", stacklevel=3)
            peft_dir = False
    work = gm
    if info["prefix"].get("projection") or info.get("training"):
        with warnings.catch_warnings():
            ignore_leafspec_warning()
            work = copy.deepcopy(gm)
        fold_prefix(work)
        set_training_mode(work, False)  # export what inference runs: dropout off
    model = to_onnx_ir(work, dict(kwargs), custom_translation_table)
    model.metadata_props[PREFIX_KEY] = json.dumps(_onnx_record(work, model))
    saved = _saved_slots(gm)
    # Read before the slots take the base values as defaults.
    heads = trained_values(model, saved, "save the adapter with lora_fx.save_adapter instead")
    expose_prefixes(model, saved)
    if config is not None:
        model.metadata_props[PREFIX_CONFIG_KEY] = config.to_json()
    if optimize:
        optimize_keeping_slots(model)
    record = prefix_metadata(model)
    fingerprint = stamp_fingerprint(model)
    tensors = {}
    for rec in record["sites"].values():
        for which in ("key", "value"):
            value = model.graph.initializers[rec[which]]
            tensors[rec[which]] = np.ascontiguousarray(value.const_value.numpy())
    tensors.update(heads)
    path = Path(path)
    result = ExportResult(path, ExportMode.ADAPTERS, sites=sorted(record["sites"]), fingerprint=fingerprint)
    adapter = OnnxAdapter(tensors, fingerprint=fingerprint, sites=record["sites"], config=config.to_dict() if config else None)
    check_writable(adapter)  # before any file: a refused adapter (NaN after a diverged run) must not leave a model behind
    from lora_fx.adapters import save_adapter
    from lora_fx.files import write_with_adapters

    out_dir = adapters_dir(path)

    def write_adapters(stage: Any) -> None:
        write_onnx_adapter(stage.path(f"{adapter_name}{SUFFIX}"), adapter)
        if peft_dir:
            save_adapter(gm, stage.path(adapter_name))

    # The adapter files first, staged, then the model: a failure leaves no model without its adapters.
    write_with_adapters(model, path, out_dir, write_adapters, save_model)
    result.adapter_paths.append(out_dir / f"{adapter_name}{SUFFIX}")
    if peft_dir:
        result.peft_dirs.append(out_dir / adapter_name)
    return result


def _onnx_record(gm: Any, model: Any) -> dict[str, Any]:
    """The ``lora_fx.prefix`` record of the exported file, from the torch graph's: each site with the names of
    the initializers holding its prefixes (one initializer for sites sharing a parameter)."""
    from lora_fx.errors import AdapterError
    from lora_fx.passes.fx.capture import meta
    from lora_fx.passes.fx.insert_prefix import KEY, VALUE

    rec = meta(gm)["prefix"]
    inits = model.graph.initializers
    # torch.onnx writes a parameter registered under several module paths once, under one of those paths.
    paths: dict[int, list[str]] = {}
    for site in rec["sites"]:
        module = gm.get_submodule(site)
        for attr in (KEY, VALUE):
            paths.setdefault(id(getattr(module, attr)), []).append(f"{site}.{attr}")
    sites: dict[str, dict[str, Any]] = {}
    for site, srec in rec["sites"].items():
        module = gm.get_submodule(site)
        entry: dict[str, Any] = {"kv_heads": srec["kv_heads"], "head_dim": srec["head_dim"]}
        for which, attr in (("key", KEY), ("value", VALUE)):
            names = [n for n in paths[id(getattr(module, attr))] if n in inits]
            if len(names) != 1:
                raise AdapterError(
                    f"the exported graph holds {len(names)} initializers for the {which} prefix of site {site} "
                    f"({', '.join(names) or 'none'}); torch.onnx.export did not keep the parameter names. Export "
                    "with optimize=False, or report this model"
                )
            entry[which] = names[0]
        if "block" in srec:
            entry["block"] = srec["block"]
        sites[site] = entry
    out: dict[str, Any] = {"num_virtual_tokens": rec["num_virtual_tokens"], "sites": sites}
    if rec.get("num_transformer_submodules") == 2:
        out["num_transformer_submodules"] = 2
        out["num_blocks"] = rec.get("num_blocks", len(sites))
    return out
