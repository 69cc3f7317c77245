"""The public entry points, dispatching on the IR of the model they are given."""

from __future__ import annotations

import contextlib
import gc
from typing import Any, Iterator

import torch.fx as fx

from lora_fx.config import LoraConfig, PrefixConfig
from lora_fx.errors import AdapterError, ConfigError, LoraFxError
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


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector during a rewrite.

    A rewrite allocates many small, long-lived IR objects; each collection scans every live object,
    so with the collector on the cost per site grows with the size of the graph. Nothing a rewrite
    allocates is cyclic garbage, so pausing loses nothing.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def apply(model: Any, config: Any, *, quant: Any = None) -> Any:
    """Rewrite ``model`` with ``config`` and return it (modified in place).

    ``config`` is a ``LoraConfig`` (LoRA branches at the selected linear sites) or a
    ``PrefixConfig`` (learned key/value prefixes at attention sites); ``quant`` (a ``QuantConfig``)
    stores the frozen linear weights quantized (QLoRA). Everything but the adapters and the modules
    ``config.modules_to_save`` names (with ``task_type="SEQ_CLS"``: the classification head) is frozen.
    Works on a GraphModule from ``lora_fx.capture`` and on an onnx_ir Model from ``lora_fx.load``.
    """
    if not (isinstance(model, fx.GraphModule) or _is_onnx(model)):
        raise ConfigError(
            f"apply takes a GraphModule from lora_fx.capture(...) or a model from lora_fx.load(...), got {type(model).__name__}"
        )
    _check_config(config)
    if isinstance(model, fx.GraphModule):
        from lora_fx.passes.fx.cast_dtype import castable

        castable(model)  # gm.to(torch.bfloat16) on the result retargets the graph too
    with _gc_paused():
        return _apply(model, config, quant)


def _check_config(config: Any) -> None:
    """Refuse anything but lora_fx's LoraConfig / PrefixConfig before a pass (quantization first) runs."""
    if isinstance(config, (LoraConfig, PrefixConfig)):
        return
    if type(config).__module__.startswith("peft."):
        # peft.LoraConfig and lora_fx.LoraConfig share a name: say which one this is and how to convert.
        ours = "PrefixConfig" if type(config).__name__ == "PrefixTuningConfig" else "LoraConfig"
        raise ConfigError(
            f"apply takes lora_fx's configs, got peft's {type(config).__name__}; convert it with "
            f"lora_fx.{ours}.from_dict(config.to_dict())"
        )
    raise ConfigError(f"apply takes a lora_fx.LoraConfig or lora_fx.PrefixConfig, got {type(config).__name__}")


def refuse_second_method(model: Any, config: Any) -> None:
    """One parameter-efficient method per model: LoRA onto a model that holds prefixes, or prefixes onto one that holds
    LoRA, is refused before anything changes (quantization included). No export holds both (prefixes cannot be
    folded into weights, and one adapter file or PEFT folder holds one method), so such a model could be trained but
    never saved or served."""
    if isinstance(model, fx.GraphModule):
        from lora_fx.passes.fx.capture import meta

        info = meta(model)
        prefixes, lora = bool(info.get("prefix")), bool(info.get("lora_sites"))
        fresh = "a fresh capture (lora_fx.capture)"
    else:
        from lora_fx.passes.onnx.insert_prefix import prefix_metadata
        from lora_fx.passes.onnx.lora_layout import read_records

        prefixes, lora = bool(prefix_metadata(model)), bool(read_records(model))
        fresh = "the original file (lora_fx.load / lora-fx rewrite of the model before this rewrite)"
    held = "prefix-tuning prefixes" if prefixes and isinstance(config, LoraConfig) else (
        "LoRA adapters" if lora and isinstance(config, PrefixConfig) else None)
    if held is not None:
        wanted = "LoRA" if isinstance(config, LoraConfig) else "prefix-tuning"
        raise AdapterError(f"this model already holds {held}: {wanted} on top of them could be trained but never exported "
                           "or saved (prefixes cannot be folded into weights, and one adapter holds one method); apply "
                           f"{wanted} to {fresh} instead")


