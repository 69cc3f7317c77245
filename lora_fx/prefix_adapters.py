"""Prefix-tuning adapters in PEFT's file format, and the one place prefix layouts convert.

PEFT stores a prefix-tuning adapter as ``prompt_embeddings`` ``[T, num_layers * 2 * token_dim]``:
viewed as ``[T, num_layers * 2, kv_heads, head_dim]``, row ``2 l`` holds layer ``l``'s key prefix and
row ``2 l + 1`` its value prefix (``PeftModel.get_prompt`` permutes it to ``[layers * 2, batch,
heads, T, head_dim]`` and splits it into (key, value) pairs per layer). lora_fx graphs hold one
``<site>.prefix_key`` / ``<site>.prefix_value`` ``[kv_heads, T, head_dim]`` per attention site, the
sites in graph order standing for PEFT's layers. With ``prefix_projection`` the saved tensor is the
encoder's output (the folded prefixes), as PEFT saves it. Encoder-decoder models (BART, T5..., PEFT's
SEQ_2_SEQ_LM, ``num_transformer_submodules=2``) prefix the decoder's self-attention only, and decoder
layer l reads block ``2 l mod num_layers`` (the record's ``block``; see ``insert_prefix.seq2seq_block``),
``num_layers`` being the encoder's layer count (the record's ``num_blocks``).
Modules trained in full (``modules_to_save``; ``task_type="SEQ_CLS"``: the classification head) are saved beside
``prompt_embeddings`` as PEFT's prompt-learning models save them, ``base_model.<module>.<parameter>``
(``base_model.classifier.weight``: no LoraModel sits between PeftModel and the transformers model).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_fx.config import PrefixConfig
from lora_fx.errors import AdapterError, ConfigError, UnsupportedError

PROMPT_EMBEDDINGS = "prompt_embeddings"
# The key prefix of a module trained in full in a PEFT prompt-learning file (LoRA files: adapters.PEFT_PREFIX).
HEAD_PREFIX = "base_model."


def to_prompt_embeddings(prefixes: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Per-layer ``(P_k, P_v)`` ``[kv_heads, T, head_dim]`` → PEFT's ``[T, layers * 2 * kv_heads * head_dim]``."""
    rows = []
    for pk, pv in prefixes:
        for p in (pk, pv):
            rows.append(p.permute(1, 0, 2).reshape(p.shape[1], -1))  # [T, kv * hd]
    return torch.cat(rows, dim=1).contiguous()


