"""Capture a PyTorch model as a trainable GraphModule with ``torch.export``.

Matching happens on the graph as exported, before ``run_decompositions()``, where ``aten.linear``
and ``aten.scaled_dot_product_attention`` are still whole nodes.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Mapping
from typing import Any, Iterator

import torch

from lora_fx.errors import CaptureError

META_KEY = "lora_fx"


def _cache_configs(model: torch.nn.Module) -> list[Any]:
    """Every distinct config in the model that has a ``use_cache`` setting.

    Encoder-decoder models give their decoder stack its own copy of the config (T5), so the top
    config's setting does not reach it.
    """
    configs: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None) is not None:
            configs.setdefault(id(config), config)
    return list(configs.values())


@contextlib.contextmanager
def _no_cache(model: torch.nn.Module) -> Iterator[None]:
    """transformers causal LMs return a DynamicCache unless use_cache=False; export cannot output it.

    Settling it on the configs (not as a call keyword) keeps the caller's own signature.
    """
    configs = _cache_configs(model)
    old = [config.use_cache for config in configs]
    for config in configs:
        config.use_cache = False
    try:
        yield
    finally:
        for config, value in zip(configs, old):
            config.use_cache = value


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


def module_tree(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Every submodule's path and its class with the classes it derives from, by qualified name.

    The captured graph keeps only modules that hold parameters or run ops (GPT-2's sdpa path never calls
    ``attn_dropout``), while PEFT matches ``target_modules`` against every module: targeting needs this tree.
    """
    return {
        name: tuple(f"{c.__module__}.{c.__qualname__}" for c in type(m).__mro__ if issubclass(c, torch.nn.Module) and c is not torch.nn.Module)
        for name, m in model.named_modules()
        if name
    }


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


def _export(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], dynamic: bool) -> torch.export.ExportedProgram:
    with _no_cache(model), torch.no_grad():
        return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=_dynamic_shapes(model, args, kwargs, dynamic))


def _widen(x: Any, dims: tuple[int, ...]) -> Any:
    """``x`` with every size-1 dim among ``dims`` (0: batch, 1: sequence) repeated to size 2."""
    if isinstance(x, torch.Tensor):
        for d in dims:
            if x.dim() > d and x.shape[d] == 1:
                x = torch.cat([x, x], dim=d)
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(_widen(v, dims) for v in x)
    if isinstance(x, dict):
        return {k: _widen(v, dims) for k, v in x.items()}
    return x


def widened_examples(args: tuple, kwargs: dict[str, Any]) -> list[tuple[tuple, dict[str, Any]]]:
    """The examples to trace in place of one with a batch or sequence of size 1, in the order to try them.

    torch.export fixes a dim whose example size is 1 (0/1 specialization), and the graph then refuses
    every other size with a bare "Guard failed". A batch of repeated rows (a sequence of repeated
    tokens) is as valid an example, so size-1 dims are traced at 2; where the model refuses that (a
    dim that really is 1, such as a single channel), only the batch is widened. Empty when no leading
    dim is 1: the example itself is the one to trace. Both ``capture`` and ``export_onnx`` use it.
    """
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    if not any(isinstance(x, torch.Tensor) and 1 in tuple(x.shape[:2]) for x in leaves):
        return []
    return [(_widen(args, dims), _widen(kwargs, dims)) for dims in ((0, 1), (0,))]


def _export_keeping_dims(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], dynamic: bool) -> torch.export.ExportedProgram:
    """``torch.export`` with batch and sequence dynamic even when the example has batch or sequence 1
    (see ``widened_examples``); where the model takes no widened example, the example itself, with a warning."""
    widenings = widened_examples(args, kwargs) if dynamic else []
    if not widenings:
        return _export(model, args, kwargs, dynamic)
    for wide_args, wide_kwargs in widenings:
        try:
            return _export(model, wide_args, wide_kwargs, dynamic)
        except Exception:  # this widening is not a valid input for the model: try the next
            continue
    warnings.warn("capture: the example has batch or sequence size 1 and the model accepts no larger example, "
                  "so those dims are fixed at 1 in the captured graph; pass a batch of 2 and a sequence of 2 or more "
                  "to keep them dynamic", stacklevel=3)
    return _export(model, args, kwargs, dynamic)


def _output_hint(reason: str) -> str:
    if "register a pytree" in reason:
        return ("return a tuple, a dict or a transformers ModelOutput from forward() (or register your output class "
                "with torch.utils._pytree.register_dataclass); ")
    return ""


