"""Typed configs with PEFT's field names and meanings, round-tripping to JSON.

``LoraConfig`` reads and writes PEFT's ``adapter_config.json`` so an adapter trained in PEFT loads
here and ours loads in PEFT. Every field of PEFT's config class is known: fields lora_fx does not
implement are accepted at PEFT's default and refused (ConfigError) when set to anything else, rather
than silently ignored; fields that describe the file or the run (``inference_mode``, ``revision``, ...)
are accepted with any value. A key that is no PEFT field at all is dropped with a warning naming the
nearest known field, as PEFT warns about keys it does not know.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_fx.enums import parse_enum
from lora_fx.errors import ConfigError

ADAPTER_CONFIG_NAME = "adapter_config.json"


class InitLoraWeights(enum.Enum):
    """How A and B start. PEFT spells these ``True``, ``"gaussian"`` and ``False``."""

    KAIMING = "kaiming"  # A kaiming-uniform (a=sqrt(5)), B zero: the model starts unchanged
    GAUSSIAN = "gaussian"  # A ~ N(0, 1/r), B zero
    RANDOM = "random"  # both random (nn.Linear's default init): for tests, the output changes

    @classmethod
    def parse(cls, value: "InitLoraWeights | bool | str") -> "InitLoraWeights":
        if value is True:
            return cls.KAIMING
        if value is False:
            return cls.RANDOM
        return parse_enum(
            cls, value,
            f"init_lora_weights={value!r} is not supported; use True (kaiming-uniform A, zero B), 'gaussian' or False (both random)",
        )

    def to_peft(self) -> bool | str:
        return {InitLoraWeights.KAIMING: True, InitLoraWeights.GAUSSIAN: "gaussian", InitLoraWeights.RANDOM: False}[self]


ALL_LINEAR = "all-linear"

# The classification heads PeftModelForSequenceClassification adds to modules_to_save, in its order.
SEQ_CLS_MODULES_TO_SAVE = ("classifier", "score")

# How a PEFT field that lora_fx does not implement is treated, kept in the field's metadata.
_PEFT = "peft"
_UNIMPLEMENTED = "unimplemented"  # accepted at PEFT's default only: any other value changes what the adapter is
_FILE_INFO = "file_info"  # describes the file or the run, not the adapter: accepted with any value


def _unimplemented(default: Any) -> Any:
    """A PEFT field lora_fx does not implement, accepted at ``default`` (PEFT's default) and refused otherwise.

    Keyword-only and out of ``repr`` and ``==``: it always holds ``default``, so ``LoraConfig(bias="none")`` is
    ``LoraConfig()``. It is stored (and written by ``to_dict``) so code reading PEFT's attributes finds them.
    """
    if isinstance(default, dict):
        return field(default_factory=dict, repr=False, compare=False, kw_only=True, metadata={_PEFT: _UNIMPLEMENTED})
    return field(default=default, repr=False, compare=False, kw_only=True, metadata={_PEFT: _UNIMPLEMENTED})


def _file_info(default: Any = None) -> Any:
    """A PEFT field about the file or the run (PEFT's version, the base model's revision): any value is accepted."""
    return field(default=default, repr=False, compare=False, kw_only=True, metadata={_PEFT: _FILE_INFO})


def _default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@dataclass
class LoraConfig:
    """LoRA on linear sites, with PEFT's names and semantics.

    ``target_modules``: a list means "exact site name or dotted suffix" (``"query"`` matches
    ``encoder.layer.0.attention.self.query``); a string is a regular expression that must match the
    whole site name; ``"all-linear"`` is every linear site except the model's output layer.
    ``None`` uses PEFT's default targets for the model type when lora_fx knows it.
    ``modules_to_save``: modules trained in full beside the adapters and saved with them, matched as PEFT
    matches them (a module whose path ends with the text, ``"classifier"`` matching ``classifier``);
    LoRA never targets them or anything inside them. ``task_type="SEQ_CLS"`` adds PEFT's head names
    (``SEQ_CLS_MODULES_TO_SAVE``: ``classifier`` and ``score``) as PEFT's sequence-classification model does.
    PEFT's other fields are keyword-only: those lora_fx does not implement (``bias``, ``use_dora``, ...) are
    accepted at PEFT's default, so a PEFT-style ``LoraConfig(..., bias="none", task_type="CAUSAL_LM")`` works
    verbatim, and any other value is a ConfigError; ``inference_mode``, ``revision``, ``auto_mapping``,
    ``peft_version`` and ``runtime_config`` describe the file or the run and take any value, as do
    ``qalora_group_size`` and ``megatron_core``, settings of refused features that do nothing without them.
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
    modules_to_save: list[str] | None = None

    # PEFT 0.21's LoraConfig fields lora_fx does not implement, at PEFT's defaults (any other value is refused).
    bias: str = _unimplemented("none")
    use_dora: bool = _unimplemented(False)
    lora_bias: bool = _unimplemented(False)
    layer_replication: list[list[int]] | None = _unimplemented(None)
    use_qalora: bool = _unimplemented(False)
    target_parameters: list[str] | None = _unimplemented(None)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = _unimplemented(None)
    alora_invocation_tokens: list[int] | None = _unimplemented(None)
    arrow_config: dict[str, Any] | None = _unimplemented(None)
    megatron_config: dict[str, Any] | None = _unimplemented(None)
    loftq_config: dict[str, Any] = _unimplemented({})
    eva_config: dict[str, Any] | None = _unimplemented(None)
    corda_config: dict[str, Any] | None = _unimplemented(None)
    lora_ga_config: dict[str, Any] | None = _unimplemented(None)
    # These change what the adapter computes or how it trains (KaSA truncates W and scales by learned singular
    # values, MonteCLoRA samples, BD-LoRA's factors are block-diagonal, VeLoRA compresses the activations the
    # backward pass keeps, ensure_weight_tying ties adapters across tied weights): read as plain LoRA they are wrong.
    kasa_config: dict[str, Any] | None = _unimplemented(None)
    monteclora_config: dict[str, Any] | None = _unimplemented(None)
    use_bdlora: dict[str, Any] | None = _unimplemented(None)
    velora_config: dict[str, Any] | None = _unimplemented(None)
    ensure_weight_tying: bool = _unimplemented(False)
    # About the file or the run, not the adapter. ``to_dict`` writes inference_mode=True as PeftModel.save_pretrained
    # does, and leaves runtime_config out as PEFT does.
    inference_mode: bool = _file_info(False)
    revision: str | None = _file_info()
    auto_mapping: dict[str, Any] | None = _file_info()
    peft_version: str | None = _file_info()
    runtime_config: Any = _file_info()
    # Settings of a refused feature (use_qalora, megatron_config): without it they change nothing, so any value
    # is plain LoRA in PEFT too.
    qalora_group_size: int = _file_info(16)
    megatron_core: str = _file_info("megatron.core")

    def __post_init__(self) -> None:
        check_unimplemented(self)
        self.init_lora_weights = InitLoraWeights.parse(self.init_lora_weights)
        self.task_type = task_type_name(self.task_type)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = sorted(self.modules_to_save)
        elif isinstance(self.modules_to_save, list):
            self.modules_to_save = list(self.modules_to_save)
        if is_seq_cls(self.task_type):
            # PeftModelForSequenceClassification trains (and saves) the head under one of these names; the
            # names it writes to adapter_config.json come back here once, not once per round trip.
            have = self.modules_to_save or []
            self.modules_to_save = have + [n for n in SEQ_CLS_MODULES_TO_SAVE if n not in have]
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
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise ConfigError(f"rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
        if not _is_number(self.lora_dropout) or not (0.0 <= float(self.lora_dropout) < 1.0):
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        alphas = {"lora_alpha": self.lora_alpha, **{f"alpha_pattern[{k!r}]": v for k, v in self.alpha_pattern.items()}}
        for name, alpha in alphas.items():
            if not _is_number(alpha):  # found otherwise only when the scale is computed, as a TypeError
                raise ConfigError(f"{name} must be a number (the scale is alpha / r), got {alpha!r}")
            if not math.isfinite(alpha):  # a NaN or inf scale turns every output of the site into NaN
                raise ConfigError(f"{name} must be a finite number (the scale is alpha / r), got {alpha!r}")
            if alpha == 0:
                # A zero scale makes the adapter a no-op that still trains; the ONNX form keeps the scale inside B
                # (B * scale), so a PEFT folder written from it would hold B / 0.
                raise ConfigError(f"{name} is 0: the scale alpha / r would be 0 and the adapter would change nothing; "
                                  "use a non-zero alpha (PEFT's default is 8; r or 2 * r are common)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern only applies together with layers_to_transform")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("target_modules is an empty list: name at least one module, a regex or 'all-linear'")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern is not None):
            # PEFT refuses this too: a regex (or "all-linear") already decides every name, so the layer
            # restriction would be silently ignored, and PEFT could not load the saved adapter.
            raise ConfigError(
                f"layers_to_transform / layers_pattern cannot be used when target_modules is a string "
                f"({self.target_modules!r}), as in PEFT; pass target_modules as a list of names (e.g. ['q_proj', 'v_proj']), "
                r"or put the layer index in the regex (e.g. r'.*\.layers\.(0|1)\..*\.q_proj')"
            )
        check_patterns("target_modules", self.target_modules)
        check_patterns("exclude_modules", self.exclude_modules)
        check_modules_to_save(self.modules_to_save)
        for key in [*self.rank_pattern, *self.alpha_pattern]:
            check_regex("rank_pattern" if key in self.rank_pattern else "alpha_pattern", key)

    def scaling(self, r: int, alpha: float) -> float:
        """PEFT's scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # ---- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` content (loads with ``peft.LoraConfig.from_pretrained``)."""
        out = peft_fields_dict(self)
        out["init_lora_weights"] = self.init_lora_weights.to_peft()
        out["peft_type"] = "LORA"
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        data = _json_object(data, "a LoRA config")
        peft_type = _peft_type(data, "LORA")
        if peft_type != "LORA":
            raise ConfigError(f"this is a {peft_type} adapter config, not LoRA; use the config class for {peft_type}")
        return cls(**known_fields(cls, data, "LoraConfig"))

    @classmethod
    def from_json(cls, text: str) -> "LoraConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "LoraConfig":
        """Read PEFT's ``adapter_config.json`` from an adapter directory."""
        return cls.from_dict(read_adapter_config(directory))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        from lora_fx.files import atomic_write_text

        path = Path(directory) / ADAPTER_CONFIG_NAME
        atomic_write_text(path, self.to_json())
        return path


def with_task_heads(task_type: Any, modules_to_save: list[str] | None) -> list[str] | None:
    """``modules_to_save`` as PeftModelForSequenceClassification makes it for ``task_type``: for SEQ_CLS the head names
    (``SEQ_CLS_MODULES_TO_SAVE``) added after the caller's, each name once."""
    names = list(modules_to_save) if modules_to_save is not None else None
    if is_seq_cls(task_type):
        names = (names or []) + list(SEQ_CLS_MODULES_TO_SAVE)
    # PEFT adds the heads once per adapter it sets up, so its prefix-tuning configs hold them twice.
    return list(dict.fromkeys(names)) if names is not None else None


@dataclass
class PrefixConfig:
    """Prefix-tuning with PEFT's ``PrefixTuningConfig`` names and semantics.

    ``num_virtual_tokens`` (T) learned key and value vectors per attention site, ``[kv_heads, T,
    head_dim]``, are placed in front of the site's keys and values. With ``prefix_projection`` the
    prefixes come from PEFT's reparameterization, an embedding ``[T, token_dim]`` followed by
    ``Linear(token_dim, encoder_hidden_size) -> tanh -> Linear(encoder_hidden_size,
    num_layers * 2 * token_dim)``; it is folded to raw prefixes when saved.
    ``token_dim``, ``num_layers`` and ``num_attention_heads`` are recorded as PEFT records them
    (for grouped-query models: ``kv_heads * head_dim`` and ``kv_heads``) and filled in from the
    model's attention sites when left ``None``.
    ``target_modules`` (not a PEFT field) restricts the attention sites: a list of names or dotted
    suffixes, or a regex over the whole site name; ``None`` means every attention site, as in PEFT.
    ``num_transformer_submodules`` is PEFT's: 1, or 2 for encoder-decoder models (SEQ_2_SEQ_LM), where
    PEFT's prefixes reach the decoder's self-attention only; filled in from the model when ``None``.
    ``modules_to_save`` is PEFT's: modules trained in full beside the prefixes and saved with them, matched as
    ``LoraConfig.modules_to_save``; ``task_type="SEQ_CLS"`` adds PEFT's head names (``classifier``, ``score``).
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    target_modules: list[str] | str | None = None
    init_weights: str | None = None  # PEFT: None (random normal, as nn.Embedding) or "zero"
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    num_transformer_submodules: int | None = None
    modules_to_save: list[str] | None = None

    # PEFT's PrefixTuningConfig fields about the file or the run, as in LoraConfig.
    inference_mode: bool = _file_info(False)
    revision: str | None = _file_info()
    auto_mapping: dict[str, Any] | None = _file_info()
    peft_version: str | None = _file_info()

    def __post_init__(self) -> None:
        self.task_type = task_type_name(self.task_type)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = sorted(self.modules_to_save)
        check_modules_to_save(self.modules_to_save)
        self.modules_to_save = with_task_heads(self.task_type, self.modules_to_save)
        self.validate()

    def validate(self) -> None:
        t = self.num_virtual_tokens
        if not isinstance(t, int) or isinstance(t, bool) or t < 1:
            raise ConfigError(
                f"num_virtual_tokens must be a positive integer (the number T of prefix tokens per attention site), got {t!r}"
            )
        for name in ("encoder_hidden_size", "token_dim", "num_layers", "num_attention_heads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or None (taken from the model), got {value!r}")
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights must be None (random) or 'zero', as in PEFT; got {self.init_weights!r}")
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ConfigError(
                f"num_transformer_submodules must be 1 (decoder-only and encoder-only models) or 2 (encoder-decoder "
                f"models, SEQ_2_SEQ_LM), as in PEFT; got {self.num_transformer_submodules!r}"
            )
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("target_modules is an empty list: leave it None for every attention site, or name some")
        check_modules_to_save(self.modules_to_save)

    # ---- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` content (loads with ``peft.PrefixTuningConfig.from_pretrained``)."""
        out = peft_fields_dict(self)
        if out["target_modules"] is None:
            # Not a PEFT field: written only when set, so PEFT reads our files unchanged.
            del out["target_modules"]
        out["num_transformer_submodules"] = out["num_transformer_submodules"] or 1
        out["peft_type"] = "PREFIX_TUNING"
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrefixConfig":
        data = _json_object(data, "a prefix-tuning config")
        peft_type = _peft_type(data, "PREFIX_TUNING")
        if peft_type != "PREFIX_TUNING":
            raise ConfigError(f"this is a {peft_type} adapter config, not prefix-tuning; use the config class for {peft_type}")
        if data.get("num_transformer_submodules") == 1:
            # PEFT writes 1 for every model that is no encoder-decoder: the same as "from the model" (None).
            data["num_transformer_submodules"] = None
        return cls(**known_fields(cls, data, "PrefixTuningConfig"))

    @classmethod
    def from_json(cls, text: str) -> "PrefixConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "PrefixConfig":
        """Read a PEFT prefix-tuning ``adapter_config.json`` from an adapter directory."""
        return cls.from_dict(read_adapter_config(directory))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        from lora_fx.files import atomic_write_text

        path = Path(directory) / ADAPTER_CONFIG_NAME
        atomic_write_text(path, self.to_json())
        return path


def check_unimplemented(config: Any) -> None:
    """Refuse a PEFT field lora_fx does not implement unless it holds PEFT's default, then store that default.

    An unset value (None, {}, [], False) means "not used" in PEFT too and is accepted; it is stored as PEFT's
    default so the written file reads back in PEFT as written by PEFT (PEFT refuses bias=None, for one).
    """
    for f in dataclasses.fields(config):
        if f.metadata.get(_PEFT) != _UNIMPLEMENTED:
            continue
        default, value = _default_of(f), getattr(config, f.name)
        if value != default and not _is_unset(value):
            raise ConfigError(f"PEFT option {f.name}={value!r} is not supported by lora_fx; only {default!r} is")
        setattr(config, f.name, default)


def _is_unset(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list)) and not value)