def from_prompt_embeddings(emb: torch.Tensor, num_layers: int, kv_heads: int, head_dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The inverse of ``to_prompt_embeddings`` for uniform layers."""
    T = emb.shape[0]
    if emb.dim() != 2 or emb.shape[1] != num_layers * 2 * kv_heads * head_dim:
        raise AdapterError(
            f"{PROMPT_EMBEDDINGS} has shape {tuple(emb.shape)}, but this model's {num_layers} prefixed attention sites with "
            f"{kv_heads} key/value heads of size {head_dim} need [T, {num_layers * 2 * kv_heads * head_dim}] "
            "(num_layers * 2 * kv_heads * head_dim); was the adapter trained on another model?"
        )
    view = emb.reshape(T, num_layers * 2, kv_heads, head_dim)
    return [(view[:, 2 * i].permute(1, 0, 2).contiguous(), view[:, 2 * i + 1].permute(1, 0, 2).contiguous()) for i in range(num_layers)]


def _blocks(rec: dict[str, Any]) -> list[int]:
    """The block of PEFT's prompt_embeddings each recorded site reads, in site order."""
    return [r.get("block", i) for i, r in enumerate(rec["sites"].values())]


def num_blocks(rec: dict[str, Any]) -> int:
    """PEFT's ``num_layers`` for a prefix record: the blocks of ``prompt_embeddings`` (an encoder-decoder model
    has one per encoder layer, which may outnumber its decoder layers)."""
    return int(rec.get("num_blocks", len(rec["sites"])))


def to_peft_blocks(rec: dict[str, Any], prefixes: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The recorded sites' prefixes as PEFT's ``prompt_embeddings``: each in its block; a block no site reads
    (SEQ_2_SEQ_LM with an even layer count, or more encoder than decoder layers) is zero. Sites sharing a block must hold the same prefixes."""
    blocks: dict[int, tuple[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for (site, pair), block in zip(((s, prefixes[s]) for s in rec["sites"]), _blocks(rec)):
        if block in blocks:
            other, seen = blocks[block]
            if not all(torch.equal(a, b) for a, b in zip(seen, pair)):
                raise AdapterError(
                    f"sites {other} and {site} read the same block {block} of PEFT's SEQ_2_SEQ_LM prompt_embeddings "
                    "but hold different prefixes, which PEFT's format cannot store; keep them tied (lora_fx.apply "
                    "shares one parameter between them)"
                )
        blocks[block] = (site, pair)
    zero = tuple(torch.zeros_like(t) for t in next(iter(blocks.values()))[1])
    return to_prompt_embeddings([blocks[b][1] if b in blocks else zero for b in range(num_blocks(rec))])


def from_peft_blocks(rec: dict[str, Any], emb: torch.Tensor, kv_heads: int, head_dim: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The inverse of ``to_peft_blocks``: each recorded site's prefixes from its block."""
    pairs = from_prompt_embeddings(emb, num_blocks(rec), kv_heads, head_dim)
    return {site: pairs[block] for site, block in zip(rec["sites"], _blocks(rec))}


def _record(gm: Any) -> dict[str, Any]:
    from lora_fx.passes.fx.capture import meta

    rec = meta(gm).get("prefix")
    if not rec:
        raise AdapterError("this model has no prefixes; call lora_fx.apply(model, PrefixConfig(...)) first")
    return rec


def current_prefixes(gm: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each prefixed site's ``(P_k, P_v)`` as the graph uses them now (the encoder run when reparameterized)."""
    from lora_fx.passes.fx.insert_prefix import ENCODER, KEY, VALUE

    rec = _record(gm)
    sites = list(rec["sites"])
    if rec.get("projection"):
        with torch.no_grad():
            emb = getattr(gm, ENCODER)()
        first = rec["sites"][sites[0]]
        return from_peft_blocks(rec, emb, first["kv_heads"], first["head_dim"])
    out = {}
    for site in sites:
        module = gm.get_submodule(site)
        out[site] = (getattr(module, KEY).detach(), getattr(module, VALUE).detach())
    return out


# How a prefix adapter on some attention layers only is served: its .onnx_adapter, which holds any subset.
ONNX_ADAPTER_WAY_OUT = (
    "serve these prefixes through the .onnx_adapter export instead (lora_fx.export_onnx(gm, path, kwargs=..., "
    "mode='adapters', peft_dir=False); an ONNX file: lora-fx export FILE -o served.onnx --adapters --no-peft)"
)
BOTH_KINDS = (
    "holds both prefix-tuning prefixes and LoRA adapters (one method applied on top of the other), and PEFT has no "
    "adapter format holding both (a PEFT directory is one method's adapter)"
)


def subset_reason(missing: list[str], covered: int, total: int) -> str | None:
    """Why PEFT cannot hold prefixes on ``covered`` of the ``total`` attention layers PEFT's prefix-tuning reaches
    (``missing``: those left out, by name where known), or None when they cover all of them.

    PEFT's prefix-tuning has no per-layer targets: ``prompt_embeddings`` holds a block for every layer, ``num_layers``
    is the model's layer count, and ``target_modules`` is not one of its fields (PEFT ignores it, then its forward
    fails on the missing layers). A directory for a subset would not load in PEFT as this adapter."""
    if covered >= total:
        return None
    shown = f" (attention sites {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''} have none)" if missing else ""
    return (
        f"PEFT's prefix-tuning format holds a prefix for every layer (it has no per-layer targets), but the prefixes "
        f"cover {covered} of the model's {total} attention layers{shown}: target_modules selected a subset, so a PEFT "
        "directory would not load in PEFT as this adapter"
    )


def fx_subset_reason(gm: Any) -> str | None:
    """``subset_reason`` for a prefix-tuned GraphModule: the sites PEFT's prefix-tuning would prefix that it does not."""
    from lora_fx.passes.fx.find_sites import find_sites
    from lora_fx.passes.fx.insert_prefix import select_prefix_sites
    from lora_fx.sites import SiteKind

    rec = _record(gm)
    reachable, _ = select_prefix_sites(find_sites(gm), PrefixConfig(num_virtual_tokens=rec["num_virtual_tokens"]))
    every = [s.name for s in reachable if s.kind is SiteKind.ATTENTION]
    missing = [name for name in every if name not in rec["sites"]]
    return subset_reason(missing, len(every) - len(missing), len(every))


def onnx_subset_reason(model: Any) -> str | None:
    """``subset_reason`` for an ONNX model with prefixes (``lora_fx.prefix`` record).

    Only a config with ``target_modules`` (``lora-fx rewrite --target-modules``, ``lora_fx.apply``) prefixes a subset:
    a PEFT adapter loaded onto the file prefixes every site. The sites are counted, not matched by name, as a file
    exported from a torch graph names them after its modules rather than after its ONNX nodes."""
    from lora_fx.passes.onnx.find_sites import find_sites
    from lora_fx.passes.onnx.insert_prefix import select_prefix_sites

    config = _onnx_config(model)
    if config is None or config.target_modules is None:
        return None
    record = _onnx_record(model)
    every = select_prefix_sites(find_sites(model), dataclasses.replace(config, target_modules=None))
    missing = [s.name for s in every if s.name not in record["sites"]]
    covered = len(record["sites"])
    # Names that do not match the record's (a file exported from a torch graph) are not listed as missing.
    return subset_reason(missing if len(missing) == len(every) - covered else [], covered, len(every))


def _onnx_record(model: Any) -> dict[str, Any]:
    from lora_fx.passes.onnx.insert_prefix import prefix_metadata

    record = prefix_metadata(model)
    if not record:
        raise AdapterError("this model has no prefixes; call lora_fx.apply(model, PrefixConfig(...)) first")
    return record


def _onnx_config(model: Any) -> PrefixConfig | None:
    """The PrefixConfig the ONNX model's prefixes were inserted with (``lora_fx.prefix_config``), if recorded."""
    import json

    from lora_fx.passes.onnx.insert_prefix import PREFIX_CONFIG_KEY

    text = model.metadata_props.get(PREFIX_CONFIG_KEY)
    return PrefixConfig.from_dict(json.loads(text)) if text else None


def save_prefix_adapter(gm: Any, directory: str | os.PathLike) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``PeftModel.from_pretrained`` loads.

    Refused (``subset_reason``) for prefixes on some layers only, which PEFT's format cannot hold, and for a graph
    that also holds LoRA adapters."""
    from lora_fx.adapters import write_peft_dir
    from lora_fx.passes.fx.capture import meta

    rec = _record(gm)
    if meta(gm).get("lora_sites"):
        raise AdapterError(
            f"this model {BOTH_KINDS}; save_adapter would drop one of them. Apply PrefixConfig and LoraConfig to "
            "separate captures of the model, and train and save each on its own"
        )
    config = meta(gm).get("adapters", {}).get("default")
    if not isinstance(config, PrefixConfig):
        raise AdapterError("this model's prefixes have no PrefixConfig recorded; apply them with lora_fx.apply(model, PrefixConfig(...))")
    reason = fx_subset_reason(gm)
    if reason:
        raise AdapterError(f"{reason}; {ONNX_ADAPTER_WAY_OUT}, or apply PrefixConfig without target_modules to save in "
                           "PEFT's format")
    shapes = {(s["kv_heads"], s["head_dim"]) for s in rec["sites"].values()}
    if len(shapes) != 1:
        raise AdapterError(f"PEFT's prefix-tuning format needs one prefix shape for all layers; this model has {sorted(shapes)}")
    prefixes = current_prefixes(gm)
    emb = to_peft_blocks(rec, prefixes)
    kv, hd = shapes.pop()
    saved = PrefixConfig.from_dict(config.to_dict())
    # Every layer has its prefix (checked above): the directory says so as PEFT reads it, without lora_fx's
    # target_modules, which PEFT ignores and which names sites as this graph does (not as an ONNX file does).
    saved.target_modules = None
    saved.num_transformer_submodules = rec.get("num_transformer_submodules", 1)
    saved.token_dim, saved.num_attention_heads, saved.num_layers = kv * hd, kv, num_blocks(rec)
    saved.encoder_hidden_size = saved.encoder_hidden_size or saved.token_dim
    return write_peft_dir(directory, saved, {PROMPT_EMBEDDINGS: emb, **_fx_heads(gm)})


def _fx_heads(gm: Any) -> dict[str, torch.Tensor]:
    """The parameters of the modules ``gm`` trains in full, under PEFT's prompt-learning keys."""
    from lora_fx.passes.fx.freeze_base import saved_base

    params = dict(gm.named_parameters())
    return {f"{HEAD_PREFIX}{name}": params[name] for name in saved_base(gm)}


def _split_heads(tensors: dict[str, torch.Tensor], directory: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A prefix adapter's ``prompt_embeddings`` and its modules trained in full by model name (``classifier.weight``)."""
    if PROMPT_EMBEDDINGS not in tensors:
        raise AdapterError(f"{directory} holds no {PROMPT_EMBEDDINGS!r} tensor (found: {', '.join(sorted(tensors)) or 'none'})")
    heads = {}
    for key, value in tensors.items():
        if key == PROMPT_EMBEDDINGS:
            continue
        if not key.startswith(HEAD_PREFIX):
            raise AdapterError(
                f"{directory}: tensor {key!r} is neither {PROMPT_EMBEDDINGS} nor a parameter of a module trained in full "
                f"({HEAD_PREFIX}<module>.<parameter>, as PEFT's prefix tuning saves modules_to_save); was the adapter "
                "saved by another tool?"
            )
        heads[key.removeprefix(HEAD_PREFIX)] = value
    return tensors[PROMPT_EMBEDDINGS], heads


def _heads_unsaved(directory: Path, heads: dict[str, torch.Tensor]) -> bool:
    """A file whose config leaves ``modules_to_save`` unset and that holds no head, though its task type (SEQ_CLS) makes
    PEFT train one: written by lora_fx before it trained the head, with the base head. PEFT cannot load it (it looks for
    the head's tensors); lora_fx loads it with the base head it was trained with, and saves that head with it again."""
    from lora_fx.config import read_adapter_config

    return not heads and read_adapter_config(directory).get("modules_to_save") is None


def _fx_base_heads(gm: Any, config: PrefixConfig) -> dict[str, torch.Tensor]:
    """The base values of the parameters ``config.modules_to_save`` trains in full in ``gm``."""
    from lora_fx.passes.fx.find_sites import module_tree
    from lora_fx.passes.fx.freeze_base import module_parameters, saved_base
    from lora_fx.targeting import select_modules_to_save

    base = saved_base(gm)
    params = module_parameters(gm, select_modules_to_save(config, module_tree(gm)))
    return {name: base.get(name, p).detach().clone() for name, p in params.items()}


def _onnx_base_heads(model: Any, config: PrefixConfig) -> dict[str, torch.Tensor]:
    """``_fx_base_heads`` for an ONNX model."""
    from lora_fx.onnx_adapter import _torch
    from lora_fx.passes.onnx.freeze_base import plan_modules_to_save, saved_base, selected_modules

    paths = selected_modules(model, config)
    out = {p.name: _torch(p.array) for p in plan_modules_to_save(model, config)}
    for name, (module, base) in saved_base(model).items():
        if any(module == m or module.startswith(f"{m}.") for m in paths):
            out[name] = _torch(base)
    return out


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lora_fx.adapters import WEIGHTS_NAME, _check_values

    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        if (directory / "adapter_model.bin").exists():
            raise AdapterError(f"{directory} holds adapter_model.bin, a pickle file lora_fx never reads; re-save it with safe_serialization=True")
        raise AdapterError(f"{weights} not found")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights} is not a readable safetensors file: {exc}") from None
    # As for LoRA files, before anything is loaded: NaN prefixes make every attention output they reach NaN.
    _check_values(tensors, weights)
    return tensors


def load_prefix_adapter(gm: Any, directory: str | os.PathLike) -> Any:
    """Load a PEFT prefix-tuning adapter directory onto a captured GraphModule.

    A model without prefixes gets raw prefix slots first (the file holds folded prefixes even when
    trained with ``prefix_projection``, as PEFT's inference mode reads them).
    """
    import torch.fx as fx

    from lora_fx.adapters import _check_saved, _saved_updates
    from lora_fx.api import _is_onnx, apply
    from lora_fx.passes.fx.capture import meta
    from lora_fx.passes.fx.insert_prefix import KEY, VALUE, _task_type
    from lora_fx.passes.onnx.freeze_base import check_saved_tensors, load_saved_tensors

    directory = Path(directory)
    if not (isinstance(gm, fx.GraphModule) or _is_onnx(gm)):
        raise ConfigError(f"prefix adapters load onto a GraphModule (lora_fx.capture) or an onnx_ir Model (lora_fx.load), got {type(gm).__name__}")
    config = PrefixConfig.from_pretrained(directory)
    emb, heads = _split_heads(_read_tensors(directory), directory)
    unsaved = _heads_unsaved(directory, heads)
    if _is_onnx(gm):
        from lora_fx.passes.onnx.insert_prefix import prefix_metadata

        layout = prefix_metadata(gm).get("num_transformer_submodules", 1) if prefix_metadata(gm) else None
        if config.num_transformer_submodules == 2 and layout not in (None, 2):
            raise AdapterError(
                f"{directory} is an encoder-decoder (SEQ_2_SEQ_LM, num_transformer_submodules=2) prefix adapter, but this "
                "ONNX model holds decoder-only prefix slots; was the adapter trained on another model?"
            )
        if layout == 2 and config.num_transformer_submodules != 2:
            raise AdapterError(
                f"{directory} is a decoder-only / encoder-only prefix adapter (num_transformer_submodules="
                f"{config.num_transformer_submodules or 1}), but this ONNX model holds encoder-decoder (SEQ_2_SEQ_LM) "
                "prefix slots; was the adapter trained on another model?"
            )
        config = dataclasses.replace(config, prefix_projection=False)
        heads = _onnx_base_heads(gm, config) if unsaved else heads
        check_saved_tensors(gm, config, heads, directory, key_prefix=HEAD_PREFIX)  # before anything changes
        _load_onto_onnx(gm, config, emb)
        return load_saved_tensors(gm, config, heads)
    info = meta(gm)
    if config.task_type is None and _task_type(str(info.get("model_class") or "")) == "SEQ_CLS":
        # As apply finds it (and writes it into the config it records): PEFT then trains and saves the head.
        config = dataclasses.replace(config, task_type="SEQ_CLS")
    heads = _fx_base_heads(gm, config) if unsaved else heads
    _check_saved(gm, config, heads, directory, key_prefix=HEAD_PREFIX)  # before anything changes
    if not info.get("prefix"):
        from lora_fx.passes.fx.find_sites import find_sites
        from lora_fx.passes.fx.insert_prefix import describe, peft_num_layers, select_prefix_sites

        # The embeddings must fit the sites the config would prefix before apply changes anything: a
        # refused adapter leaves the model as it was.
        sites = find_sites(gm)
        chosen, blocks = select_prefix_sites(sites, config)
        planned = [describe(s) for s in chosen]
        shapes = {(p.kv_heads, p.head_dim) for p in planned}
        if len(shapes) == 1:
            from_prompt_embeddings(emb, peft_num_layers(sites, chosen, blocks), *shapes.pop())
        apply(gm, dataclasses.replace(config, prefix_projection=False))
    rec = info["prefix"]
    if rec.get("projection"):
        raise AdapterError(
            "this model computes its prefixes with a projection encoder (prefix_projection=True), which cannot be set from "
            "saved prefixes; load the adapter onto a fresh capture (it then gets raw prefixes)"
        )
    if emb.shape[0] != rec["num_virtual_tokens"]:
        raise AdapterError(
            f"the adapter has {emb.shape[0]} virtual tokens, the model's prefixes {rec['num_virtual_tokens']}; "
            "load it onto a fresh capture"
        )
    shapes = {(s["kv_heads"], s["head_dim"]) for s in rec["sites"].values()}
    if len(shapes) != 1:
        raise AdapterError(f"PEFT's prefix-tuning format needs one prefix shape for all layers; this model has {sorted(shapes)}")
    kv, hd = shapes.pop()
    pairs = from_peft_blocks(rec, emb, kv, hd)
    # The head trained in full as the adapter has it; one apply trained that this adapter does not goes back to its base.
    updates = _saved_updates(gm, config, heads)
    with torch.no_grad():
        for site, (pk, pv) in pairs.items():
            module = gm.get_submodule(site)
            getattr(module, KEY).copy_(pk.to(getattr(module, KEY).dtype))
            getattr(module, VALUE).copy_(pv.to(getattr(module, VALUE).dtype))
        for param, value in updates:
            param.copy_(value.to(param.dtype))
    recorded = info["adapters"]["default"]  # saved with the model's prefixes: it describes the loaded head now
    recorded.task_type, recorded.modules_to_save = config.task_type, config.modules_to_save
    return gm


def _load_onto_onnx(model: Any, config: PrefixConfig, emb: torch.Tensor) -> Any:
    """A PEFT prefix adapter onto an ONNX file: new prefix slots, or new values in existing ones."""
    from lora_fx.passes.onnx.find_sites import attention_parts, find_sites
    from lora_fx.passes.onnx.insert_lora import to_ir_tensor
    from lora_fx.passes.onnx.insert_prefix import InsertPrefix, prefix_metadata, refuse_merged_heads, select_attention_sites

    record = prefix_metadata(model)
    if record:
        sites = list(record["sites"])
        shapes = {(r["kv_heads"], r["head_dim"]) for r in record["sites"].values()}
    else:
        refuse_merged_heads(model)
        found = select_attention_sites(find_sites(model), dataclasses.replace(config, target_modules=None))
        sites = [s.name for s in found]
        parts = [attention_parts(s.handle) for s in found]
        shapes = {(p.kv_heads, p.head_dim) for p in parts if p is not None}
    if len(shapes) != 1:
        raise AdapterError(f"PEFT's prefix-tuning format needs one prefix shape for all layers; this model has {sorted(shapes)}")
    kv, hd = shapes.pop()
    if not record and config.num_transformer_submodules == 2:
        # PEFT's SEQ_2_SEQ_LM layout: the decoder's self-attention sites only, each reading its block of the
        # embeddings; read as the pass will lay them out, and checked before it changes anything.
        from lora_fx.passes.onnx.insert_prefix import select_prefix_sites, seq2seq_blocks, seq2seq_roles

        every = find_sites(model)
        roles = seq2seq_roles(every)
        if roles is None:
            raise AdapterError(
                "this is an encoder-decoder (SEQ_2_SEQ_LM, num_transformer_submodules=2) prefix adapter, but this ONNX "
                "model has no cross-attention: was the adapter trained on another model?"
            )
        found = select_prefix_sites(every, dataclasses.replace(config, target_modules=None))
        blocks = seq2seq_blocks(roles, found)
        layout = {"sites": {s.name: {"block": blocks[s.name]} for s in found}, "num_blocks": len(roles.encoder)}
        pairs = from_peft_blocks(layout, emb, kv, hd)
    elif record.get("num_transformer_submodules") == 2:
        pairs = from_peft_blocks(record, emb, kv, hd)
    else:
        pairs = dict(zip(sites, from_prompt_embeddings(emb, len(sites), kv, hd)))
    if not record:
        InsertPrefix(config, found, pairs)(model)
        return model
    if emb.shape[0] != record["num_virtual_tokens"]:
        raise AdapterError(f"the adapter has {emb.shape[0]} virtual tokens, the model's prefix slots {record['num_virtual_tokens']}")
    for site, rec in record["sites"].items():
        for which, tensor in zip(("key", "value"), pairs[site]):
            value = model.graph.initializers[rec[which]]
            value.const_value = to_ir_tensor(tensor, value.dtype, rec[which])
    return model


def save_onnx_prefix_adapter(model: Any, directory: str | os.PathLike) -> Path:
    """The prefixes of an ONNX model (``lora_fx.prefix`` record) as a PEFT prefix-tuning directory."""
    from lora_fx.adapters import write_peft_dir
    from lora_fx.passes.onnx.lora_layout import read_records

    record = _onnx_record(model)
    if read_records(model):
        raise AdapterError(
            f"this model {BOTH_KINDS}; save_adapter would drop one of them. Apply PrefixConfig and LoraConfig to "
            "separate loads of the original model (lora-fx rewrite with one --method each), and train and save each on "
            "its own"
        )
    reason = onnx_subset_reason(model)
    if reason:
        raise AdapterError(f"{reason}; {ONNX_ADAPTER_WAY_OUT}, or rewrite the original model without target_modules to "
                           "save in PEFT's format")
    shapes = {(r["kv_heads"], r["head_dim"]) for r in record["sites"].values()}
    if len(shapes) != 1:
        raise AdapterError(f"PEFT's prefix-tuning format needs one prefix shape for all layers; this model has {sorted(shapes)}")
    kv, hd = shapes.pop()
    pairs = {}
    for site, rec in record["sites"].items():
        pairs[site] = tuple(torch.from_numpy(model.graph.initializers[rec[w]].const_value.numpy().astype(np.float32)) for w in ("key", "value"))
    config = _onnx_config(model) or PrefixConfig(num_virtual_tokens=record["num_virtual_tokens"])
    # Every layer has its prefix (onnx_subset_reason): saved as PEFT reads it, without the ONNX site names.
    config.prefix_projection, config.target_modules = False, None
    if config.task_type is None and record.get("num_transformer_submodules") != 2:
        import warnings

        # PeftModel.from_pretrained then builds a plain PeftModel, whose forward runs the base model alone.
        warnings.warn(
            "the saved PEFT config has no task_type, and PEFT applies prefixes only through a task's PeftModel "
            "(PeftModel.from_pretrained would run the base model without them); this file records no model class "
            "to infer it from: give it when applying (PrefixConfig(task_type='CAUSAL_LM'), lora-fx rewrite --task-type "
            "CAUSAL_LM) or set task_type in adapter_config.json",
            stacklevel=2,
        )
    config.token_dim, config.num_attention_heads, config.num_layers = kv * hd, kv, num_blocks(record)
    config.encoder_hidden_size = config.encoder_hidden_size or config.token_dim
    if record.get("num_transformer_submodules") == 2:
        # Exported from an encoder-decoder torch graph: the decoder's sites in PEFT's SEQ_2_SEQ_LM blocks.
        config.num_transformer_submodules, config.task_type = 2, config.task_type or "SEQ_2_SEQ_LM"
        emb = to_peft_blocks(record, pairs)
    else:
        emb = to_prompt_embeddings(list(pairs.values()))
    return write_peft_dir(directory, config, {PROMPT_EMBEDDINGS: emb, **_onnx_heads(model)})


def _onnx_heads(model: Any) -> dict[str, torch.Tensor]:
    """The parameters of the modules an ONNX model trains in full (its ``lora_fx.modules_to_save`` metadata), as they
    are now, under PEFT's prompt-learning keys."""
    from lora_fx.onnx_adapter import _torch, read_saved

    out = {}
    for name in read_saved(model.metadata_props):
        value = model.graph.initializers.get(name)
        if value is None or value.const_value is None:
            raise AdapterError(f"{name}, a parameter of a module trained in full (modules_to_save), is not an initializer "
                               "of this ONNX model; apply the adapter to the original model again")
        # In the model's dtype, as PEFT keeps a bfloat16 model's head (bfloat16 bit for bit).
        out[f"{HEAD_PREFIX}{name}"] = _torch(value.const_value.numpy())
    return out
