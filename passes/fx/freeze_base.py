"""Freeze every parameter but the adapters', so training moves only them."""

from __future__ import annotations

import torch.fx as fx

from lora_fx.passes.result import PassResult

ADAPTER_MARKERS = (".lora_A.", ".lora_B.", "prefix_")


def is_adapter_parameter(name: str) -> bool:
    return any(m in f".{name}" for m in ADAPTER_MARKERS)


class FreezeBase:
    """Set ``requires_grad`` to False on base parameters and True on adapter parameters."""

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        changed = []
        for name, p in gm.named_parameters():
            want = is_adapter_parameter(name)
            if p.requires_grad != want:
                p.requires_grad_(want)
                changed.append(name)
        return PassResult(gm, bool(changed), changed)


def freeze_base(gm: fx.GraphModule) -> PassResult:
    return FreezeBase()(gm)