def peft_fields_dict(config: Any) -> dict[str, Any]:
    """``config``'s fields as PEFT writes them in ``adapter_config.json``: ``inference_mode`` true (as
    PeftModel.save_pretrained writes it), no ``runtime_config`` (PEFT drops it from files), ``peft_version`` only when
    known (PEFT fills in its own version when it reads a file without one)."""
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "runtime_config"}
    out["inference_mode"] = True
    if out.get("peft_version") is None:
        out.pop("peft_version", None)
    return out


def known_fields(cls: type, data: dict[str, Any], peft_class: str) -> dict[str, Any]:
    """The entries of ``data`` that are fields of ``cls``; each other key is dropped with a warning naming the nearest
    field, as PEFT drops (and warns about) keys its config class does not have."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in sorted(set(data) - set(names), key=str):
        # cutoff=0: always name the nearest field, however far, so a misspelling is seen even when it is a poor one.
        near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.0)
        warnings.warn(
            f"{key!r} is not a field of PEFT's {peft_class} that lora_fx knows, so it is ignored (the nearest known "
            f"field is {near[0]!r}); check the spelling, or whether the config comes from a newer PEFT than lora_fx "
            f"supports",
            stacklevel=3,
        )
    return {k: v for k, v in data.items() if k in names}


def check_patterns(field_name: str, value: Any) -> None:
    """``target_modules`` / ``exclude_modules``: None, a regex string, or a list of names.

    PEFT hands a string to ``re`` as it is; a bad one fails there with "nothing to repeat at
    position 0" and no word of which field holds it. List entries are names, compared as text.
    """
    if value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return
    if not isinstance(value, str):
        raise ConfigError(f"{field_name} must be a string (a regex) or a list of module names, got {value!r}")
    check_regex(field_name, value)


def check_regex(field_name: str, text: Any) -> None:
    """``text`` compiles as a regular expression; else a ConfigError naming the field and the entry."""
    if not isinstance(text, str):
        raise ConfigError(f"{field_name} entry {text!r} must be a string: a module name or a regex")
    try:
        re.compile(text)
    except re.error as exc:
        raise ConfigError(
            f"{field_name} entry {text!r} is not a valid regular expression ({exc}); '.*' matches any text, e.g. r'.*\\.q_proj'"
        ) from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _peft_type(data: dict[str, Any], default: str) -> str:
    """``peft_type`` as PEFT's name: a file holds "LORA", PEFT's own ``to_dict()`` the enum ``PeftType.LORA``."""
    value = data.pop("peft_type", default)
    return str(getattr(value, "value", value)).upper()


def _json_object(data: Any, what: str) -> dict[str, Any]:
    """A copy of ``data`` if it is a JSON object; a config file holding a list or a number is refused by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a JSON object of options, got a {type(data).__name__}")
    return dict(data)


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter directory, with clear errors."""
    path = Path(directory) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{path} not found: an adapter directory holds {ADAPTER_CONFIG_NAME} and adapter_model.safetensors")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return data


def check_modules_to_save(value: Any) -> None:
    """``modules_to_save``: None or a list of module names (PEFT also reads each one as a regular expression
    when it keeps LoRA off those modules, so each must compile as one)."""
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(
            f"modules_to_save must be a list of module names (e.g. ['classifier']) or None, got {value!r}"
        )
    for name in value:
        check_regex("modules_to_save", name)


def task_type_name(task_type: Any) -> str | None:
    """PEFT's ``TaskType`` enum (a str subclass whose ``str()`` is ``TaskType.SEQ_CLS`` on Python 3.11) as its plain
    name, so comparisons and the saved JSON see ``"SEQ_CLS"``."""
    return None if task_type is None else str(getattr(task_type, "value", task_type))


def is_seq_cls(task_type: Any) -> bool:
    """``task_type`` is sequence classification, as a string or PEFT's ``TaskType`` enum."""
    return str(getattr(task_type, "value", task_type) or "").upper() == "SEQ_CLS"


