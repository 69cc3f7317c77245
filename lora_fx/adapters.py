"""Adapter state in PEFT's file format, and the one place layouts are converted.

PEFT layout (files, FX graphs): ``<site>.lora_A.weight`` ``[r, in]``, ``<site>.lora_B.weight``
``[out, r]``, the scale ``alpha / r`` kept apart in the config.
Deployment layout (ONNX graphs, ``.onnx_adapter`` files): ``lora_A`` ``[in, r]``, ``lora_B``
``[r, out]`` with the scale folded into B, so the site's output gains exactly ``x @ A @ B``.
Modules trained in full (``modules_to_save``) are saved as PEFT saves them: each parameter under its
model name, ``base_model.model.<module>.<param>`` (``base_model.model.classifier.weight``), in both layouts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lora_fx.config import ADAPTER_CONFIG_NAME, LoraConfig
from lora_fx.errors import AdapterError, ConfigError
from lora_fx.files import atomic_path

WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def to_deployment_layout(a: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT ``A [r, in]``, ``B [out, r]``, scale → ONNX ``A [in, r]``, ``B [r, out]`` with the scale in B."""
    return a.t().contiguous(), (b * scale).t().contiguous()


def from_deployment_layout(a: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``to_deployment_layout`` for a known scale."""
    return a.t().contiguous(), (b / scale).t().contiguous()


def peft_key(site: str, which: str) -> str:
    return f"{PEFT_PREFIX}{site}.lora_{which}.weight"


def peft_site_name(site: str, part_of: str | None = None) -> str:
    """The module path PEFT keys a site's adapter under.

    A site adapted as part of a module PEFT wraps as a whole (``part_of``: nn.MultiheadAttention's
    out_proj) sits below that module's ``base_layer``: ``attn.out_proj`` -> ``attn.base_layer.out_proj``.
    """
    if part_of and site.startswith(f"{part_of}."):
        return f"{part_of}.base_layer{site[len(part_of):]}"
    return site


def site_of_peft_name(name: str) -> tuple[str, str | None]:
    """The inverse of ``peft_site_name``: ``attn.base_layer.out_proj`` -> (``attn.out_proj``, ``attn``).

    ``base_layer`` inside a saved PEFT key only ever marks a module wrapped below another wrapped one."""
    part_of, sep, rest = name.partition(".base_layer.")
    return (f"{part_of}.{rest}", part_of) if sep else (name, None)


def key_parts_as_peft(config: LoraConfig, tensors: dict[str, torch.Tensor], records: dict[str, dict[str, Any]]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """An adapter keyed by lora_fx site names (``target_modules`` the site list), keyed as PEFT has it where a
    site was adapted as part of a module (``records[site]["part_of"]``, as ``lora_sites`` holds them): the
    tensors under ``peft_site_name``, the module itself in ``target_modules`` in place of the site."""
    parts = {site: rec["part_of"] for site, rec in records.items() if rec.get("part_of")}
    if not parts:
        return config, tensors
    renamed = {}
    for key, value in tensors.items():
        if not is_lora_key(key):  # a module trained in full keeps its model name
            renamed[key] = value
            continue
        site, which = parse_peft_key(key)
        renamed[peft_key(peft_site_name(site, parts.get(site)), which) if site in parts else key] = value
    if isinstance(config.target_modules, list):
        kept = [t for t in config.target_modules if t not in parts]
        config.target_modules = kept + sorted(set(parts.values()) - set(kept))
    return config, renamed


def is_lora_key(key: str) -> bool:
    """A LoRA matrix's key (``...lora_A.weight``), as opposed to a parameter of a module trained in full."""
    return (".lora_A." in key or ".lora_B." in key) and key.endswith(".weight")


def split_saved(tensors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An adapter's tensors as (LoRA matrices by key, parameters of modules trained in full by model name)."""
    lora = {k: v for k, v in tensors.items() if is_lora_key(k)}
    saved = {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items() if not is_lora_key(k)}
    return lora, saved


def parse_peft_key(key: str) -> tuple[str, str]:
    """``base_model.model.<site>.lora_A[.<adapter>].weight`` → (site, "A")."""
    body = key.removeprefix(PEFT_PREFIX)
    for which in ("A", "B"):
        marker = f".lora_{which}."
        if marker in body and body.endswith(".weight"):
            return body.split(marker)[0], which
    raise AdapterError(f"{key!r} is not a LoRA weight key (expected base_model.model.<site>.lora_A.weight)")


def write_peft_dir(directory: str | os.PathLike, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors``.

    A new folder is written under a temporary name beside it and renamed into place, so it appears whole or not
    at all; in an existing folder each file is replaced whole or not at all."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from lora_fx.files import _UMASK, check_output_dir
    from lora_fx.onnx_adapter import check_finite_to_write

    directory = Path(directory)
    check_output_dir(directory)  # a file of that name: FileExistsError named neither the problem nor the way out
    # Before anything is written: PEFT would load such a folder and make every output of its sites NaN (exit status 0).
    check_finite_to_write(tensors)

    def write(into: Path) -> None:
        with atomic_path(into / WEIGHTS_NAME) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        config.save_pretrained(into)

    if directory.is_dir():
        write(directory)
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Interrupted (Ctrl-C during an export) a folder made in place was left empty or half-written, and read
    # later as an adapter without weights.
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it owner-only; a folder made by mkdir would not be
        write(tmp)
        os.rename(tmp, directory)  # onto a folder made meanwhile: refused unless it is empty
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_peft_dir(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read a PEFT LoRA adapter directory (safetensors only: nothing is unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"{directory} is not a directory; an adapter directory holds {ADAPTER_CONFIG_NAME} and {WEIGHTS_NAME}")
    config = LoraConfig.from_pretrained(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        if (directory / "adapter_model.bin").exists():
            raise AdapterError(f"{directory} holds adapter_model.bin, a pickle file lora_fx never reads; re-save it with safe_serialization=True")
        raise AdapterError(f"{weights} not found")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights} is not a readable safetensors file: {exc}") from None
    from lora_fx.onnx_adapter import check_nonempty

    check_nonempty(tensors, str(weights))  # rank 0: the base model, and a CUDA failure once deployed
    _check_values(tensors, weights)
    return config, tensors


def _check_values(tensors: dict[str, torch.Tensor], weights: Path) -> None:
    """LoRA matrices are floating point and every floating tensor is finite: loading would otherwise cast integers
    to other numbers than were trained, or make every output of the adapted sites NaN."""
    for key, value in tensors.items():
        if is_lora_key(key) and not value.is_floating_point():
            raise AdapterError(f"{weights}: adapter tensor {key!r} is {value.dtype}, but LoRA matrices are floating "
                               f"point; the file was not saved by PEFT or lora_fx: save the adapter again")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise AdapterError(f"{weights}: adapter tensor {key!r} holds {bad} NaN or inf values of {value.numel()}; "
                               f"it was saved from a diverged training run: train again (lower the learning rate) "
                               f"or use an earlier checkpoint")


def save_adapter(model: Any, directory: str | os.PathLike) -> Path:
    """Save the model's LoRA adapter in PEFT's format (loads with ``PeftModel.from_pretrained``)."""
    import torch.fx as fx

    if not isinstance(model, fx.GraphModule):
        from lora_fx.api import _is_onnx

        if _is_onnx(model) and any(k == "lora_fx.prefix" for k in model.metadata_props):
            from lora_fx.prefix_adapters import save_onnx_prefix_adapter

            return save_onnx_prefix_adapter(model, directory)
        if _is_onnx(model):
            from lora_fx.onnx_adapter import save_onnx_adapter

            return save_onnx_adapter(model, directory)
        raise ConfigError(f"save_adapter takes a rewritten GraphModule or onnx_ir Model, got {type(model).__name__}")
    from lora_fx.passes.fx.capture import meta
    from lora_fx.targeting import resolve_target_modules

    info = meta(model)
    if info.get("prefix"):
        from lora_fx.prefix_adapters import save_prefix_adapter  # prefix-tuning: PEFT's prompt_embeddings format

        return save_prefix_adapter(model, directory)
    config: LoraConfig | None = info.get("adapters", {}).get("default")
    lora_sites = info.get("lora_sites", {})
    if config is None or not lora_sites:
        raise AdapterError("this model has no LoRA adapter to save; call lora_fx.apply(model, LoraConfig(...)) first")
    tensors = {}
    for site, rec in lora_sites.items():
        module = model.get_submodule(site)
        name = peft_site_name(site, rec.get("part_of"))
        tensors[peft_key(name, "A")] = module.lora_A.weight
        tensors[peft_key(name, "B")] = module.lora_B.weight
    from lora_fx.passes.fx.freeze_base import saved_base

    params = dict(model.named_parameters())
    for name in saved_base(model):  # modules trained in full, under the keys PEFT saves them with
        tensors[f"{PEFT_PREFIX}{name}"] = params[name]
    saved = LoraConfig.from_dict(config.to_dict())
    if isinstance(saved.target_modules, str) and saved.target_modules.lower() == "all-linear" or saved.target_modules is None:
        # PEFT stores the expanded names too, so the file means the same thing on any model. A site adapted as
        # part of a module (out_proj of an nn.MultiheadAttention) comes with that module's name.
        saved.target_modules = sorted({rec.get("part_of") or site for site, rec in lora_sites.items()})
    return write_peft_dir(directory, saved, tensors)


def _peft_type(directory: str | os.PathLike) -> str | None:
    """The ``peft_type`` an adapter directory's config names, or None where there is none to read."""
    import json

    path = Path(directory) / ADAPTER_CONFIG_NAME
    try:
        return str(json.loads(path.read_text()).get("peft_type", "LORA")).upper()
    except (OSError, ValueError, AttributeError):
        return None


def load_adapter(model: Any, directory: str | os.PathLike) -> Any:
    """Load a PEFT LoRA adapter directory onto ``model``.

    If the model has no adapter yet, the adapter's config is applied first. Every tensor must fit
    its site; a mismatch names the site, the expected and the found shape. Onto a model that has an
    adapter, the loaded config must adapt the same sites with the same ranks, and its scales and
    ``lora_dropout`` replace the graph's, as PEFT builds the loaded adapter from its config.
    Copies of base weights PEFT saves with an adapter (embedding layers) load when they are the model's.
    """
    import torch.fx as fx

    if _peft_type(directory) == "PREFIX_TUNING":
        from lora_fx.prefix_adapters import load_prefix_adapter

        return load_prefix_adapter(model, directory)
    config, tensors = read_peft_dir(directory)
    tensors, saved = split_saved(tensors)
    if not isinstance(model, fx.GraphModule):
        from lora_fx.api import _is_onnx

        if _is_onnx(model):
            from lora_fx.onnx_adapter import load_onnx_adapter, onnx_base_weight
            from lora_fx.passes.onnx.freeze_base import check_saved_tensors, load_saved_tensors, selected_modules

            saved = drop_base_copies(saved, selected_modules(model, config), lambda name: onnx_base_weight(model, name), directory)
            check_saved_tensors(model, config, saved, directory)  # before the LoRA load changes anything
            load_onnx_adapter(model, config, tensors)
            return load_saved_tensors(model, config, saved)  # the head, trained in full (modules_to_save)
        raise ConfigError(f"load_adapter takes a GraphModule or onnx_ir Model, got {type(model).__name__}")
    from lora_fx.api import apply
    from lora_fx.passes.fx.capture import meta
    from lora_fx.passes.fx.find_sites import module_tree
    from lora_fx.targeting import select_modules_to_save

    info = meta(model)
    # PEFT's copies of base weights (saved embedding layers): checked to be the model's, then left out.
    saved = drop_base_copies(saved, select_modules_to_save(config, module_tree(model)), lambda name: _fx_base_weight(model, name), directory)
    reloading = bool(info.get("lora_sites"))
    if not reloading:
        # Checked against the sites the config would adapt before apply changes anything: a refused
        # adapter leaves the model as it was.
        _check_tensors(tensors, _planned_shapes(model, config), directory)
        _check_saved(model, config, saved, directory)
        apply(model, config)
    else:
        _check_saved(model, config, saved, directory)
    lora_sites = info["lora_sites"]
    # Keyed by the names PEFT files use (attn.base_layer.out_proj for an nn.MultiheadAttention's out_proj).
    params = {
        peft_site_name(site, rec.get("part_of")): {w: getattr(model.get_submodule(site), f"lora_{w}").weight for w in "AB"}
        for site, rec in lora_sites.items()
    }
    _check_tensors(tensors, {site: {w: tuple(p.shape) for w, p in ps.items()} for site, ps in params.items()}, directory)
    if reloading:
        _check_config_fits_graph(model, config, directory)  # the tensors fit: so must the config recorded with them
    updates = []
    for key, value in tensors.items():
        site, which = parse_peft_key(key)
        updates.append((params[site][which], value))
    updates += _saved_updates(model, config, saved)
    with torch.no_grad():
        for param, value in updates:
            param.copy_(value.to(param.dtype))
    # Scales and dropout come from the loaded config, as PEFT builds the adapter from it: refresh them in the graph.
    _refresh_dropout(model, config.lora_dropout)
    _refresh_scales(model, config)
    return model


def _check_saved(gm: Any, config: Any, saved: dict[str, Any], directory: Any, key_prefix: str = PEFT_PREFIX) -> dict[str, Any]:
    """The parameters of the modules ``config.modules_to_save`` names in ``gm``, each checked to have exactly one
    tensor of its shape in ``saved`` (a model name -> tensor map, read from keys ``key_prefix`` + name)."""
    from lora_fx.passes.fx.find_sites import module_tree
    from lora_fx.passes.fx.freeze_base import module_parameters
    from lora_fx.targeting import select_modules_to_save

    params = module_parameters(gm, select_modules_to_save(config, module_tree(gm)))
    for name, value in saved.items():
        if name not in params:
            raise AdapterError(
                f"adapter tensor {key_prefix + name!r} is neither {'a LoRA matrix' if key_prefix == PEFT_PREFIX else 'a prefix'} "
                f"nor a parameter of a module its config's modules_to_save={config.modules_to_save!r} names in this model"
                + (f" (those hold: {', '.join(sorted(params)[:6])})" if params else "")
                + "; was it saved from another model?"
            )
        if tuple(value.shape) != tuple(params[name].shape):
            raise AdapterError(
                f"adapter tensor {key_prefix}{name} has shape {tuple(value.shape)}, but this model's {name} is "
                f"{tuple(params[name].shape)}; was it trained on another model (another number of labels)?"
            )
    missing = sorted(set(params) - set(saved))
    if missing:
        raise AdapterError(
            f"adapter in {directory} lacks the trained {', '.join(missing[:6])}: its config trains "
            f"modules_to_save={config.modules_to_save!r} in full, so PEFT saves their weights with the adapter"
        )
    return params


def _saved_updates(gm: Any, config: Any, saved: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(parameter, value) pairs setting the modules trained in full to ``saved``. The modules ``config`` names are
    recorded as trained in full (trainable from now on); any recorded earlier that it does not name go back to
    their base values and are frozen again, as they are in PEFT with the loaded adapter active."""
    from lora_fx.passes.fx.capture import meta
    from lora_fx.passes.fx.find_sites import module_tree
    from lora_fx.passes.fx.freeze_base import MODULES_TO_SAVE, freeze_base, record_modules_to_save, saved_base
    from lora_fx.targeting import select_modules_to_save

    paths = select_modules_to_save(config, module_tree(gm))
    named = set(record_modules_to_save(gm, paths))
    params = dict(gm.named_parameters())
    base = saved_base(gm)
    updates = [(params[name], base.pop(name)) for name in list(base) if name not in named]
    record = meta(gm).get(MODULES_TO_SAVE)
    if record is not None:
        record["modules"] = [m for m in record["modules"] if m in paths]
    freeze_base(gm)
    return updates + [(params[name], saved[name]) for name in sorted(named)]


def _planned_shapes(gm: Any, config: LoraConfig) -> dict[str, dict[str, tuple[int, int]]]:
    """PEFT-layout shapes ``{site: {"A": (r, in), "B": (out, r)}}`` of the adapter ``config`` would insert,
    keyed by the names PEFT files use."""
    from lora_fx.passes.fx.capture import meta
    from lora_fx.passes.fx.find_sites import find_sites, module_tree
    from lora_fx.targeting import select_targets

    targets = select_targets(find_sites(gm), config, model_type=meta(gm).get("model_type"), modules=module_tree(gm))  # as apply selects
    return {
        peft_site_name(t.site.name, t.part_of): {"A": (t.r, t.site.in_features), "B": (t.site.out_features, t.r)} for t in targets
    }


def _check_tensors(tensors: dict[str, Any], expected: dict[str, dict[str, tuple[int, int]]], directory: Any) -> None:
    """Every tensor names a site with a LoRA slot and has its shape, and no site lacks one."""
    seen: set[str] = set()
    for key, value in tensors.items():
        site, which = parse_peft_key(key)
        if site not in expected:
            raise AdapterError(
                f"adapter tensor {key!r} is for site {site!r}, which has no LoRA slot in this model; "
                f"sites with LoRA: {', '.join(sorted(expected)) or 'none'}"
            )
        want = tuple(expected[site][which])
        if tuple(value.shape) != want:
            raise AdapterError(
                f"adapter tensor {key!r} has shape {tuple(value.shape)}, but site {site} expects {want} "
                f"(lora_A is [r, in_features], lora_B is [out_features, r]); was it trained with another rank or model?"
            )
        seen.add(f"{site}.{which}")
    missing = [f"{s}.lora_{w}" for s in expected for w in "AB" if f"{s}.{w}" not in seen]
    if missing:
        raise AdapterError(f"adapter in {directory} lacks tensors for: {', '.join(missing[:10])}")


def _refresh_scales(gm: Any, config: LoraConfig) -> None:
    from lora_fx.passes.fx.capture import meta
    from lora_fx.targeting import pattern_value

    info = meta(gm)
    new_scales = {}
    for site, rec in info["lora_sites"].items():
        key = rec.get("part_of") or site  # out_proj takes its nn.MultiheadAttention's rank and alpha, as in PEFT
        r = int(pattern_value(config.rank_pattern, key, config.r))
        alpha = float(pattern_value(config.alpha_pattern, key, config.lora_alpha))
        new_scales[site] = config.scaling(r, alpha)
        info["lora_sites"][site].update(r=r, alpha=alpha)  # the record says what runs, as save_adapter reads it
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.mul.Tensor and node.meta.get("lora_fx_inserted"):
            lin = node.args[0]
            b_attr = lin.args[1] if hasattr(lin, "args") else None
            target = getattr(b_attr, "target", "")
            if isinstance(target, str) and target.endswith(".lora_B.weight"):
                site = target.removesuffix(".lora_B.weight")
                if site in new_scales and node.args[1] != new_scales[site]:
                    node.args = (node.args[0], new_scales[site])
                    info["lora_sites"][site]["scale"] = new_scales[site]
                    changed = True
    if changed:
        gm.recompile()
    info.setdefault("adapters", {})["default"] = config


def _refresh_dropout(gm: Any, p: float) -> None:
    """Every LoRA branch of ``gm`` drops its input with probability ``p`` (the loaded config's ``lora_dropout``), as
    ``insert_lora`` builds it: ``dropout(x, p, training)`` read by ``linear(·, A)`` alone. A branch without dropout
    gains one, a branch whose ``p`` becomes 0 loses it, so a graph that loaded an adapter trains as one that applied
    that adapter's config would (PEFT's ``load_adapter`` builds the adapter's dropout from the loaded config)."""
    from lora_fx.passes.fx.capture import meta
    from lora_fx.passes.fx.find_sites import INSERTED

    aten = torch.ops.aten
    graph = gm.graph
    training = bool(meta(gm).get("training", False))
    changed = False
    for node in list(graph.nodes):
        if not (node.op == "get_attr" and isinstance(node.target, str) and node.target.endswith(".lora_A.weight")):
            continue
        for lin in list(node.users):  # linear(h, A), one per call of the site
            if lin.target is not aten.linear.default or lin.args[1] is not node:
                continue
            h = lin.args[0]
            drop = h if getattr(h, "target", None) is aten.dropout.default and h.meta.get(INSERTED) else None
            if drop is not None and p > 0:
                if drop.args[1] != p:
                    drop.args = (drop.args[0], p, *drop.args[2:])
                    changed = True
            elif drop is not None:
                lin.args = (drop.args[0], *lin.args[1:])
                if not drop.users:
                    graph.erase_node(drop)
                changed = True
            elif p > 0:
                with graph.inserting_before(lin):
                    new = graph.call_function(aten.dropout.default, (h, p, training))
                new.meta[INSERTED] = True
                new.meta["nn_module_stack"] = lin.meta.get("nn_module_stack", {})
                lin.args = (new, *lin.args[1:])
                changed = True
    if changed:
        graph.lint()
        gm.recompile()


def _check_config_fits_graph(gm: Any, config: LoraConfig, directory: Any) -> None:
    """Loading onto a graph that has adapters keeps its sites and ranks: refuse a config that would adapt other sites
    or give them other ranks (its ``target_modules``, ``r``, ``rank_pattern``) than the graph has, rather than record
    a config the graph does not run. The tensors are checked against the graph's own slots apart."""
    from lora_fx.passes.fx.capture import meta

    have = {peft_site_name(site, rec.get("part_of")): rec for site, rec in meta(gm)["lora_sites"].items()}
    try:
        planned = _planned_shapes(gm, config)
    except (AdapterError, ConfigError) as exc:
        raise AdapterError(
            f"the adapter in {directory} does not fit this model's adapter ({exc}); load it onto the model without "
            "adapters (lora_fx.capture again), which applies its config first"
        ) from None
    what = site_rank_mismatch({s: shapes["A"][0] for s, shapes in planned.items()}, {s: int(rec["r"]) for s, rec in have.items()})
    if what:
        raise AdapterError(
            f"the config in {directory} (target_modules={config.target_modules!r}, r={config.r}, rank_pattern="
            f"{config.rank_pattern!r}) does not describe the adapter this model has: {what}. Load it onto the model "
            "without adapters (lora_fx.capture again), which applies its config first"
        )


def site_rank_mismatch(planned: dict[str, int], have: dict[str, int]) -> str | None:
    """How the sites and ranks a loaded config would adapt (``planned``: PEFT site name -> r) differ from those the
    model's adapter has (``have``), in words, or None when they agree. Both front ends refuse a reload on it."""
    extra, lacking = sorted(set(planned) - set(have)), sorted(set(have) - set(planned))
    ranks = sorted(f"{s} (r={planned[s]} in the config, {have[s]} here)" for s in set(planned) & set(have) if planned[s] != have[s])
    return "; ".join(part for part in (
        f"it adapts {', '.join(extra[:4])}, which this model's adapter lacks" if extra else "",
        f"it leaves out {', '.join(lacking[:4])}" if lacking else "",
        f"other ranks: {', '.join(ranks[:4])}" if ranks else "",
    ) if part) or None


def _fx_base_weight(gm: Any, name: str) -> torch.Tensor | None:
    """The base value of ``gm``'s parameter or buffer ``name`` (a tied alias such as ``lm_head.weight`` included);
    for a module trained in full, the base copy ``record_modules_to_save`` kept."""
    from lora_fx.passes.fx.freeze_base import saved_base

    base = saved_base(gm).get(name)
    if base is None:
        base = gm.state_dict(keep_vars=True).get(name)
    return None if base is None else base.detach()


def drop_base_copies(saved: dict[str, Any], trained: list[str], base_weight: Any, directory: Any) -> dict[str, Any]:
    """``saved`` (an adapter's non-LoRA tensors by model name) without the copies of base weights PEFT saves with an
    adapter: with ``save_embedding_layers`` it saves the embedding layers, a targeted one's as
    ``<module>.base_layer.weight`` (``lm_head.base_layer.weight``), an untargeted one's under its own name (a resized
    vocabulary). lora_fx never changes base weights, so a copy equal to the model's (``base_weight(name)``) is left
    out and one that differs is refused. Parameters of the modules at ``trained`` (``modules_to_save``) are kept, and
    so are names this model lacks (the caller refuses them)."""
    kept = {}
    for name, value in saved.items():
        module, sep, rest = name.partition(".base_layer.")
        model_name = f"{module}.{rest}" if sep else name
        if not sep and any(name.startswith(f"{path}.") for path in trained):
            kept[name] = value
            continue
        base = base_weight(model_name)
        if base is None:
            if sep:
                raise AdapterError(
                    f"adapter tensor {PEFT_PREFIX + name!r} is PEFT's copy of the base weight {model_name}, which this "
                    f"model lacks (or holds in no form lora_fx can compare); was it saved from another model?"
                )
            kept[name] = value
            continue
        _check_same_as_base(PEFT_PREFIX + name, torch.as_tensor(value), torch.as_tensor(base), model_name, directory)
    return kept


def _check_same_as_base(key: str, value: torch.Tensor, base: torch.Tensor, model_name: str, directory: Any) -> None:
    """Refuse a saved copy of ``model_name`` that differs from the model's base value beyond rounding to the coarser
    of the two dtypes (PEFT saves float32 copies of a float16 model's weights, and the other way round)."""
    way_out = (f"lora_fx never changes base weights: load the base model with that weight (a resized vocabulary: "
               f"resize the model's embeddings and load its trained weights before capture), then load the adapter; "
               f"or load the adapter with PEFT")
    why = (f"PEFT saves base weights with an adapter whose embedding layers it saves (save_embedding_layers: a "
           f"targeted embedding or lm_head, or a resized vocabulary)")
    if tuple(value.shape) != tuple(base.shape):
        raise AdapterError(f"adapter tensor {key!r} in {directory} has shape {tuple(value.shape)}, but this model's "
                           f"{model_name} is {tuple(base.shape)}: {why}, and this one is not the model's. {way_out}")
    if not (value.is_floating_point() and base.is_floating_point()):
        raise AdapterError(f"adapter tensor {key!r} in {directory} is a copy of {model_name}, which this model holds as "
                           f"{base.dtype} (quantized?), so lora_fx cannot check it is the model's; load the adapter onto "
                           f"the float model")
    eps = max(torch.finfo(value.dtype).eps, torch.finfo(base.dtype).eps)
    base32, value32 = base.float(), value.float()
    worst = float((value32 - base32).abs().max()) if value.numel() else 0.0
    if worst > eps * max(float(base32.abs().max()), torch.finfo(torch.float32).tiny):
        raise AdapterError(f"adapter tensor {key!r} in {directory} differs from this model's {model_name} (max "
                           f"difference {worst:.3g}): {why}, and this one was changed (trained or resized). {way_out}")
