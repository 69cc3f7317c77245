"""Training checkpoints: adapter weights, AdamW state, step and RNG state in one safetensors file.

Everything that decides the rest of a run is in ``checkpoint.safetensors`` (tensors, plus the
small JSON state — step, losses, optimizer hyper-parameters, scheduler counters — in its
metadata), written atomically, so a run killed at any moment resumes from the last complete
checkpoint and continues the same loss curve. ``checkpoint.json`` beside it is a human-readable
summary naming the tensor file, written after it (also atomically): a run killed between the two
writes leaves the new tensor file beside the summary of the one before (or none), and resumes from
the tensor file, which holds the step. A summary whose tensor file is missing is refused, never
taken for "no checkpoint": that would start the run over, silently. No pickle: the optimizer state
is flattened into named tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lora_fx.errors import ConfigError
from lora_fx.files import atomic_path, atomic_write_text

CHECKPOINT_NAME = "checkpoint.safetensors"
SUMMARY_NAME = "checkpoint.json"
_META_KEY = "lora_fx.checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    step: int,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    losses: list[float],
    grad_norms: list[float],
    tokens: int,
) -> Path:
    """Write the state after ``step`` completed steps; returns the safetensors path."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {f"param.{k}": v.detach().cpu().contiguous() for k, v in params.items()}
    opt_state = optimizer.state_dict()
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                tensors[f"opt.{index}.{key}"] = torch.tensor(value)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    state = {
        "version": FORMAT_VERSION, "step": step, "losses": losses, "grad_norms": grad_norms, "tokens": tokens,
        "param_names": list(params), "param_groups": opt_state["param_groups"], "scheduler": sched,
    }
    path = directory / CHECKPOINT_NAME
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(state)})
    summary = {"step": step, "last_loss": losses[-1] if losses else None, "checkpoint": CHECKPOINT_NAME}
    atomic_write_text(directory / SUMMARY_NAME, json.dumps(summary, indent=2))
    return path


def has_checkpoint(directory: str | os.PathLike | None) -> bool:
    return directory is not None and (Path(directory) / CHECKPOINT_NAME).is_file()


def find_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The tensor file to resume from in ``directory``; None where it holds no checkpoint at all.

    The tensor file alone decides (the summary of a run killed between the two writes is a step behind, or
    absent); a summary without it is a ``ConfigError``: it says a checkpoint was written, and starting over
    instead would lose the run without a word."""
    directory = Path(directory)
    path = directory / CHECKPOINT_NAME
    if path.is_file():
        return path
    summary = directory / SUMMARY_NAME
    if not summary.exists():
        return None
    way = (f"Restore {path.name} to resume, or start over: remove {summary} (or the whole folder), or train without "
           "resuming (resume=False; lora-fx train: without --resume), whose checkpoints then replace this one")
    what = _summary_says(summary)
    if path.exists():  # a folder, or something else that is no file
        raise ConfigError(f"{summary} {what}, but {path} is not a file. {way}")
    raise ConfigError(f"{summary} {what}, but {path}, which holds its adapters and optimizer state, is missing: "
                      f"the run cannot be resumed. {way}")


def _summary_says(summary: Path) -> str:
    """What a summary records, for a message: its step, or that it cannot be read."""
    try:
        step = json.loads(summary.read_text()).get("step")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):  # AttributeError: JSON but not an object
        return "is there (unreadable as a checkpoint summary)"
    return f"records a checkpoint of step {step}" if isinstance(step, int) else "records a checkpoint"


def load_checkpoint(
    directory: str | os.PathLike,
    *,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Restore parameters, optimizer, scheduler and RNG in place; returns the saved JSON state."""
    from safetensors import SafetensorError, safe_open

    path = Path(directory) / CHECKPOINT_NAME
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path} is not a readable checkpoint ({exc}); to start over, delete it and the "
                          f"{SUMMARY_NAME} beside it (or the whole folder)") from None
    if _META_KEY not in meta:
        raise ConfigError(f"{path} is not a lora_fx training checkpoint (no {_META_KEY} metadata); to start over, "
                          f"delete it and the {SUMMARY_NAME} beside it (or the whole folder), or use another folder")
    state = json.loads(meta[_META_KEY])
    _check_same_parameters(path, state["param_names"], tensors, params)  # first: another model explains all else
    _check_same_run(path, state, optimizer)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"].to(p.device, p.dtype))
    # The optimizer numbers its state by position; the names say which parameter each position held.
    position = {name: i for i, name in enumerate(params)}
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, field = key.split(".", 2)
            opt_state.setdefault(position[state["param_names"][int(index)]], {})[field] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    sched = dict(state["scheduler"])
    sched["lr_lambdas"] = [None] * len(optimizer.param_groups)
    scheduler.load_state_dict(sched)
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return state


def _check_same_parameters(path: Path, saved_names: list[str], tensors: dict[str, torch.Tensor],
                           params: dict[str, torch.Tensor]) -> None:
    """Refuse, before anything is loaded, a checkpoint whose parameters are not the model's: the names that
    differ say which adapters (or which config: another r, other targets) the checkpoint was written for."""

    def few(items: list[str]) -> str:
        return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    absent = [n for n in saved_names if f"param.{n}" not in tensors]
    if absent:
        raise ConfigError(f"{path} lists parameters it holds no tensor for ({few(absent)}); it is damaged: to start "
                          f"over, delete it and the {SUMMARY_NAME} beside it (or the whole folder)")
    saved = set(saved_names)
    missing = [n for n in params if n not in saved]
    extra = [n for n in saved_names if n not in params]
    reshaped = [f"{n} {tuple(tensors[f'param.{n}'].shape)} saved, {tuple(p.shape)} in the model"
                for n, p in params.items() if n in saved and tensors[f"param.{n}"].shape != p.shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's are not in it ({few(missing)})")
    if extra:
        parts.append(f"{len(extra)} in it are not in the model ({few(extra)})")
    if reshaped:
        parts.append(f"{len(reshaped)} differ in shape ({few(reshaped)})")
    if parts:
        raise ConfigError(
            f"{path} was written for other trainable parameters ({len(saved_names)} saved, {len(params)} in this "
            f"model): {'; '.join(parts)}. Resume with the model and config the run started with, or use a new "
            "checkpoint dir"
        )


def _check_same_run(path: Path, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Refuse a resume asking for another learning rate or weight decay than the checkpoint's.

    The optimizer state loaded below carries the run's own values and would silently replace the ones
    asked for: after "training diverged ... lower the learning rate", a resume with a lower lr would
    run the old one again."""
    for saved, current in zip(state.get("param_groups", []), optimizer.param_groups):
        for key, name in (("initial_lr", "lr"), ("weight_decay", "weight_decay")):
            was = saved.get(key, saved.get(name))
            now = current.get(key, current.get(name))
            if was is not None and now is not None and float(was) != float(now):
                raise ConfigError(
                    f"{path} continues a run with {name}={was:g}, this one asks for {name}={now:g}; resuming takes the "
                    f"checkpoint's optimizer state, so pass {name}={was:g} (CLI: --{name.replace('_', '-')} {was:g}) to "
                    "continue that run, or start over with another checkpoint directory"
                )


__all__ = ["CHECKPOINT_NAME", "find_checkpoint", "has_checkpoint", "load_checkpoint", "save_checkpoint"]