def _apply(model: Any, config: Any, quant: Any) -> Any:
    ir_name = "fx" if isinstance(model, fx.GraphModule) else "onnx"
    refuse_second_method(model, config)
    if quant is not None and isinstance(config, LoraConfig) and config.target_modules is not None:
        # Quantizing changes the model in place: a target that matches nothing (a typo) must be refused
        # before, not after, or the caller is left with a quantized model and no adapter. Site names
        # survive quantization, so the selection made now is the one made after it.
        select_targets(find_sites(model), config, modules=_module_tree(model))
    if quant is not None and isinstance(config, LoraConfig) and config.modules_to_save:
        _refuse_quantized_modules_to_save(model, config, quant, ir_name)
    if quant is not None and isinstance(config, PrefixConfig):
        heads = _prefix_heads_config(model, config) if ir_name == "fx" else config
        if heads.modules_to_save:
            _refuse_quantized_modules_to_save(model, heads, quant, ir_name)
    if quant is not None:
        # QLoRA: quantize first so the adapter branches attach to the dequantized weights' sites.
        from importlib import import_module

        import_module(f"lora_fx.passes.{ir_name}.quantize_weights").apply_quant(model, quant, config)
    if isinstance(config, LoraConfig):
        if ir_name == "fx":
            return _apply_fx(model, config)
        from lora_fx.passes.onnx.insert_lora import apply_lora

        return apply_lora(model, config)
    if type(config).__name__ == "PrefixConfig":
        if ir_name == "fx":
            return _apply_prefix_fx(model, config)
        return _apply_prefix_onnx(model, config)
    raise AssertionError("unreachable: _check_config admits LoraConfig and PrefixConfig only")


def _refuse_quantized_modules_to_save(model: Any, config: LoraConfig, quant: Any, ir_name: str) -> None:
    """A module trained in full (``modules_to_save``) needs float weights: refuse one quantization would pack, and
    one an ONNX model cannot train (already quantized in the file), before quantizing changes the model."""
    from lora_fx.targeting import select_modules_to_save

    tree = _module_tree(model)
    if ir_name == "onnx":  # also the modules an ONNX module tree leaves out (TorchScript records no Linear)
        from lora_fx.passes.onnx.freeze_base import saved_module_paths

        heads = select_modules_to_save(config, saved_module_paths(model))
    else:
        heads = select_modules_to_save(config, tree)
    if not heads:
        return
    if ir_name == "onnx":
        from lora_fx.passes.onnx.freeze_base import refuse_modules_to_save

        refuse_modules_to_save(model, config)
    selector = LoraConfig(r=1, target_modules=quant.target_modules, exclude_modules=quant.exclude_modules)
    try:
        packed = [t.site.name for t in select_targets(find_sites(model), selector, modules=tree)]
    except LoraFxError:
        return  # the quantization pass reports its own selection errors
    hit = sorted(n for n in packed if any(n == h or n.startswith(f"{h}.") for h in heads))
    if hit:
        raise ConfigError(
            f"modules_to_save={config.modules_to_save!r} trains {', '.join(heads[:4])} in full, but the QuantConfig would "
            f"store {', '.join(hit[:4])} quantized; a module trained in full needs float weights: leave it out of "
            f"quantization (QuantConfig(exclude_modules={heads!r}))"
        )


def _module_tree(model: Any) -> Any:
    """The model's module tree where it is known (a captured GraphModule; an ONNX export, as far as its nodes
    describe the modules), for ``select_targets``."""
    if _is_onnx(model):
        from lora_fx.passes.onnx.find_sites import module_tree as onnx_module_tree

        return onnx_module_tree(model)
    if not isinstance(model, fx.GraphModule):
        return None
    from lora_fx.passes.fx.find_sites import module_tree

    return module_tree(model)


