"""lora_fx: parameter-efficient fine-tuning as graph rewriting.

Passes find the linear and attention sites of a ``torch.export`` graph or an ONNX file and rewrite
them into LoRA subgraphs; training runs through the rewritten graph; adapters are saved in PEFT's
format.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first use (__getattr__ below)
    from lora_fx.adapters import load_adapter, save_adapter
    from lora_fx.api import apply, find_sites
    from lora_fx.config import InitLoraWeights, LoraConfig, PrefixConfig, QuantConfig, QuantDType
    from lora_fx.errors import (
        AdapterError,
        CaptureError,
        ConfigError,
        LoraFxError,
        ModelLoadError,
        TargetNotFoundError,
        TrainingDivergedError,
        UnsupportedError,
    )
    from lora_fx.onnx_model import load, save
    from lora_fx.export import ExportMode, export_onnx
    from lora_fx.passes.fx.capture import capture
    from lora_fx.runtime.train import TrainResult, train
    from lora_fx.sites import Site, SiteKind
    from lora_fx.targeting import Target, select_targets

# The public names and the modules they come from. They load on first use, not when the package is imported: the
# ``lora-fx`` command imports ``lora_fx.cli`` (a module of this package) and must be able to handle Ctrl-C before
# torch and onnx load (seconds), and ``lora-fx --help`` should not wait for them.
_EXPORTS: dict[str, str] = {
    "load_adapter": "lora_fx.adapters", "save_adapter": "lora_fx.adapters",
    "apply": "lora_fx.api", "find_sites": "lora_fx.api",
    **dict.fromkeys(["InitLoraWeights", "LoraConfig", "PrefixConfig", "QuantConfig", "QuantDType"], "lora_fx.config"),
    **dict.fromkeys(["AdapterError", "CaptureError", "ConfigError", "LoraFxError", "ModelLoadError",
                     "TargetNotFoundError", "TrainingDivergedError", "UnsupportedError"], "lora_fx.errors"),
    "load": "lora_fx.onnx_model", "save": "lora_fx.onnx_model",
    "ExportMode": "lora_fx.export", "export_onnx": "lora_fx.export",
    "capture": "lora_fx.passes.fx.capture",
    "TrainResult": "lora_fx.runtime.train", "train": "lora_fx.runtime.train",
    "Site": "lora_fx.sites", "SiteKind": "lora_fx.sites",
    "Target": "lora_fx.targeting", "select_targets": "lora_fx.targeting",
}


def _load_all() -> None:
    """Import every module the public names come from, in the order the package once imported them eagerly, so
    that a submodule reached by attribute finds the package as it always was (``lora_fx.passes.fx`` loaded too)."""
    for module in dict.fromkeys(_EXPORTS.values()):
        importlib.import_module(module)


def __getattr__(name: str) -> Any:
    """A public name (``lora_fx.LoraConfig``), loaded from its module on first use; or a submodule not imported
    yet (``lora_fx.passes``)."""
    if name in _EXPORTS:
        # only the name's own module: another module of the package may be asking, half imported itself
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name.startswith("__"):  # dunder probes (copy, pickle, doctest) must not import torch
        raise AttributeError(f"module 'lora_fx' has no attribute {name!r}")
    _load_all()
    if name in globals():
        return globals()[name]
    try:
        return importlib.import_module(f"lora_fx.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"lora_fx.{name}":
            raise
        raise AttributeError(f"module 'lora_fx' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"

__all__ = [
    "AdapterError", "CaptureError", "ConfigError", "InitLoraWeights", "LoraConfig", "LoraFxError",
    "ModelLoadError", "PrefixConfig", "QuantConfig", "QuantDType", "Site", "SiteKind", "Target", "TargetNotFoundError", "TrainingDivergedError", "TrainResult",
    "UnsupportedError", "apply", "capture", "find_sites", "load_adapter", "save_adapter",
    "ExportMode", "export_onnx",
    "select_targets", "train",
]
__all__ += ["load", "save"]
