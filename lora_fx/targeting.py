"""Target selection on Sites, with PEFT's semantics exactly.

The rules mirror ``peft.tuners.tuners_utils.check_target_module_exists`` and
``peft.utils.other.get_pattern_key`` so a config selects the same modules here as in PEFT:

* ``exclude_modules`` first: a string is a full regex match, a list an exact name or dotted suffix.
* ``target_modules``: a string is a full regex match (``"all-linear"`` is expanded to every linear
  site's name but the output layer's); a list matches an exact name or a dotted suffix, and only
  then ``layers_to_transform`` / ``layers_pattern`` restrict the layer index.
* A target that names a module holding linear sites (a dotted prefix of their names, e.g.
  ``encoder.layer.0.attention``) is refused, as PEFT refuses to adapt a module it cannot wrap. Where
  the module tree is known (FX; ONNX exports, for the modules their nodes describe), so is a target
  naming any other module that is no linear layer (a LayerNorm, a Dropout, an activation), and one
  naming an embedding or a convolution, which PEFT adapts and lora_fx cannot.
* An ``nn.MultiheadAttention`` targeted as a whole selects its in_proj site and its out_proj site
  (``Site.part_of``), with the attention module's rank and alpha, as PEFT's
  ``lora.MultiheadAttention`` does.
* ``modules_to_save``: a module whose PEFT path (``base_model.model.<path>``) ends with an entry is
  trained in full (``select_modules_to_save``); LoRA never targets it or anything inside it (PEFT keeps
  out every name matching ``(^|.*\.)<entry>($|\..*)``).
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
from lora_fx.errors import ConfigError, TargetNotFoundError, UnsupportedError
from lora_fx.sites import EMBEDDING_LOOKUP, MULTIHEAD_ATTENTION, ONNX_OPS, ModuleTree, Site, SiteKind

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
    """A selected linear site with its rank, alpha and resulting scale.

    ``part_of`` is the module the site was selected through when that module was targeted as a whole
    (an ``nn.MultiheadAttention`` for its out_proj); PEFT files key such a site under it.
    """

    site: Site
    r: int
    alpha: float
    scale: float
    part_of: str | None = None


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
    # PEFT never puts LoRA on a module it trains in full, nor inside one: the wrapper would run the copy, not LoRA.
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save or ()):
        return True
    ex = config.exclude_modules
    if not ex:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, key) is not None
    return _matches_list(ex, key)


PEFT_MODULE_PREFIX = "base_model.model."


def select_modules_to_save(config: LoraConfig, modules: ModuleTree) -> list[str]:
    """The module paths ``config.modules_to_save`` trains in full, outermost first, as PEFT's ``_set_trainable``
    picks them: every module whose path under the PEFT model (``base_model.model.<path>``) ends with an entry.

    An entry that matches no module is refused (PEFT ignores it silently, so a typo trains nothing), except
    the head names ``task_type="SEQ_CLS"`` adds, of which a model has one.
    """
    from lora_fx.config import SEQ_CLS_MODULES_TO_SAVE, is_seq_cls

    wanted = list(config.modules_to_save or ())
    if not wanted:
        return []
    paths = sorted(p for p in modules if p)
    chosen: list[str] = []
    used: set[str] = set()
    for path in paths:
        hit = [m for m in wanted if f"{PEFT_MODULE_PREFIX}{path}".endswith(m)]
        if not hit:
            continue
        used.update(hit)
        if not any(path.startswith(f"{c}.") for c in chosen):  # a module inside a saved one is saved with it
            chosen.append(path)
    optional = set(SEQ_CLS_MODULES_TO_SAVE) if is_seq_cls(config.task_type) else set()
    unmatched = [m for m in wanted if m not in used and m not in optional]
    if unmatched:
        close = _closest(unmatched[0], paths)
        raise TargetNotFoundError(
            f"modules_to_save entr{'ies' if len(unmatched) > 1 else 'y'} {', '.join(map(repr, unmatched))} match"
            f"{'' if len(unmatched) > 1 else 'es'} no module of this model (a module path or its ending, e.g. 'classifier')"
            + (f"; closest: {', '.join(close)}" if close else "")
            + "; fix the name or drop it from modules_to_save"
        )
    return chosen


def adapted_and_saved(site: str, module: str) -> str:
    """Why a site both targeted and trained in full (``modules_to_save``) is refused, and the way out."""
    return (
        f"{module} is trained in full (modules_to_save, whose entries match module-name endings; task_type SEQ_CLS "
        f"adds 'classifier' and 'score'), and the targets also put LoRA on its linear layer {site}: a module is trained "
        f"in full or adapted, not both (PEFT fails on this config). Leave {site} out of the targets: "
        f"exclude_modules=[{site!r}] keeps it out of 'all-linear'"
    )


def refuse_adapted_saved(targets: Sequence[Target], saved: Sequence[str]) -> None:
    """Refuse a target at or inside a module trained in full.

    PEFT keeps LoRA off a module to save by a dotted match (``is_excluded``) but picks the modules to save by a
    plain suffix (``select_modules_to_save``), so a name like DistilBERT's ``pre_classifier`` is both picked
    (it ends with ``classifier``, a SEQ_CLS head name) and targeted by ``all-linear``; PEFT then fails with a
    TypeError, and an adapter saved with both would not load in PEFT."""
    from lora_fx.errors import AdapterError

    for t in targets:
        for module in saved:
            if t.site.name == module or t.site.name.startswith(f"{module}."):
                raise AdapterError(adapted_and_saved(t.site.name, module))


# PEFT's SEQ_CLS_HEAD_NAMES: with task_type SEQ_CLS, all-linear leaves out the first of these the model has.
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


def _seq_cls_head(config: LoraConfig, linear: Sequence[Site]) -> set[str]:
    """The classification head ``all-linear`` leaves out for ``task_type="SEQ_CLS"``, as PEFT does (a model
    attribute named ``score`` or ``classifier``: a site of exactly that name); it is trained in full instead
    (``modules_to_save``, which SEQ_CLS fills in)."""
    from lora_fx.config import is_seq_cls

    if not is_seq_cls(config.task_type):
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
    """The modules that hold linear sites (``encoder.layer.0.attention``), known from the site names; a module
    PEFT adapts as a whole (``Site.part_of``) is none of them."""
    names = {s.name for s in linear} | {s.part_of for s in linear if s.part_of}
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


# PEFT adapts these as linear layers (dispatch_default): a matched one with no site was never run by the graph.
_LINEAR_CLASSES = ("torch.nn.modules.linear.Linear", "transformers.pytorch_utils.Conv1D")
# PEFT adapts these too, lora_fx does not.
_PEFT_ONLY_CLASSES = {
    "torch.nn.modules.sparse.Embedding": "an embedding",
    "torch.nn.modules.conv.Conv1d": "a convolution",
    "torch.nn.modules.conv.Conv2d": "a convolution",
    "torch.nn.modules.conv.Conv3d": "a convolution",
    EMBEDDING_LOOKUP: "an embedding lookup",
}


def _class_name(classes: Sequence[str]) -> str:
    if not classes:
        return "unknown type"
    if classes[0].startswith(ONNX_OPS):
        return f"no class recorded, computes {classes[0][len(ONNX_OPS):]}"
    return classes[0].rsplit(".", 1)[-1]


def _hit_list(hits: Sequence[tuple[str, Sequence[str]]]) -> str:
    shown = ", ".join(f"{path} ({_class_name(classes)})" for path, classes in hits[:4])
    return shown + (f" and {len(hits) - 4} more" if len(hits) > 4 else "")


def _linear_names(linear: Sequence[Site]) -> str:
    suffixes = sorted({s.name.rsplit(".", 1)[-1] for s in linear})
    shown = [s.name for s in linear][:8]
    more = len(linear) - len(shown)
    return f"{', '.join(suffixes)} (sites: {', '.join(shown)}{f', ... {more} more' if more else ''})"


def check_supported_modules(config: LoraConfig, target_modules: list[str] | str, linear: Sequence[Site], modules: ModuleTree) -> None:
    """Refuse a target that matches a module which is no linear site, as PEFT refuses what it cannot adapt.

    PEFT stops at the first matched module it has no LoRA layer for ("Target module LayerNorm(...) is
    not supported"), even when other matches are linear layers: skipping it instead would save an
    adapter_config.json PEFT refuses to load. Embeddings and convolutions PEFT adapts, lora_fx does not:
    refused too, with that reason.
    """
    names = {s.name for s in linear}
    skip = names | set(_containers(linear)) | {s.part_of for s in linear if s.part_of}
    unsupported: list[tuple[str, Sequence[str]]] = []
    peft_only: list[tuple[str, Sequence[str]]] = []
    for path, classes in modules.items():
        if not path or path in skip or not matches_target(config, target_modules, path):
            continue
        if any(c in _LINEAR_CLASSES for c in classes):
            continue
        if MULTIHEAD_ATTENTION in classes:
            raise UnsupportedError(
                f"target_modules={config.target_modules!r} matches {path} (nn.MultiheadAttention), but neither its in_proj "
                "nor its out_proj is a linear site of this graph (a fused kernel, or never called), so lora_fx cannot "
                f"adapt it as PEFT would; exclude it (exclude_modules=[{path!r}]) or target linear layers: {_linear_names(linear)}"
            )
        (peft_only if any(c in _PEFT_ONLY_CLASSES for c in classes) else unsupported).append((path, classes))
    way_out = (
        f"Remove it from target_modules or list it in exclude_modules; the linear layers you can target: {_linear_names(linear)}"
    )
    if unsupported:
        classes = unsupported[0][1]
        example = "..." if classes and classes[0].startswith(ONNX_OPS) else _class_name(classes)
        raise ConfigError(
            f"target_modules={config.target_modules!r} matches {_hit_list(unsupported)}, "
            f"{'not linear layers' if len(unsupported) > 1 else 'not a linear layer'}: LoRA adapts "
            f"linear layers, and PEFT refuses such a target ('Target module {example}(...) is not supported'), so an "
            f"adapter saved with it would not load in PEFT. {way_out}"
        )
    if peft_only:
        kinds = sorted({next(_PEFT_ONLY_CLASSES[c] for c in classes if c in _PEFT_ONLY_CLASSES) for _, classes in peft_only})
        raise TargetNotFoundError(
            f"target_modules={config.target_modules!r} matches {_hit_list(peft_only)}: {' and '.join(kinds)}, which PEFT "
            f"adapts but lora_fx does not (it adapts linear layers only). {way_out}"
        )


def _wholes(config: LoraConfig, target_modules: list[str] | str, linear: Sequence[Site]) -> set[str]:
    """The modules targeted as a whole (``Site.part_of``), each checked to have the in_proj site PEFT adapts with it."""
    names = {s.name for s in linear}
    hit = {s.part_of for s in linear if s.part_of and matches_target(config, target_modules, s.part_of)}
    missing = sorted(hit - names)
    if missing:
        whole = missing[0]
        raise UnsupportedError(
            f"target_modules={config.target_modules!r} matches {whole}, an nn.MultiheadAttention PEFT adapts as a whole "
            "(in_proj and out_proj), but its in_proj is no site of the captured graph: with a query other than key and value "
            "it splits in_proj_weight before the matmuls, which lora_fx cannot adapt. Target its out_proj alone "
            f"(target_modules=[{whole + '.out_proj'!r}]) or call it with query is key is value"
        )
    return hit


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


def _unreachable(config: LoraConfig, target_modules: list[str] | str, sites: Sequence[Site]) -> tuple[list[Site], str | None]:
    """The linear layers the front end found where no pass rewrites them (``sites.unreachable``: ONNX layers inside
    If/Loop/Scan subgraphs) that the config targets, and why they stay as they are (``sites.unreachable_note``)."""
    note = getattr(sites, "unreachable_note", None)
    hidden = [s for s in getattr(sites, "unreachable", ()) if s.kind is SiteKind.LINEAR]
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        # The expanded names are the main graph's: all-linear means every linear layer but the output layer.
        return [s for s in hidden if not s.is_output_layer and not is_excluded(config, s.name)], note
    return [s for s in hidden if matches_target(config, target_modules, s.name)], note


def _unreachable_text(matched: Sequence[Site]) -> str:
    shown = ", ".join(s.name for s in matched[:4]) + (f", ... {len(matched) - 4} more" if len(matched) > 4 else "")
    return f"{len(matched)} linear layer{'s' if len(matched) != 1 else ''} ({shown})"


def select_targets(
    sites: Sequence[Site], config: LoraConfig, model_type: str | None = None, modules: ModuleTree | None = None
) -> list[Target]:
    """Pick the linear sites ``config`` adapts, each with its rank, alpha and scale.

    ``modules`` is the model's module tree where it is known (FX: ``passes.fx.find_sites.module_tree``; ONNX:
    ``passes.onnx.find_sites.module_tree``): with it a target matching a module that is no linear layer is
    refused, as PEFT refuses it.
    ``sites`` may also carry ``unreachable`` (Sites no pass rewrites: ONNX layers inside control-flow subgraphs) and
    ``unreachable_note`` (why, and the way out), as ``passes.onnx.find_sites`` returns them: a target matching only
    such layers is refused with that note, and one matching some of them besides main-graph sites warns with it.
    Raises ``TargetNotFoundError`` listing the available names when nothing matches, ``ConfigError``
    for a target PEFT refuses, and ``UnsupportedError`` for a module lora_fx cannot adapt as PEFT would.
    """
    linear = [s for s in sites if s.kind is SiteKind.LINEAR]
    if not linear:
        note = getattr(sites, "unreachable_note", None)
        if note:
            raise TargetNotFoundError(f"this model's main graph has no linear site that LoRA can adapt: {note}")
        raise TargetNotFoundError("this model has no linear site that LoRA can adapt (no linear / MatMul with a constant weight)")
    target_modules = resolve_target_modules(config, sites, model_type)
    check_no_container_targets(config, target_modules, linear)
    if modules is not None:
        check_supported_modules(config, target_modules, linear, modules)
    wholes = _wholes(config, target_modules, linear)
    expanded = isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR
    out: list[Target] = []
    for site in linear:
        via = site.part_of if site.part_of in wholes else None
        direct = matches_target(config, target_modules, site.name)
        if via and direct and not expanded:
            # PEFT would give it a second adapter, which lora.MultiheadAttention's forward never runs, and save the
            # base weights of out_proj with the adapter.
            raise ConfigError(
                f"target_modules={config.target_modules!r} matches both {via} (nn.MultiheadAttention, which PEFT adapts "
                f"as a whole: in_proj and out_proj) and {site.name} inside it; target one of them: [{via!r}] for both "
                f"projections, or [{site.name!r}] (exclude_modules=[{via!r}]) for out_proj alone"
            )
        if not (direct or via):
            continue
        # PEFT gives out_proj the attention module's rank and alpha.
        key = via or site.name
        r = int(pattern_value(config.rank_pattern, key, config.r))
        alpha = float(pattern_value(config.alpha_pattern, key, config.lora_alpha))
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
        out.append(Target(site=site, r=r, alpha=alpha, scale=config.scaling(r, alpha), part_of=via))
    hidden, note = _unreachable(config, target_modules, sites)
    if not out:
        error = unmatched_error(config, sites)
        if hidden:
            names = str(error).split("\n", 1)[-1]  # the names the main graph offers, after the first line
            raise TargetNotFoundError(
                f"target_modules={config.target_modules!r} matches no linear site of this model's main graph, only "
                f"{_unreachable_text(hidden)} that lora_fx cannot adapt: {note}\n{names}"
            )
        if note:  # the layer wanted may be one of them, under a name the user did not expect
            raise TargetNotFoundError(f"{error}\nbeyond these: {note}")
        raise error
    if hidden:
        warnings.warn(
            f"target_modules={config.target_modules!r} also matches {_unreachable_text(hidden)} left without an "
            f"adapter: {note}",
            stacklevel=2,
        )
    _warn_unused_exclude(config, sites, modules)
    return out


def _warn_unused_exclude(config: LoraConfig, sites: Sequence[Site], modules: ModuleTree | None) -> None:
    """Warn, in PEFT's words, when ``exclude_modules`` excludes no module (a typo: 'quary'), and only when something
    was adapted (nothing adapted is an error already). As PEFT's ``inject_adapter`` counts it, a module is excluded
    when ``is_excluded`` holds for its name, whether targeted or not (a module to save counts too); the names are
    the module tree's where known, else those the sites give (their modules and every module above them)."""
    ex = config.exclude_modules
    if not ex:
        return
    names = {s.name for s in sites} | {s.part_of for s in sites if s.part_of} | set(modules or ())
    names |= {n.rsplit(".", i)[0] for n in list(names) for i in range(1, n.count(".") + 1)}
    names.discard("")
    if any(is_excluded(config, n) for n in names):
        return
    # As PEFT prints it: a list as the set its LoraConfig keeps, {'quary'} (sorted here, for a stable message), a
    # regex bare
    shown = "{" + ", ".join(repr(e) for e in sorted(ex)) + "}" if isinstance(ex, (list, set, tuple)) else str(ex)
    close = [] if isinstance(ex, str) else sorted({c for e in ex for c in _closest(str(e), sorted(names))})
    warnings.warn(
        f"You have passed exclude_modules={shown} but no modules were excluded. Please check that exclude_modules "
        "was set correctly." + (f" Module names close to it: {', '.join(close[:5])}" if close else ""),
        stacklevel=3,
    )