def capture(
    model: torch.nn.Module,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    *,
    dynamic: bool = True,
) -> torch.fx.GraphModule:
    """Export ``model`` with ``torch.export`` (non-strict) and return the trainable GraphModule.

    The batch and sequence dims (dims 0 and 1 of every tensor input) stay dynamic unless
    ``dynamic=False``. The model is captured in eval mode; ``gm.train()`` / ``gm.eval()`` (or the
    ``set_training_mode`` pass) switch dropout on the captured graph. Positional ``args`` are bound to
    forward()'s parameter names, so the graph takes every input by keyword (as ``lora_fx.train`` and
    ``export_onnx`` pass them); a forward taking ``*args`` or positional-only inputs is refused. Call the
    result as you called the model: ``gm(input_ids=..., ...)``, or positionally where you captured so.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = _example_inputs(args, kwargs)
    positional = _positional_names(model, len(args))
    if args:
        # Everything downstream (train's batches, export_onnx, apply's passes) passes inputs by keyword: capture with
        # the positional examples bound to forward()'s parameter names, so the graph takes them by name.
        kwargs = _bind(model, args, kwargs)
        args = ()
    was_training = model.training
    model.eval()
    try:
        ep = _export_keeping_dims(model, args, kwargs, dynamic)
    except Exception as exc:  # torch raises many types; the user needs the reason, not the trace
        reason = _reason(exc)
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {reason}\n"
            "Ways out: pass example inputs the model accepts (kwargs such as input_ids=..., attention_mask=...); "
            "remove data-dependent Python control flow from forward() (or express it with torch.cond); "
            f"{_output_hint(reason)}try capture(..., dynamic=False) if a dynamic dimension is the problem."
        ) from None
    finally:
        model.train(was_training)
    gm = ep.module()
    if positional:
        # Called as the model was (gm(x)): positional inputs go to the names the graph was captured with.
        _Positional(positional).attach(gm)
    config = getattr(model, "config", None)
    gm.meta[META_KEY] = {
        "model_class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "output_layer": _output_layer_name(model),
        "modules": module_tree(model),
        "training": False,
        "adapters": {},
    }
    from lora_fx.passes.fx.cast_dtype import castable
    from lora_fx.passes.fx.set_training_mode import bind_mode_methods

    return bind_mode_methods(castable(gm))


def _example_inputs(args: Any, kwargs: Any) -> tuple[tuple, dict[str, Any]]:
    """``args`` as a tuple and ``kwargs`` as a dict, or a CaptureError naming the fix.

    ``tuple(args)`` would turn a bare tensor into its rows, each bound to a different parameter of forward(),
    and a number into a bare "not iterable" TypeError; torch.export takes no bare tensor either, so it is
    refused rather than wrapped, with the wrapping named. A list is taken as the tuple it stands for.
    """
    if args is None:  # as kwargs=None: no positional inputs
        args = ()
    if not isinstance(args, (tuple, list)):
        keywords = "; to pass inputs by name use kwargs={...}" if isinstance(args, Mapping) else ""
        raise CaptureError(f"capture: args must be a tuple of example inputs, got {type(args).__name__}; "
                           f"for a single tensor x pass args=(x,){keywords}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise CaptureError(f"capture: kwargs must be a dict of example inputs by forward()'s parameter names "
                           f"(kwargs={{'input_ids': ids}}), got {type(kwargs).__name__}")
    return tuple(args), dict(kwargs or {})


def _positional_names(model: torch.nn.Module, count: int) -> list[str]:
    """The names of forward()'s first ``count`` positional parameters (empty when ``count`` is 0)."""
    if not count:
        return []
    params = _signature(model).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds][:count]


def _signature(model: torch.nn.Module) -> inspect.Signature:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError) as exc:
        raise CaptureError(f"capture cannot read the parameters of {type(model).__name__}.forward ({exc}); pass the "
                           "example inputs by keyword: capture(model, kwargs={...})") from None


def _bind(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``args`` and ``kwargs`` as keywords of ``model.forward``, in its parameter order. A forward whose inputs
    cannot be named (``*args``, positional-only parameters) is refused: the captured graph could not take
    them by keyword, as training and export pass them."""
    name = type(model).__name__
    sig = _signature(model)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise CaptureError(f"the example inputs do not fit {name}.forward{sig}: {exc}; pass what forward() takes, "
                           "preferably by keyword: capture(model, kwargs={...})") from None
    out: dict[str, Any] = {}
    for param_name, value in bound.arguments.items():
        kind = sig.parameters[param_name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            raise CaptureError(
                f"{name}.forward{sig} takes *{param_name}, and {len(value)} example input(s) went there: inputs "
                "without names cannot be passed by keyword, as lora_fx.train and export_onnx pass them; give forward() "
                f"named parameters (or wrap the model in a module whose forward names its inputs)")
        if kind is inspect.Parameter.POSITIONAL_ONLY:
            raise CaptureError(
                f"{name}.forward{sig} takes {param_name!r} positional-only: it cannot be passed by keyword, as "
                "lora_fx.train and export_onnx pass inputs; drop the '/' from forward() (or wrap the model in a module "
                "whose forward takes its inputs by name)")
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[param_name] = value
    return out


class _Positional:
    """A forward pre-hook giving positional inputs their names (those of the model's forward at capture).

    Holds no reference to the GraphModule: a deep copy of the module gets a copy of it, attached to the copy."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)

    def attach(self, gm: torch.fx.GraphModule) -> None:
        """On ``gm`` and, through a deepcopy hook, on its copies (a GraphModule's deep copy drops forward hooks)."""
        gm.register_forward_pre_hook(self, with_kwargs=True, prepend=True)  # before torch's own input check
        # A copy inherits (a copy of) the deepcopy hook already: register it on the captured graph only.
        if not any(isinstance(getattr(hook, "__self__", None), _Positional) for hook in gm._deepcopy_hooks):
            gm._register_deepcopy_hook(self.attach)

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if not args:
            return None
        if len(args) > len(self.names):
            raise TypeError(f"the captured graph takes at most {len(self.names)} positional inputs "
                            f"({', '.join(self.names)}), got {len(args)}")
        named = dict(zip(self.names, args))
        both = sorted(set(named) & set(kwargs))
        if both:
            raise TypeError(f"the captured graph got {both} both by position and by keyword")
        return (), {**named, **kwargs}


def meta(gm: torch.fx.GraphModule) -> dict[str, Any]:
    """lora_fx's bookkeeping on a captured GraphModule (model type, output layer, adapters, mode)."""
    return gm.meta.setdefault(META_KEY, {"training": False, "adapters": {}})
