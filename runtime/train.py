"""The training loop shared by every front end: AdamW on adapter parameters only.

Gradient clipping, seeding, optional bf16 autocast, a progress bar on stderr, and the metrics of
the run returned as a ``TrainResult``. The model is switched to training mode (dropout on) for the
run and back to eval mode afterwards. A run whose loss, gradients or update stop being finite ends
with ``TrainingDivergedError`` at that step, the adapters as they were before its update.
"""

from __future__ import annotations

import inspect
import itertools
import math
import numbers
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.fx as fx

from lora_fx.errors import ConfigError, TrainingDivergedError

Batch = dict[str, Any]


@dataclass
class TrainResult:
    losses: list[float]
    steps: int
    seconds: float
    trainable_parameters: int
    tokens_seen: int = 0
    grad_norms: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["final_loss"] = self.final_loss
        return d


def _set_mode(model: Any, training: bool) -> None:
    if isinstance(model, fx.GraphModule):
        from lora_fx.passes.fx.set_training_mode import set_training_mode

        set_training_mode(model, training)
    elif hasattr(model, "set_training_mode"):
        model.set_training_mode(training)
    elif isinstance(model, torch.nn.Module):
        model.train(training)


def _input_names(module: torch.nn.Module) -> set[str] | None:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def _batches(source: Sequence[Batch] | Iterable[Batch] | Callable[[], Iterable[Batch]]) -> Iterator[Batch]:
    if callable(source) and not isinstance(source, (list, tuple)):
        return itertools.chain.from_iterable(source() for _ in itertools.count())
    if isinstance(source, Sequence):
        if len(source) == 0:
            raise ConfigError("batches is empty")
        return itertools.cycle(source)
    return iter(source)


def _torch_module(model: Any) -> torch.nn.Module:
    if isinstance(model, torch.nn.Module):
        return model
    from lora_fx.api import _is_onnx

    if _is_onnx(model):
        from lora_fx.runtime.onnx_torch import trainable_module  # ONNX graphs train through torch

        return trainable_module(model)
    raise ConfigError(f"train takes a rewritten GraphModule or ONNX model, got {type(model).__name__}")


def train(
    model: Any,
    batches: Sequence[Batch] | Iterable[Batch] | Callable[[], Iterable[Batch]],
    loss_fn: Callable[[Any, Batch], torch.Tensor],
    *,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    warmup_steps: int = 0,
    seed: int | None = 0,
    bf16: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
) -> TrainResult:
    """Train the adapter parameters of ``model`` for ``steps`` steps.

    ``batches``: a list (cycled), an iterable, or a callable returning a fresh iterable per epoch;
    each batch is a dict whose keys that name model inputs are passed to the model.
    ``loss_fn(outputs, batch)`` returns the scalar loss.
    ``checkpoint_dir``/``checkpoint_every``: save adapters, optimizer, step and RNG state every N
    steps (and at the end); ``resume=True`` continues from the checkpoint there, if any, on the
    same loss curve (the data must be the same; the first ``step`` batches are skipped).
    An ONNX model's trained adapters are written back into its initializers when train returns.

    Raises ``TrainingDivergedError`` (a FloatingPointError) at the first step whose loss or gradient
    norm is nan/inf or whose update would make an adapter weight non-finite (or overflows float32 in
    the optimizer, as a huge ``lr`` does); the adapters then keep their values from before that step.
    """
    _check_numbers(steps=steps, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                   warmup_steps=warmup_steps, seed=seed)
    module = _torch_module(model)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters: apply a LoraConfig (or PrefixConfig) first")
    if seed is not None:
        torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)
    names = _input_names(module)
    source = _batches(batches)
    losses: list[float] = []
    norms: list[float] = []
    tokens = 0
    first_step = 0
    if checkpoint_every and not checkpoint_dir:
        raise ConfigError("checkpoint_every needs checkpoint_dir: name the directory the checkpoints go to")
    trained = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if resume:
        from lora_fx.runtime.checkpoint import has_checkpoint, load_checkpoint

        if has_checkpoint(checkpoint_dir):
            state = load_checkpoint(checkpoint_dir, params=trained, optimizer=opt, scheduler=sched)
            first_step, losses, norms, tokens = state["step"], state["losses"], state["grad_norms"], state["tokens"]
            for _ in range(first_step):  # the data position of the interrupted run
                next(source, None)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=min(first_step, steps), desc="train", file=sys.stderr, dynamic_ncols=True, leave=False)
    mode_target = model if isinstance(model, fx.GraphModule) else module
    # Where each step's update starts from: a diverging update is undone from here (one copy of the adapters).
    before = [torch.empty_like(p) for p in params]
    _set_mode(mode_target, True)
    start = time.perf_counter()
    try:
        for step in range(first_step, steps):
            try:
                batch = next(source)
            except StopIteration:
                break
            inputs = {k: v for k, v in batch.items() if names is None or k in names}
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = module(**inputs)
                loss = loss_fn(out, batch)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise _diverged(step, steps, value, lr, "the loss is not finite")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in params if p.grad is not None]
            if max_grad_norm is not None:
                norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
            else:
                norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            if not math.isfinite(norm):
                # Clipping by a nan/inf norm turns every gradient into nan or zero: stop before the update.
                raise _diverged(step, steps, value, lr, f"the gradient norm is {norm}")
            if max_grad_norm is not None:
                norms.append(norm)
            _update(opt, params, before, step, steps, value, lr)
            sched.step()
            losses.append(value)
            ids = batch.get("input_ids")
            tokens += int(ids.numel()) if isinstance(ids, torch.Tensor) else 0
            if on_step is not None:
                on_step(step, value)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
            if checkpoint_dir and ((checkpoint_every and (step + 1) % checkpoint_every == 0) or step + 1 == steps):
                from lora_fx.runtime.checkpoint import save_checkpoint

                save_checkpoint(checkpoint_dir, step=step + 1, params=trained, optimizer=opt, scheduler=sched,
                                losses=losses, grad_norms=norms, tokens=tokens)
    finally:
        _set_mode(mode_target, False)
        if hasattr(module, "write_back"):  # ONNX models: trained adapters back into the initializers
            module.write_back()
        if bar is not None:
            bar.close()
    return TrainResult(
        losses=losses, steps=len(losses), seconds=time.perf_counter() - start,
        trainable_parameters=sum(p.numel() for p in params), tokens_seen=tokens, grad_norms=norms,
    )