def _apply_fx(gm: fx.GraphModule, config: LoraConfig) -> fx.GraphModule:
    from lora_fx.passes.fx.capture import meta
    from lora_fx.passes.fx.find_sites import find_sites as fx_find_sites
    from lora_fx.passes.fx.freeze_base import freeze_base, module_parameters, record_modules_to_save
    from lora_fx.passes.fx.insert_lora import insert_lora
    from lora_fx.targeting import refuse_adapted_saved, select_modules_to_save

    info = meta(gm)
    if info.get("lora_sites"):
        # One LoraConfig per graph: a second one would leave save_adapter writing a config that does
        # not describe the tensors beside it.
        from lora_fx.errors import AdapterError

        have = sorted(info["lora_sites"])
        raise AdapterError(
            f"this model already has a LoRA adapter on {len(have)} sites ({', '.join(have[:4])}{', ...' if len(have) > 4 else ''}); "
            "apply takes one LoraConfig per captured graph: capture the model again for another config, "
            "or use load_adapter to load other trained weights into these sites"
        )
    sites = fx_find_sites(gm)
    tree = _module_tree(gm)
    targets = select_targets(sites, config, model_type=info.get("model_type"), modules=tree)
    # Checked before the graph changes: a refused module leaves the model as it was.
    saved = select_modules_to_save(config, tree)
    refuse_adapted_saved(targets, saved)
    module_parameters(gm, saved)
    insert_lora(gm, targets, dropout=config.lora_dropout, init=config.init_lora_weights)
    record_modules_to_save(gm, saved)
    freeze_base(gm)
    if config.base_model_name_or_path is None and info.get("name_or_path"):
        config.base_model_name_or_path = info["name_or_path"]
    info.setdefault("adapters", {})["default"] = config
    return gm


def _apply_prefix_fx(gm: fx.GraphModule, config: PrefixConfig) -> fx.GraphModule:
    """The prefixes, and the modules ``config.modules_to_save`` names trained in full beside them (with
    ``task_type="SEQ_CLS"``, given or found from the model class: the classification head, as PEFT trains it)."""
    from lora_fx.config import with_task_heads
    from lora_fx.passes.fx.freeze_base import freeze_base, module_parameters, record_modules_to_save
    from lora_fx.passes.fx.insert_prefix import apply_prefix
    from lora_fx.targeting import select_modules_to_save

    saved = select_modules_to_save(_prefix_heads_config(gm, config), _module_tree(gm))
    module_parameters(gm, saved)
    apply_prefix(gm, config)
    config.modules_to_save = with_task_heads(config.task_type, config.modules_to_save)
    record_modules_to_save(gm, saved)
    freeze_base(gm)
    return gm


def _prefix_heads_config(gm: fx.GraphModule, config: PrefixConfig) -> PrefixConfig:
    """``config`` with the task type ``apply_prefix`` will find when it has none (SEQ_CLS for a
    *ForSequenceClassification): it goes into the saved config, and PEFT then trains the head, so the head's modules
    are chosen and checked before the graph changes."""
    import dataclasses

    from lora_fx.passes.fx.capture import meta
    from lora_fx.passes.fx.insert_prefix import _task_type

    task = config.task_type or _task_type(str(meta(gm).get("model_class") or ""))
    return dataclasses.replace(config, task_type=task) if task != config.task_type else config


def _apply_prefix_onnx(model: Any, config: PrefixConfig) -> Any:
    """The prefixes, and the modules ``config.modules_to_save`` names (``task_type="SEQ_CLS"``: the head) trained in
    full beside them, as ``apply_lora`` trains them (``passes/onnx/freeze_base``)."""
    import dataclasses

    from lora_fx.passes.fx.insert_prefix import _task_type
    from lora_fx.passes.onnx.find_sites import model_class
    from lora_fx.passes.onnx.freeze_base import plan_modules_to_save, record_modules_to_save
    from lora_fx.passes.onnx.insert_prefix import apply_prefix

    cls = model_class(model) if config.task_type is None else None
    if cls is not None:
        # As on the FX front end: PEFT injects prefixes only through a task's PeftModel, so the saved config needs one.
        config = dataclasses.replace(config, task_type=_task_type(cls))
    plan_modules_to_save(model, config)  # refused before the graph changes
    apply_prefix(model, config)
    record_modules_to_save(model, plan_modules_to_save(model, config))
    return model
