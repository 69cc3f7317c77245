"""The public entry points, dispatching on the IR of the model they are given."""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from lora_fx.config import LoraConfig
from lora_fx.errors import ConfigError
from lora_fx.sites import Site
from lora_fx.targeting import select_targets


def _is_onnx(model: Any) -> bool:
    try:
        import onnx_ir as ir
    except ImportError:  # pragma: no cover - onnx_ir is a dependency
        return False
    return isinstance(model, ir.Model)


def find_sites(model: Any) -> list[Site]:
    """Every linear and attention site of a captured GraphModule or an onnx_ir Model."""
    if isinstance(model, fx.GraphModule):
        from lora_fx.passes.fx.find_sites import find_sites as fx_find_sites

        return fx_find_sites(model)
    if _is_onnx(model):
        from lora_fx.passes.onnx.find_sites import find_sites as onnx_find_sites

        return onnx_find_sites(model)
    raise ConfigError(
        f"find_sites takes a GraphModule from lora_fx.capture(...) or a model from lora_fx.load(...), got {type(model).__name__}"
    )


def apply(model: Any, config: LoraConfig, **options: Any) -> Any:
    """Rewrite ``model`` with ``config`` and return it (modified in place).

    For a GraphModule: LoRA branches at the selected linear sites, everything else frozen.
    For an onnx_ir Model: LoRA initializers and nodes at the selected sites.
    """
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"apply takes a LoraConfig, got {type(config).__name__}")
    if options:
        raise ConfigError(f"unknown options for apply: {', '.join(sorted(options))}")
    if isinstance(model, fx.GraphModule):
        return _apply_fx(model, config)
    if _is_onnx(model):
        from lora_fx.passes.onnx.insert_lora import apply_lora

        return apply_lora(model, config)
    raise ConfigError(
        f"apply takes a GraphModule from lora_fx.capture(...) or a model from lora_fx.load(...), got {type(model).__name__}"
    )


def _apply_fx(gm: fx.GraphModule, config: LoraConfig) -> fx.GraphModule:
    from lora_fx.passes.fx.capture import meta
    from lora_fx.passes.fx.find_sites import find_sites as fx_find_sites
    from lora_fx.passes.fx.freeze_base import freeze_base
    from lora_fx.passes.fx.insert_lora import insert_lora

    info = meta(gm)
    sites = fx_find_sites(gm)
    targets = select_targets(sites, config, model_type=info.get("model_type"))
    insert_lora(gm, targets, dropout=config.lora_dropout, init=config.init_lora_weights)
    freeze_base(gm)
    if config.base_model_name_or_path is None and info.get("name_or_path"):
        config.base_model_name_or_path = info["name_or_path"]
    info.setdefault("adapters", {})["default"] = config
    return gm