def _check_numbers(*, steps: Any, lr: Any, weight_decay: Any, max_grad_norm: Any, warmup_steps: Any, seed: Any) -> None:
    """Refuse what torch would take and train badly with (a zero or negative lr, a negative warmup or clip
    norm flips or stalls the updates) or fail on deep inside the optimizer (nan, inf, a seed out of range)."""

    def number(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)

    def integer(value: Any) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if not integer(steps) or steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps!r}")
    if not (math.isfinite(number("lr", lr)) and lr > 0):
        raise ConfigError(f"lr must be a positive, finite number (e.g. 1e-3), got {lr!r}")
    if not (math.isfinite(number("weight_decay", weight_decay)) and weight_decay >= 0):
        raise ConfigError(f"weight_decay must be a finite number of at least 0, got {weight_decay!r}")
    if max_grad_norm is not None and not number("max_grad_norm", max_grad_norm) > 0:  # inf: no clipping; nan refused
        raise ConfigError(f"max_grad_norm must be above 0 (None: no clipping), got {max_grad_norm!r}")
    if not integer(warmup_steps) or warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be an integer of at least 0, got {warmup_steps!r}")
    if seed is not None and (not integer(seed) or not -(2**63) <= seed < 2**64):
        raise ConfigError(f"seed must be an integer in [-2**63, 2**64) or None, got {seed!r}")


def _update(opt: torch.optim.Optimizer, params: list[torch.Tensor], before: list[torch.Tensor],
            step: int, steps: int, loss: float, lr: float) -> None:
    """``opt.step()``, undone when it overflows float32 or leaves an adapter weight non-finite."""
    with torch.no_grad():
        torch._foreach_copy_(before, [p.detach() for p in params])
    try:
        opt.step()
        finite = bool(torch.stack([torch.isfinite(p).all() for p in params]).all())  # one device sync per step
        reason = None if finite else "the update made adapter weights non-finite"
    except RuntimeError as exc:
        # AdamW's step size lr / (1 - beta1^t) is a Python float torch converts to float32: lr above ~3e37 fails.
        if "overflow" not in str(exc):
            raise
        reason = "the optimizer update overflowed float32"
    if reason is not None:
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in params], before)
        raise _diverged(step, steps, loss, lr, reason)


def _diverged(step: int, steps: int, loss: float, lr: float, reason: str) -> TrainingDivergedError:
    return TrainingDivergedError(
        f"training diverged at step {step + 1} of {steps} (loss {loss:.6g}): {reason}. Lower the learning rate "
        f"(now {lr:g}) or check the data (NaN/inf or extreme values in this step's batch); the adapters keep their "
        "values from before this step",
        step=step + 1, loss=loss, reason=reason,
    )


def cross_entropy_on(output_key: str, target_key: str = "labels") -> Callable[[Any, Batch], torch.Tensor]:
    """A loss_fn: cross entropy between ``output[output_key]`` and ``batch[target_key]``."""

    def loss_fn(out: Any, batch: Batch) -> torch.Tensor:
        logits = out[output_key] if not isinstance(out, torch.Tensor) else out
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[target_key].reshape(-1))

    return loss_fn


__all__ = ["TrainResult", "train", "cross_entropy_on"]
