"""lora_fx: parameter-efficient fine-tuning as graph rewriting.

Passes find the linear and attention sites of a ``torch.export`` graph or an ONNX file and rewrite
them into LoRA subgraphs; training runs through the rewritten graph; adapters are saved in PEFT's
format.
"""

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

__version__ = "0.1.0"

__all__ = [
    "AdapterError", "CaptureError", "ConfigError", "InitLoraWeights", "LoraConfig", "LoraFxError",
    "ModelLoadError", "PrefixConfig", "QuantConfig", "QuantDType", "Site", "SiteKind", "Target", "TargetNotFoundError", "TrainingDivergedError", "TrainResult",
    "UnsupportedError", "apply", "capture", "find_sites", "load_adapter", "save_adapter",
    "ExportMode", "export_onnx",
    "select_targets", "train",
]
__all__ += ["load", "save"]