class QuantDType(str, enum.Enum):
    """Storage format of a quantized frozen weight (QLoRA)."""

    NF4 = "nf4"  # QLoRA's 16-value normal-float code book, absmax per block
    INT4 = "int4"  # block-wise 4-bit integers, symmetric or affine
    INT8 = "int8"  # 8-bit integers, one scale per output channel

    @classmethod
    def parse(cls, value: "QuantDType | str") -> "QuantDType":
        return parse_enum(cls, value, f"quant dtype {value!r} is not supported; use one of {', '.join(m.value for m in cls)}")


# The block sizes ONNX Runtime's MatMulBnb4 and MatMulNBits accept (CPU and CUDA).
QUANT_BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass
class QuantConfig:
    """How the frozen linear weights are stored (QLoRA): packed in 4 or 8 bits, dequantized before the matmul.

    ``block_size``: weights per absmax/scale block for nf4 and int4, one of ``QUANT_BLOCK_SIZES``
    (the sizes ONNX Runtime's MatMulBnb4 / MatMulNBits run). nf4 blocks run over the weight flattened
    row-major, as torchao and bitsandbytes do; int4 blocks run along each row, as MatMulNBits stores
    them. ``double_quant``: nf4 block absmaxes are themselves stored in 8 bits,
    ``double_quant_block_size`` of them per scale (about 4.127 bits a weight). ``symmetric``: int4
    without a zero point (zero point 8, as ONNX Runtime's MatMulNBits). ``pad``: a weight (nf4) or a
    row (int4) that is not a whole number of blocks gets a zero-padded last block; with
    ``pad=False`` it is refused. ``target_modules`` / ``exclude_modules`` select the
    sites with LoraConfig's language; the default is every linear site except the output layer.
    int8 stores one scale per output channel: ``block_size`` and ``pad`` do not apply to it (nor
    ``symmetric=False`` to nf4 and int8, nor ``double_quant_block_size`` without ``double_quant``), and
    are refused at other than their defaults rather than ignored.
    """

    dtype: QuantDType = QuantDType.NF4
    block_size: int = 64
    double_quant: bool = False
    double_quant_block_size: int = 256
    symmetric: bool = True
    pad: bool = True
    target_modules: list[str] | str = ALL_LINEAR
    exclude_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        self.dtype = QuantDType.parse(self.dtype)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        self.validate()

    def validate(self) -> None:
        for name in ("block_size", "double_quant_block_size"):
            value = getattr(self, name)
            # Two 4-bit codes share a byte, so a block must hold an even number of weights.
            if not isinstance(value, int) or isinstance(value, bool) or value < 2 or value % 2:
                raise ConfigError(f"{name} must be an even integer >= 2, got {value!r} (QLoRA uses 64 and 256)")
        if self.dtype is not QuantDType.INT8 and self.block_size not in QUANT_BLOCK_SIZES:
            # ONNX Runtime's MatMulBnb4 and MatMulNBits refuse any other block size at run time.
            raise ConfigError(
                f"block_size={self.block_size} is not one ONNX Runtime's 4-bit matmuls (MatMulBnb4, MatMulNBits) run; "
                f"use one of {', '.join(map(str, QUANT_BLOCK_SIZES))} (QLoRA uses 64)"
            )
        if self.double_quant and self.dtype is not QuantDType.NF4:
            raise ConfigError(f"double_quant applies to nf4 block absmaxes only, not to {self.dtype.value}; drop double_quant")
        self._refuse_inapplicable()
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("target_modules is an empty list: name at least one module, a regex or 'all-linear'")

    def _refuse_inapplicable(self) -> None:
        """An option the dtype has no use for would be ignored without a word: refused, naming the way out. Its default
        is accepted (``to_dict`` writes every field, so a saved int8 config holds ``block_size=64``)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        dtype = self.dtype.value
        if self.dtype is QuantDType.INT8 and self.block_size != defaults["block_size"]:
            raise ConfigError(f"block_size applies to nf4 and int4 blocks only, not to int8, which stores one scale per "
                              f"output channel (DequantizeLinear on axis 0); drop block_size={self.block_size} or use "
                              f"dtype='nf4' or 'int4'")
        if self.dtype is QuantDType.INT8 and self.pad != defaults["pad"]:
            raise ConfigError("pad applies to nf4 and int4 blocks only, not to int8, which has no blocks to pad; drop pad=False")
        if self.symmetric != defaults["symmetric"] and self.dtype is not QuantDType.INT4:
            raise ConfigError(f"symmetric=False (zero points) applies to int4 only, not to {dtype}, whose codes are "
                              f"symmetric around 0; drop symmetric=False or use dtype='int4'")
        if self.double_quant_block_size != defaults["double_quant_block_size"] and not self.double_quant:
            raise ConfigError(f"double_quant_block_size applies with double_quant only (nf4); add double_quant=True or "
                              f"drop double_quant_block_size={self.double_quant_block_size}")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["dtype"] = self.dtype.value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        data = _json_object(data, "a quantization config")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown QuantConfig fields {unknown}; known: {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        return cls.from_dict(json.loads(text))
