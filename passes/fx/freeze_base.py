"""Freeze every parameter but the adapters' and those of modules trained in full, so training moves only them."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx

from lora_fx.errors import ConfigError
from lora_fx.passes.fx.capture import meta
from lora_fx.passes.result import PassResult

ADAPTER_MARKERS = (".lora_A.", ".lora_B.", "prefix_")
# meta(gm) key: {"modules": [paths trained in full], "base": {parameter name: its frozen base value}}
MODULES_TO_SAVE = "modules_to_save"


def is_adapter_parameter(name: str) -> bool:
    return any(m in f".{name}" for m in ADAPTER_MARKERS)


def saved_base(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The parameters trained in full (``modules_to_save``), each with the base value it had before training."""
    return meta(gm).get(MODULES_TO_SAVE, {}).get("base", {})


def module_parameters(gm: fx.GraphModule, paths: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    """The parameters of the modules at ``paths`` (by their names in ``gm``), each module checked to have some
    floating-point parameters of its own and no quantized (QLoRA) weight. Adapter parameters inside such a module
    (the prefixes of its attention) are the adapter's, not the module's."""
    params = {n: p for n, p in gm.named_parameters() if not is_adapter_parameter(n)}
    quantized = set(meta(gm).get("quant") or {})
    out: dict[str, torch.nn.Parameter] = {}
    for path in paths:
        mine = {n: p for n, p in params.items() if n.startswith(f"{path}.")}
        packed = sorted(q for q in quantized if q == path or q.startswith(f"{path}."))
        if packed:
            raise ConfigError(
                f"modules_to_save names {path}, whose weight {packed[0]} is stored quantized (QLoRA): a module trained in "
                f"full needs float weights; leave it out of quantization (QuantConfig(exclude_modules=[{path!r}]))"
            )
        if not mine:
            raise ConfigError(
                f"modules_to_save names {path}, which has no parameters of its own in the captured graph (none, or "
                "tied to another module's); name a module that holds weights, e.g. the classification head"
            )
        bad = sorted(n for n, p in mine.items() if not p.is_floating_point())
        if bad:
            raise ConfigError(f"modules_to_save names {path}, whose parameter {bad[0]} is not floating point and cannot train")
        out.update(mine)
    return out


def record_modules_to_save(gm: fx.GraphModule, paths: Sequence[str]) -> list[str]:
    """Record the modules at ``paths`` as trained in full, keeping a copy of each parameter's base value (the
    value an adapter without this module runs, and an exported slot's default); returns the parameter names."""
    params = module_parameters(gm, paths)
    record = meta(gm).setdefault(MODULES_TO_SAVE, {"modules": [], "base": {}})
    for path in paths:
        if path not in record["modules"]:
            record["modules"].append(path)
    for name, param in params.items():
        record["base"].setdefault(name, param.detach().clone())
    return list(params)


class FreezeBase:
    """Set ``requires_grad`` to False on base parameters and True on adapter parameters and on the parameters of
    modules trained in full (``record_modules_to_save``)."""

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        full = saved_base(gm)
        changed = []
        for name, p in gm.named_parameters():
            want = is_adapter_parameter(name) or name in full
            if p.requires_grad != want:
                p.requires_grad_(want)
                changed.append(name)
        return PassResult(gm, bool(changed), changed)


def freeze_base(gm: fx.GraphModule) -> PassResult:
    return FreezeBase()(gm)
