"""Capture a PyTorch model as a trainable GraphModule with ``torch.export``.

Matching happens on the graph as exported, before ``run_decompositions()``, where ``aten.linear``
and ``aten.scaled_dot_product_attention`` are still whole nodes.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import torch

from lora_fx.errors import CaptureError

META_KEY = "lora_fx"


@contextlib.contextmanager
def _no_cache(model: torch.nn.Module) -> Iterator[None]:
    """transformers causal LMs return a DynamicCache unless use_cache=False; export cannot output it.

    Settling it on the config (not as a call keyword) keeps the caller's own signature.
    """
    config = getattr(model, "config", None)
    old = getattr(config, "use_cache", None)
    if old is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if old is not None:
            config.use_cache = old


def _spec(x: Any, dynamic: bool) -> Any:
    if isinstance(x, torch.Tensor):
        # Batch and sequence dims may vary; AUTO keeps them symbolic wherever the model allows.
        return {i: torch.export.Dim.AUTO for i in range(min(x.dim(), 2))} if dynamic and x.dim() else None
    if isinstance(x, (list, tuple)):
        return type(x)(_spec(v, dynamic) for v in x)
    if isinstance(x, dict):
        return {k: _spec(v, dynamic) for k, v in x.items()}
    return None


def _dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], dynamic: bool) -> Any:
    if not dynamic:
        return None
    if not args:
        return _spec(kwargs, dynamic)
    # With positional inputs export wants the specs keyed by forward()'s parameter names.
    params = list(inspect.signature(model.forward).parameters)
    out: dict[str, Any] = {name: _spec(a, dynamic) for name, a in zip(params, args)}
    out.update(_spec(kwargs, dynamic))
    return out


def _output_layer_name(model: torch.nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    if get is None:
        return None
    try:
        emb = get()
    except Exception:  # models without an LM head may raise NotImplementedError
        return None
    if emb is None:
        return None
    return next((name for name, m in model.named_modules() if m is emb), None)


def _reason(exc: Exception) -> str:
    """The first line of torch's message and the user's source line it points at.

    torch.export's messages run to dozens of lines of debugging-flag advice; the user needs what
    failed and where in their forward().
    """
    lines = [line.rstrip() for line in str(exc).strip().splitlines()]
    if not lines:
        return type(exc).__name__
    marker = next((i for i, line in enumerate(lines) if line.startswith("The following call raised this error")), None)
    if marker is None:
        return "\n".join(lines[:12])
    where = [line for line in lines[marker + 1 : marker + 3] if line.strip()]
    return "\n".join([lines[0], "at:"] + where)


def capture(
    model: torch.nn.Module,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    *,
    dynamic: bool = True,
) -> torch.fx.GraphModule:
    """Export ``model`` with ``torch.export`` (non-strict) and return the trainable GraphModule.

    The batch and sequence dims (dims 0 and 1 of every tensor input) stay dynamic unless
    ``dynamic=False``. The model is captured in eval mode; ``set_training_mode`` switches dropout on
    the captured graph. Call the result as you called the model: ``gm(input_ids=..., ...)``.
    """
    kwargs = dict(kwargs or {})
    args = tuple(args)
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        with _no_cache(model), torch.no_grad():
            ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=_dynamic_shapes(model, args, kwargs, dynamic))
    except Exception as exc:  # torch raises many types; the user needs the reason, not the trace
        reason = _reason(exc)
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {reason}\n"
            "Ways out: pass example inputs the model accepts (kwargs such as input_ids=..., attention_mask=...); "
            "remove data-dependent Python control flow from forward() (or express it with torch.cond); "
            "try capture(..., dynamic=False) if a dynamic dimension is the problem."
        ) from None
    finally:
        model.train(was_training)
    gm = ep.module()
    config = getattr(model, "config", None)
    gm.meta[META_KEY] = {
        "model_class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "output_layer": _output_layer_name(model),
        "training": False,
        "adapters": {},
    }
    return gm


def meta(gm: torch.fx.GraphModule) -> dict[str, Any]:
    """lora_fx's bookkeeping on a captured GraphModule (model type, output layer, adapters, mode)."""
    return gm.meta.setdefault(META_KEY, {"training": False, "adapters": {}})
