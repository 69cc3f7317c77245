"""Typed configs with PEFT's field names and meanings, round-tripping to JSON.

``LoraConfig`` reads and writes PEFT's ``adapter_config.json`` so an adapter trained in PEFT loads
here and ours loads in PEFT. Fields PEFT has that lora_fx does not implement are refused when they
are set to a non-default value, rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_fx.errors import ConfigError

ADAPTER_CONFIG_NAME = "adapter_config.json"


class InitLoraWeights(enum.Enum):
    """How A and B start. PEFT spells these ``True``, ``"gaussian"`` and ``False``."""

    KAIMING = "kaiming"  # A kaiming-uniform (a=sqrt(5)), B zero: the model starts unchanged
    GAUSSIAN = "gaussian"  # A ~ N(0, 1/r), B zero
    RANDOM = "random"  # both random (nn.Linear's default init): for tests, the output changes

    @classmethod
    def parse(cls, value: "InitLoraWeights | bool | str") -> "InitLoraWeights":
        if isinstance(value, cls):
            return value
        if value is True:
            return cls.KAIMING
        if value is False:
            return cls.RANDOM
        if isinstance(value, str):
            for member in cls:
                if member.value == value.lower():
                    return member
        raise ConfigError(
            f"init_lora_weights={value!r} is not supported; use True (kaiming-uniform A, zero B), "
            f"'gaussian' or False (both random)"
        )

    def to_peft(self) -> bool | str:
        return {InitLoraWeights.KAIMING: True, InitLoraWeights.GAUSSIAN: "gaussian", InitLoraWeights.RANDOM: False}[self]


ALL_LINEAR = "all-linear"

# PEFT fields with the value under which lora_fx behaves exactly like PEFT. Anything else is refused.
_PEFT_FIELDS_AT_DEFAULT: dict[str, Any] = {
    "use_dora": False,
    "bias": "none",
    "modules_to_save": None,
    "layer_replication": None,
    "use_qalora": False,
    "target_parameters": None,
    "trainable_token_indices": None,
    "lora_bias": False,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "megatron_config": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
}


@dataclass
class LoraConfig:
    """LoRA on linear sites, with PEFT's names and semantics.

    ``target_modules``: a list means "exact site name or dotted suffix" (``"query"`` matches
    ``encoder.layer.0.attention.self.query``); a string is a regular expression that must match the
    whole site name; ``"all-linear"`` is every linear site except the model's output layer.
    ``None`` uses PEFT's default targets for the model type when lora_fx knows it.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    init_lora_weights: InitLoraWeights = InitLoraWeights.KAIMING
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self.init_lora_weights = InitLoraWeights.parse(self.init_lora_weights)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}")
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank < 1:
                raise ConfigError(f"rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
        if not (0.0 <= float(self.lora_dropout) < 1.0):
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern):
            # PEFT refuses this combination too: the rsLoRA scale of a pattern-ranked site is ambiguous.
            raise ConfigError("use_rslora cannot be combined with rank_pattern or alpha_pattern (as in PEFT)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern only applies together with layers_to_transform")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("target_modules is an empty list: name at least one module, a regex or 'all-linear'")

    def scaling(self, r: int, alpha: float) -> float:
        """PEFT's scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # ---- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` content (loads with ``peft.LoraConfig.from_pretrained``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["init_lora_weights"] = self.init_lora_weights.to_peft()
        out["peft_type"] = "LORA"
        out.update({k: v for k, v in _PEFT_FIELDS_AT_DEFAULT.items()})
        out["inference_mode"] = True
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        data = dict(data)
        peft_type = data.pop("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise ConfigError(f"this is a {peft_type} adapter config, not LoRA; use the config class for {peft_type}")
        for key, default in _PEFT_FIELDS_AT_DEFAULT.items():
            value = data.pop(key, default)
            if value not in (default, None, {}, [], False) and value != default:
                raise ConfigError(f"PEFT option {key}={value!r} is not supported by lora_fx; only {default!r} is")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, text: str) -> "LoraConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "LoraConfig":
        """Read PEFT's ``adapter_config.json`` from an adapter directory."""
        path = Path(directory) / ADAPTER_CONFIG_NAME
        if not path.is_file():
            raise ConfigError(f"{path} not found: an adapter directory holds {ADAPTER_CONFIG_NAME} and adapter_model.safetensors")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        from lora_fx.files import atomic_write_text

        path = Path(directory) / ADAPTER_CONFIG_NAME
        atomic_write_text(path, self.to_json())
        return path
