"""Insert LoRA branches at linear sites of a captured GraphModule.

For each target ``y = linear(x, W, b)`` (or ``addmm``/``mm``/``matmul`` on an ``[in, out]`` weight)
the pass adds ``y' = y + s · B(A(dropout(x)))`` with PEFT's numerics: ``A`` ``[r, in]`` and ``B``
``[out, r]`` registered as ``<site>.lora_A.weight`` / ``<site>.lora_B.weight``, the scale applied
after B, fp16/bf16 sites computing the branch in fp32 as PEFT does. ``B(A x)`` is computed, never
``(BA) x``. A site that already has an adapter is refused.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.fx as fx

from lora_fx.config import InitLoraWeights
from lora_fx.errors import AdapterError
from lora_fx.passes.fx.capture import meta
from lora_fx.passes.fx.find_sites import INSERTED, weight_device, weight_node
from lora_fx.passes.result import PassResult
from lora_fx.targeting import Target

aten = torch.ops.aten

ADAPTED = "lora_fx_adapted"


class LoraWeight(torch.nn.Module):
    """Holds one adapter matrix as ``.weight`` so state keys read ``<site>.lora_A.weight`` as in PEFT."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)


def _module_at(gm: fx.GraphModule, path: str) -> torch.nn.Module:
    """The submodule at ``path``, creating empty ones where the unlifted graph has none (tied heads)."""
    mod: torch.nn.Module = gm
    for part in path.split("."):
        child = getattr(mod, part, None)
        if not isinstance(child, torch.nn.Module):
            if child is not None:
                raise AdapterError(f"cannot place an adapter under {path!r}: {part!r} is not a module")
            child = torch.nn.Module()
            mod.add_module(part, child)
        mod = child
    return mod


def init_lora(a: torch.Tensor, b: torch.Tensor, r: int, init: InitLoraWeights) -> None:
    """PEFT's initialisations (``LoraLayer.reset_lora_parameters``)."""
    with torch.no_grad():
        if init is InitLoraWeights.GAUSSIAN:
            torch.nn.init.normal_(a, std=1 / r)
        else:
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init is InitLoraWeights.RANDOM:
            torch.nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            torch.nn.init.zeros_(b)


def _input_of(node: fx.Node) -> fx.Node:
    if node.target is aten.addmm.default:
        return node.args[1]
    return node.args[0]


def _check_one_weight_per_name(targets: Sequence[Target]) -> None:
    """Sites sharing a name share one (A, B): right for a module called twice (one weight), wrong when a
    module calls ``F.linear`` on several parameters of its own, which have no module path of their own."""
    seen: dict[str, str] = {}
    for target in targets:
        weight = str(weight_node(target.site.handle).target)
        first = seen.setdefault(target.site.name, weight)
        if first != weight:
            raise AdapterError(
                f"site {target.site.name!r} reads several weights ({first}, {weight}): the module calls F.linear on "
                "parameters of its own, which have no module path for an adapter (PEFT cannot adapt such a module "
                "either). Exclude it (exclude_modules=...) and target nn.Linear modules, or hold each weight in an nn.Linear"
            )


class InsertLora:
    """Add a LoRA branch at each target site; returns the sites it adapted."""

    def __init__(self, targets: Sequence[Target], dropout: float = 0.0, init: InitLoraWeights = InitLoraWeights.KAIMING) -> None:
        self.targets = list(targets)
        self.dropout = float(dropout)
        self.init = init

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        _check_one_weight_per_name(self.targets)
        training = bool(meta(gm).get("training", False))
        graph = gm.graph
        holders: dict[str, tuple[str, str]] = {}
        changed: list[str] = []
        for target in self.targets:
            site, node = target.site, target.site.handle
            if node.meta.get(ADAPTED):
                raise AdapterError(f"site {site.name} already has a LoRA adapter; remove it before inserting another")
            if site.name not in holders:
                holders[site.name] = self._register(gm, target)
            a_name, b_name = holders[site.name]
            self._rewrite(graph, node, a_name, b_name, target.scale, site.dtype, training)
            changed.append(site.name)
        graph.lint()
        gm.recompile()
        return PassResult(gm, bool(changed), changed)

    def _register(self, gm: fx.GraphModule, target: Target) -> tuple[str, str]:
        site = target.site
        module = _module_at(gm, site.name)
        if hasattr(module, "lora_A"):
            raise AdapterError(f"site {site.name} already has a LoRA adapter; remove it before inserting another")
        dtype = getattr(torch, site.dtype)
        # fp16/bf16 bases keep adapters in fp32, as PEFT's autocast_adapter_dtype does.
        adapter_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        device = weight_device(gm, site.handle)
        a = torch.empty(target.r, site.in_features, dtype=adapter_dtype, device=device)
        b = torch.empty(site.out_features, target.r, dtype=adapter_dtype, device=device)
        init_lora(a, b, target.r, self.init)
        module.add_module("lora_A", LoraWeight(a))
        module.add_module("lora_B", LoraWeight(b))
        meta(gm).setdefault("lora_sites", {})[site.name] = {
            "r": target.r, "alpha": target.alpha, "scale": target.scale,
            "in_features": site.in_features, "out_features": site.out_features,
            "fan_in_fan_out": site.fan_in_fan_out, "dtype": site.dtype,
        }
        if target.part_of:
            # Selected through the module PEFT adapts as a whole: its PEFT files key the site under that module.
            meta(gm)["lora_sites"][site.name]["part_of"] = target.part_of
        return f"{site.name}.lora_A.weight", f"{site.name}.lora_B.weight"

    def _rewrite(self, graph: fx.Graph, node: fx.Node, a_name: str, b_name: str, scale: float, dtype: str, training: bool) -> None:
        x = _input_of(node)
        half = dtype in ("float16", "bfloat16")
        # inserting_before(node.next) keeps several inserts in call order (inserting_after reverses them).
        with graph.inserting_before(node.next):
            added: list[fx.Node] = []

            def call(op, *args, **kwargs) -> fx.Node:
                n = graph.call_function(op, args, kwargs)
                n.meta[INSERTED] = True
                n.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
                added.append(n)
                return n

            h = x
            if half:
                h = call(aten._to_copy.default, h, dtype=torch.float32)
            if self.dropout > 0:
                h = call(aten.dropout.default, h, self.dropout, training)
            a = graph.get_attr(a_name)
            b = graph.get_attr(b_name)
            h = call(aten.linear.default, h, a)
            h = call(aten.linear.default, h, b)
            h = call(aten.mul.Tensor, h, scale)
            out = call(aten.add.Tensor, node, h)
            if half:
                out = call(aten._to_copy.default, out, dtype=getattr(torch, dtype))
        node.replace_all_uses_with(out, delete_user_cb=lambda user: user not in added)
        node.meta[ADAPTED] = "default"


def insert_lora(gm: fx.GraphModule, targets: Sequence[Target], dropout: float = 0.0, init: InitLoraWeights = InitLoraWeights.KAIMING) -> PassResult:
    return InsertLora(targets, dropout, init)(gm)
