"""Switch dropout on or off in an exported graph.

``torch.export`` bakes train/eval into the graph and ``gm.train()`` raises on exported modules, so
the mode is switched by rewriting the ``train`` argument of every ``aten.dropout`` node.
``bind_mode_methods`` gives a captured graph ``gm.train(mode)`` / ``gm.eval()`` doing that, as PEFT users
call them, and ``gm.training`` follows the mode.
Attention-probability dropout inside ``scaled_dot_product_attention`` stays as captured (off,
since capture runs in eval mode): export records ``dropout_p=0`` and the model's rate is not in
the graph.
"""

from __future__ import annotations

import types

import torch
import torch.fx as fx

from lora_fx.passes.fx.capture import meta
from lora_fx.passes.result import PassResult

aten = torch.ops.aten


class SetTrainingMode:
    def __init__(self, training: bool) -> None:
        self.training = bool(training)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        changed = []
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is aten.dropout.default:
                args = list(node.args)
                while len(args) < 3:
                    args.append(node.kwargs.get("train", False))
                if bool(args[2]) != self.training:
                    args[2] = self.training
                    node.args = tuple(args)
                    node.kwargs = {k: v for k, v in node.kwargs.items() if k != "train"}
                    changed.append(node.name)
        meta(gm)["training"] = self.training
        _set_flags(gm, self.training)
        if changed:
            gm.recompile()
        return PassResult(gm, bool(changed), changed)


def set_training_mode(gm: fx.GraphModule, training: bool) -> PassResult:
    return SetTrainingMode(training)(gm)


def _set_flags(gm: fx.GraphModule, training: bool) -> None:
    """``training`` on the graph and its submodules, as ``nn.Module.train`` sets it (without calling it: the
    exported module's own ``train`` is the one this pass replaces)."""
    for module in gm.modules():
        module.training = training


class _ModeMixin:
    """``train(mode)`` / ``eval()`` of a captured graph: the ``set_training_mode`` pass, as ``nn.Module``'s
    would switch dropout on an eager model."""

    def train(self, mode: bool = True):  # type: ignore[no-untyped-def]
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")  # nn.Module.train's own check and words
        set_training_mode(self, mode)  # type: ignore[arg-type]
        return self

    def eval(self):  # type: ignore[no-untyped-def]
        return self.train(False)


_WITH_MODE: dict[type, type] = {}


def bind_mode_methods(gm: fx.GraphModule) -> fx.GraphModule:
    """Give ``gm`` (in place) ``train``/``eval`` that switch its mode through this pass, where ``torch.export``
    binds ones raising NotImplementedError on the instance, and ``gm.training`` its mode.

    As ``cast_dtype.castable`` does, ``gm`` moves onto a subclass of its class: a GraphModule's deep copy keeps
    its class (attributes bound on the instance are lost, and a copy would fall back to ``nn.Module.train``,
    which flips the flag without touching dropout)."""
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)
    if not isinstance(gm, _ModeMixin):
        base = next(c for c in type(gm).__mro__ if c.__qualname__.split(".")[-1] != "GraphModuleImpl")
        cls = _WITH_MODE.get(base)
        if cls is None:
            cls = _WITH_MODE[base] = type(base.__name__, (_ModeMixin, base), {"__module__": base.__module__})
        gm.__class__ = type("GraphModuleImpl", (cls,), {})  # fx gives each GraphModule a class of its own
        gm.recompile()  # forward and __call__ live on that per-instance class
    _set_flags(gm, bool(meta(gm).get("training", False)))
    return gm
