"""Target selection on Sites, with PEFT's semantics exactly.

The rules mirror ``peft.tuners.tuners_utils.check_target_module_exists`` and
``peft.utils.other.get_pattern_key`` so a config selects the same modules here as in PEFT:

* ``exclude_modules`` first: a string is a full regex match, a list an exact name or dotted suffix.
* ``target_modules``: a string is a full regex match (``"all-linear"`` is expanded to every linear
  site's name but the output layer's); a list matches an exact name or a dotted suffix, and only
  then ``layers_to_transform`` / ``layers_pattern`` restrict the layer index.
* A target that names a module holding linear sites (a dotted prefix of their names, e.g.
  ``encoder.layer.0.attention``) is refused, as PEFT refuses to adapt a module it cannot wrap.
* ``rank_pattern`` / ``alpha_pattern``: the first key ``k`` (in insertion order) such that the
  site name matches ``(.*\\.)?(k)$``.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass
from typing import Sequence

from lora_fx.config import ALL_LINEAR, LoraConfig
from lora_fx.errors import ConfigError, TargetNotFoundError
from lora_fx.sites import Site, SiteKind

# PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for the model types lora_fx tests.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
}


@dataclass(frozen=True)
class Target:
    """A selected linear site with its rank, alpha and resulting scale."""

    site: Site
    r: int
    alpha: float
    scale: float


def _matches_list(names: Sequence[str], key: str) -> bool:
    return key in names or any(key.endswith(f".{n}") for n in names)


def _layer_index(key: str, layers_pattern: list[str] | str | None) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def is_excluded(config: LoraConfig, key: str) -> bool:
    ex = config.exclude_modules
    if not ex:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, key) is not None
    return _matches_list(ex, key)


# PEFT's SEQ_CLS_HEAD_NAMES: with task_type SEQ_CLS, all-linear leaves out the first of these the model has.
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


def _seq_cls_head(config: LoraConfig, linear: Sequence[Site]) -> set[str]:
    """The classification head ``all-linear`` leaves out for ``task_type="SEQ_CLS"``, as PEFT does (a model
    attribute named ``score`` or ``classifier``: a site of exactly that name); PEFT trains it in full
    (``modules_to_save``) instead, which lora_fx does not do."""
    if str(config.task_type or "").upper() != "SEQ_CLS":
        return set()
    names = {s.name for s in linear}
    return next(({n} for n in SEQ_CLS_HEAD_NAMES if n in names), set())


def resolve_target_modules(config: LoraConfig, sites: Sequence[Site], model_type: str | None = None) -> list[str] | str:
    """The effective ``target_modules``: ``all-linear`` and ``None`` expanded to names."""
    tm = config.target_modules
    linear = [s for s in sites if s.kind is SiteKind.LINEAR]
    if isinstance(tm, str) and tm.lower() == ALL_LINEAR:
        return sorted({s.name for s in linear if not s.is_output_layer} - _seq_cls_head(config, linear))
    if tm is None:
        if model_type and model_type in DEFAULT_TARGETS:
            return list(DEFAULT_TARGETS[model_type])
        known = ", ".join(sorted(DEFAULT_TARGETS))
        raise ConfigError(
            f"target_modules is not set and lora_fx has no default targets for model type {model_type!r} "
            f"(it knows: {known}); pass target_modules, e.g. ['query', 'value'] or 'all-linear'"
        )
    return tm


def matches_target(config: LoraConfig, target_modules: list[str] | str, key: str) -> bool:
    if is_excluded(config, key):
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    if key in target_modules:
        # PEFT: an exact name skips the layer restriction.
        return True
    found = _matches_list(target_modules, key)
    layers = config.layers_to_transform
    if found and layers is not None and not (isinstance(layers, list) and len(layers) == 0):
        idx = _layer_index(key, config.layers_pattern)
        if idx is None:
            return False
        return idx == layers if isinstance(layers, int) else idx in layers
    return found


def pattern_value(patterns: dict[str, float], key: str, default: float) -> float:
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return patterns[pattern]
    return default


def _closest(wanted: str, names: Sequence[str]) -> list[str]:
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    # A top-level name ("fc1") is its own suffix: once in the candidates, or it is suggested twice.
    candidates = list(dict.fromkeys(suffixes + list(names)))
    return difflib.get_close_matches(wanted, candidates, n=5, cutoff=0.5)


def _containers(linear: Sequence[Site]) -> list[str]:
    """The modules that hold linear sites (``encoder.layer.0.attention``), known from the site names."""
    names = {s.name for s in linear}
    parents = {name.rsplit(".", i)[0] for name in names for i in range(1, name.count(".") + 1)}
    return sorted(parents - names)


def check_no_container_targets(config: LoraConfig, target_modules: list[str] | str, linear: Sequence[Site]) -> None:
    """Refuse a target that names a module holding linear sites, as PEFT does.

    PEFT walks every module and stops at a matched one it cannot adapt ("Target module
    BertAttention(...) is not supported"). Selecting the linear sites inside instead would adapt
    layers the config does not name, and PEFT could not load the saved adapter.
    """
    hit = [p for p in _containers(linear) if matches_target(config, target_modules, p)]
    if not hit:
        return
    inside = sorted({s.name.rsplit(".", 1)[-1] for s in linear if any(s.name.startswith(f"{p}.") for p in hit)})
    raise ConfigError(
        f"target_modules={config.target_modules!r} matches {', '.join(hit[:4])}{', ...' if len(hit) > 4 else ''}: "
        f"module{'s' if len(hit) > 1 else ''} holding linear layers, not linear layers; PEFT refuses such a target "
        f"('Target module ... is not supported'). Name the linear layers inside instead, e.g. target_modules={inside[:6]!r}, "
        "or a regex that ends at one of them"
    )


def unmatched_error(config: LoraConfig, sites: Sequence[Site], kind: SiteKind = SiteKind.LINEAR) -> TargetNotFoundError:
    names = [s.name for s in sites if s.kind is kind]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    wanted = config.target_modules
    hints = []
    if isinstance(wanted, str) and wanted in suffixes:
        # A PEFT rule that surprises: a string is a regex over the whole name, so "q_proj" matches no
        # "model.layers.0.self_attn.q_proj"; only a list entry matches a dotted suffix.
        hints.append(f"a string is a regular expression the whole site name must match; for a name or dotted suffix pass a list: target_modules=[{wanted!r}]")
    for w in [wanted] if isinstance(wanted, str) else list(wanted or []):
        close = _closest(str(w), names)
        if close:
            hints.append(f"closest to {w!r}: {', '.join(close)}")
    shown = names if len(names) <= 40 else names[:40] + [f"... ({len(names) - 40} more)"]
    msg = (
        f"target_modules={wanted!r} matches no {kind.value} site of this model"
        + (f" (exclude_modules={config.exclude_modules!r}, layers_to_transform={config.layers_to_transform!r})" if config.exclude_modules or config.layers_to_transform is not None else "")
        + ".\n"
        + ("\n".join(hints) + "\n" if hints else "")
        + f"module names you can target (a name, a dotted suffix or a regex): {', '.join(suffixes)}\n"
        + "sites:\n  " + "\n  ".join(shown)
    )
    return TargetNotFoundError(msg)


def select_targets(sites: Sequence[Site], config: LoraConfig, model_type: str | None = None) -> list[Target]:
    """Pick the linear sites ``config`` adapts, each with its rank, alpha and scale.

    Raises ``TargetNotFoundError`` listing the available names when nothing matches, and
    ``ConfigError`` when a rank does not fit a site.
    """
    linear = [s for s in sites if s.kind is SiteKind.LINEAR]
    if not linear:
        raise TargetNotFoundError("this model has no linear site that LoRA can adapt (no linear / MatMul with a constant weight)")
    target_modules = resolve_target_modules(config, sites, model_type)
    check_no_container_targets(config, target_modules, linear)
    out: list[Target] = []
    for site in linear:
        if not matches_target(config, target_modules, site.name):
            continue
        r = int(pattern_value(config.rank_pattern, site.name, config.r))
        alpha = float(pattern_value(config.alpha_pattern, site.name, config.lora_alpha))
        limit = min(site.in_features or 0, site.out_features or 0)
        if r > limit:
            # A warning, not an error: PEFT adapts such a site (all-linear with r=8 reaches a 2-label classifier
            # head), and the same config must select and compute the same here.
            warnings.warn(
                f"r={r} is larger than min(in_features, out_features)={limit} of site {site.name} "
                f"({site.in_features} -> {site.out_features}); a rank above that adds parameters but no capacity. "
                f"Lower it for this site with rank_pattern={{{site.name!r}: {limit}}}",
                stacklevel=2,
            )
        out.append(Target(site=site, r=r, alpha=alpha, scale=config.scaling(r, alpha)))
    if not out:
        raise unmatched_error(config, sites)
    return out
