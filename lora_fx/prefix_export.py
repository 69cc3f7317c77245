"""Export of a prefix-tuned GraphModule: ONNX with the prefixes as swappable slots, plus adapter files.

``lora_fx.export_onnx(gm, path, kwargs=..., mode="adapters")`` lands here when the model holds
prefixes. A reparameterized model (``prefix_projection``) is exported with its prefixes folded
(the export runs on a copy; ``gm`` keeps training its encoder). The file gets the prefixes as graph
inputs with their trained values as defaults (``passes/onnx/expose_prefixes``); beside it,
``<stem>.adapters/<name>.onnx_adapter`` holds the same tensors for ONNX Runtime's adapter API and
``<stem>.adapters/<name>/`` the PEFT-format adapter.
"""

from __future__ import annotations

import copy
import os
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
    from lora_fx.export import ExportMode, ExportResult, adapters_dir, optimize_keeping_slots, save_model, to_onnx_ir
    from lora_fx.onnx_adapter import SUFFIX, OnnxAdapter, stamp_fingerprint, write_onnx_adapter
    from lora_fx.passes.fx.capture import meta
    from lora_fx.passes.fx.fold_prefix import fold_prefix
    from lora_fx.passes.fx.set_training_mode import set_training_mode
    from lora_fx.passes.onnx.expose_prefixes import expose_prefixes
    from lora_fx.passes.onnx.insert_prefix import PREFIX_CONFIG_KEY, prefix_metadata

    info = meta(gm)
    config = info.get("adapters", {}).get("default")
    work = gm
    if info["prefix"].get("projection") or info.get("training"):
        work = copy.deepcopy(gm)
        fold_prefix(work)
        set_training_mode(work, False)  # export what inference runs: dropout off
    model = to_onnx_ir(work, dict(kwargs), custom_translation_table)
    expose_prefixes(model)
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
    path = Path(path)
    result = ExportResult(path, ExportMode.ADAPTERS, sites=sorted(record["sites"]), fingerprint=fingerprint)
    save_model(model, path)
    out_dir = adapters_dir(path)
    adapter = OnnxAdapter(tensors, fingerprint=fingerprint, sites=record["sites"], config=config.to_dict() if config else None)
    result.adapter_paths.append(write_onnx_adapter(out_dir / f"{adapter_name}{SUFFIX}", adapter))
    if peft_dir:
        from lora_fx.adapters import save_adapter

        result.peft_dirs.append(save_adapter(gm, out_dir / adapter_name))
    return result
