"""Insert LoRA branches at linear sites of an ONNX model (an ``onnx_ir.Model``).

Matches every linear form ``find_sites`` reports: ``MatMul`` (with or without a bias ``Add``),
``Gemm`` (``transB`` 0 or 1, with or without C), ``com.microsoft.FusedMatMul``, ``MatMulNBits`` and
``MatMulBnb4``. ``com.microsoft.Attention``'s packed QKV projection is refused (its output is not a
tensor of the graph): unfuse the model, or leave the site out.

The ONNX LoRA layout, a public contract other passes and tools build on
-------------------------------------------------------------------------
For each adapted site ``<site>`` the graph gains

* initializers ``<site>.lora_A.weight`` ``[in, r]`` and ``<site>.lora_B.weight`` ``[r, out]`` in the
  model's dtype (the dtype of the site's input activation), the scale ``alpha / r`` (or
  ``alpha / sqrt(r)``) already folded into B — the deployment layout of ONNX Runtime and Olive,
  converted from PEFT's layout only by ``lora_fx.adapters.to_deployment_layout``;
* three nodes after the site's output (after its bias, if any):
  ``MatMul(x, A)`` → ``MatMul(·, B)`` → ``Add(y, ·)``, so the output gains exactly ``x @ A @ B``.
  They carry node metadata ``lora_fx.inserted = "lora"`` and ``lora_fx.site = <site>``; the site's
  own node gets ``lora_fx.adapted = "default"``. A site whose output was a graph output keeps the
  output's name: the new ``Add`` takes it.

and the model's ``metadata_props`` record, as JSON:

* ``lora_fx.lora``: ``{site: {"r", "alpha", "scale", "in_features", "out_features", "a", "b"}}``
  where ``a``/``b`` are the initializer names above;
* ``lora_fx.lora_config``: the ``LoraConfig`` (PEFT's ``adapter_config.json`` content).

With ``lora_dropout`` > 0 a ``Dropout(x, <site>.lora_dropout.ratio)`` node (the ratio a scalar
initializer; an attribute below opset 12) sits between ``x`` and ``MatMul(x, A)``, one per site as
PEFT has one ``nn.Dropout`` per layer, and the record gains ``"dropout": ratio``. It drops only when
the graph trains (``lora_fx.train`` on the ONNX model); ONNX Runtime and every inference runtime run
it as the identity, and ``fold_lora`` removes it with the rest of the branch.
A second rewrite of a site that already has an adapter is refused with ``AdapterError`` before
anything is changed.

A site inside ``If`` branches (``find_sites``' ``Sites.inside``, Optimum's merged decoders) keeps that layout with
its A and B (and a Dropout's ratio) once, in the main graph, and the branch nodes at every node of the site, each in
the subgraph holding it and reading A and B from the outer scope: whichever branch runs, it runs the same adapter.
The value names of a site's second and later branches end in ``.1``, ``.2``... (names are unique across graphs).

Modules trained in full (``modules_to_save``, the SEQ_CLS head) are ``freeze_base``'s: ``apply_lora``
plans them before the graph changes and records them after.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir
import torch

from lora_fx.adapters import to_deployment_layout
from lora_fx.config import ALL_LINEAR, InitLoraWeights, LoraConfig
from lora_fx.errors import AdapterError, TargetNotFoundError, UnsupportedError
from lora_fx.passes.fx.insert_lora import init_lora
from lora_fx.passes.onnx.find_sites import (
    INSERTED, LinearParts, dtype_name, find_sites, linear_parts, module_tree, site_nodes, subgraph_graphs,
)
from lora_fx.passes.result import PassResult
from lora_fx.targeting import Target, select_targets

LORA_KEY = "lora_fx.lora"
CONFIG_KEY = "lora_fx.lora_config"
ADAPTED = "lora_fx.adapted"
SITE = "lora_fx.site"

_TORCH_DTYPES = {
    ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.DOUBLE: torch.float64,
}


def lora_metadata(model: ir.Model) -> dict[str, dict[str, Any]]:
    """The ``lora_fx.lora`` record of ``model``: ``{site: {r, alpha, scale, in_features, out_features, a, b}}``."""
    text = model.metadata_props.get(LORA_KEY)
    return json.loads(text) if text else {}


def lora_names(site: str) -> tuple[str, str]:
    return f"{site}.lora_A.weight", f"{site}.lora_B.weight"


def to_ir_tensor(t: torch.Tensor, dtype: ir.DataType, name: str) -> ir.Tensor:
    """A torch tensor as an onnx_ir tensor of ``dtype`` (bfloat16 through ml_dtypes)."""
    t = t.detach().cpu()
    array = (t if t.dtype == torch.float32 else t.to(torch.float32)).numpy()
    if dtype == ir.DataType.BFLOAT16:
        import ml_dtypes

        return ir.Tensor(array.astype(ml_dtypes.bfloat16), dtype=dtype, name=name)
    target = dtype.numpy()
    return ir.Tensor(array if array.dtype == target else array.astype(target), dtype=dtype, name=name)


def _initializer(graph: ir.Graph, name: str, tensor: ir.Tensor) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(list(tensor.shape)), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _model_dtype(parts: LinearParts) -> ir.DataType:
    if parts.x.dtype in _TORCH_DTYPES:
        return parts.x.dtype
    if parts.output.dtype in _TORCH_DTYPES:
        return parts.output.dtype
    # No type recorded on the activations (hand-written graphs): the dtype the weight computes in.
    by_name = {dtype_name(d): d for d in _TORCH_DTYPES}
    return by_name.get(parts.dtype, ir.DataType.FLOAT)


class InsertLora:
    """Add a LoRA branch ``y += x @ A @ B`` at each target linear site (layout in the module docstring).

    Matches MatMul (+ bias Add), Gemm (transB 0/1, with or without C), FusedMatMul, MatMulNBits and
    MatMulBnb4 sites found by ``find_sites``. Returns the names of the sites it adapted.
    """

    def __init__(self, targets: Sequence[Target], init: InitLoraWeights = InitLoraWeights.KAIMING,
                 adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None, dropout: float = 0.0) -> None:
        """``adapters`` optionally gives PEFT-layout ``(A [r, in], B [out, r])`` per site instead of ``init``;
        ``dropout`` is ``lora_dropout``, the probability of zeroing an element of the branch's input in training."""
        self.targets = list(targets)
        self.init = init
        self.adapters = adapters or {}
        self.dropout = float(dropout)
        self._opset = 18

    def _check(self, model: ir.Model) -> list[tuple[Target, list[LinearParts]]]:
        graph = model.graph
        graphs = {id(g) for g in subgraph_graphs(model)}
        self._opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"lora_dropout must be in [0, 1), got {self.dropout!r}")
        if self.dropout > 0 and self._opset < 7:
            raise UnsupportedError(
                f"lora_dropout={self.dropout} needs ONNX's Dropout of opset 7 or later, and this model imports opset "
                f"{self._opset}: convert it with onnx.version_converter, or set lora_dropout=0"
            )
        existing = lora_metadata(model)
        # A node's ADAPTED mark counts while the graph still holds adapter tensors: files merged before fold_lora
        # dropped the marks keep stale ones on plain weights, and those are rewritten like any plain model.
        marks_count = any(".lora_A" in name or ".lora_B" in name for name in graph.initializers)
        plan: list[tuple[Target, list[LinearParts]]] = []
        seen: set[str] = set()
        for target in self.targets:
            site, node = target.site, target.site.handle
            if not isinstance(node, ir.Node) or id(node.graph) not in graphs:
                raise AdapterError(f"site {site.name} does not belong to this model; call find_sites on the model you rewrite")
            nodes = site_nodes(model, node)
            a_name, b_name = lora_names(site.name)
            if (site.name in existing or site.name in seen or (marks_count and any(ADAPTED in n.metadata_props for n in nodes))
                    or a_name in graph.initializers or b_name in graph.initializers):
                raise AdapterError(
                    f"site {site.name} already has a LoRA adapter; a second one would double the branch. "
                    f"Rewrite the original model, or fold the existing adapter first"
                )
            every = [linear_parts(n) for n in nodes]
            if any(p is None for p in every):
                raise UnsupportedError(f"node {node.name!r} of site {site.name} is no longer a linear site lora_fx can rewrite")
            parts = every[0]
            if any((p.in_features, p.out_features) != (parts.in_features, parts.out_features) for p in every):
                raise UnsupportedError(f"site {site.name}: the If-branch nodes reading its weight compute different shapes; "
                                       "leave it out with exclude_modules")
            if not parts.adaptable:
                raise UnsupportedError(
                    f"site {site.name} is the packed QKV projection inside {node.domain}.{node.op_type}, whose output is not "
                    f"a tensor of the graph, so no LoRA branch can be added to it. Export the model without attention fusion "
                    f"(e.g. before optimize_for_ort), or leave this site out with exclude_modules"
                )
            if site.name in self.adapters:
                a, b = self.adapters[site.name]
                if tuple(a.shape) != (target.r, parts.in_features) or tuple(b.shape) != (parts.out_features, target.r):
                    raise AdapterError(
                        f"adapter for {site.name} has shapes A{tuple(a.shape)} B{tuple(b.shape)}, expected "
                        f"A{(target.r, parts.in_features)} B{(parts.out_features, target.r)} (PEFT layout)"
                    )
            seen.add(site.name)
            plan.append((target, every))
        return plan

    def __call__(self, model: ir.Model) -> PassResult:
        plan = self._check(model)  # everything is validated before the first change
        graph = model.graph
        record = lora_metadata(model)
        changed: list[str] = []
        for target, parts in plan:
            record[target.site.name] = self._rewrite(graph, target, parts)
            changed.append(target.site.name)
        if changed:
            model.metadata_props[LORA_KEY] = json.dumps(record, sort_keys=True)
        return PassResult(model, bool(changed), changed)

    def _rewrite(self, graph: ir.Graph, target: Target, every: list[LinearParts]) -> dict[str, Any]:
        site = target.site
        parts = every[0]
        dtype = _model_dtype(parts)
        if site.name in self.adapters:
            a, b = (t.detach().to(torch.float32) for t in self.adapters[site.name])
        else:
            a = torch.empty(target.r, parts.in_features)
            b = torch.empty(parts.out_features, target.r)
            init_lora(a, b, target.r, self.init)
        a_dep, b_dep = to_deployment_layout(a, b, target.scale)
        a_name, b_name = lora_names(site.name)
        a_val = _initializer(graph, a_name, to_ir_tensor(a_dep, dtype, a_name))
        b_val = _initializer(graph, b_name, to_ir_tensor(b_dep, dtype, b_name))
        ratio = None
        if self.dropout > 0 and self._opset >= 12:  # ratio became an input in opset 12
            ratio = _initializer(graph, f"{site.name}.lora_dropout.ratio", ir.tensor(np.array(self.dropout, np.float32)))
        for i, occurrence in enumerate(every):
            self._branch(occurrence, site.name, a_val, b_val, ratio, dtype, f".{i}" if i else "")
        record = {
            "r": target.r, "alpha": target.alpha, "scale": target.scale,
            "in_features": parts.in_features, "out_features": parts.out_features, "a": a_name, "b": b_name,
        }
        if self.dropout > 0:
            record["dropout"] = self.dropout
        if target.part_of:  # PEFT files key it under the module it was adapted with (adapters.peft_site_name)
            record["part_of"] = target.part_of
        return record

    def _branch(self, parts: LinearParts, site: str, a_val: ir.Value, b_val: ir.Value, ratio: ir.Value | None,
                dtype: ir.DataType, tag: str) -> None:
        """The branch nodes at one node of the site, in the graph holding that node; ``tag`` keeps names unique."""
        graph = parts.node.graph
        y = parts.output
        is_graph_output = any(o is y for o in graph.outputs)
        uses = list(y.uses())  # before the new Add becomes one of them
        # Read the input now, not at planning time: an adapted site just before this one has already
        # redirected it to its own adapted output.
        x = parts.node.inputs[0]
        meta = {INSERTED: "lora", SITE: site}
        new_nodes = []
        if self.dropout > 0:
            drop = self._dropout_node(site, x, ratio, dtype, meta, tag)
            new_nodes.append(drop)
            x = drop.outputs[0]
        xa = ir.node("MatMul", [x, a_val], name=f"{site}/lora_A/MatMul", metadata_props=dict(meta))
        xab = ir.node("MatMul", [xa.outputs[0], b_val], name=f"{site}/lora_B/MatMul", metadata_props=dict(meta))
        add = ir.node("Add", [y, xab.outputs[0]], name=f"{site}/lora/Add", metadata_props=dict(meta))
        xa.outputs[0].name = f"{site}/lora_A/output{tag}"
        xab.outputs[0].name = f"{site}/lora_B/output{tag}"
        for v in (xa.outputs[0], xab.outputs[0], add.outputs[0]):
            v.dtype = dtype
        add.outputs[0].shape = y.shape
        graph.insert_after(y.producer(), [*new_nodes, xa, xab, add])

        original_name = y.name
        for user, index in uses:
            user.replace_input_with(index, add.outputs[0])
        if is_graph_output:
            for i, out in enumerate(graph.outputs):
                if out is y:
                    graph.outputs[i] = add.outputs[0]
            # Graph outputs are part of the model's interface: the adapted value keeps the name.
            y.name = f"{original_name}/lora_fx_base"
            add.outputs[0].name = original_name
        else:
            add.outputs[0].name = f"{site}/lora/output{tag}"
        parts.node.metadata_props[ADAPTED] = "default"

    def _dropout_node(self, site: str, x: ir.Value, ratio: ir.Value | None, dtype: ir.DataType, meta: dict[str, str],
                      tag: str) -> ir.Node:
        """``Dropout(x, ratio)`` for the branch alone; the site's own node keeps reading ``x``."""
        name = f"{site}/lora_dropout/Dropout"
        if ratio is not None:
            drop = ir.node("Dropout", [x, ratio], name=name, metadata_props=dict(meta))
        else:
            drop = ir.node("Dropout", [x], attributes={"ratio": self.dropout}, name=name, metadata_props=dict(meta))
        drop.outputs[0].name = f"{site}/lora_dropout/output{tag}"
        drop.outputs[0].dtype = dtype
        drop.outputs[0].shape = x.shape
        return drop


def insert_lora(model: ir.Model, targets: Sequence[Target], init: InitLoraWeights = InitLoraWeights.KAIMING,
                adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None, dropout: float = 0.0) -> PassResult:
    return InsertLora(targets, init, adapters, dropout)(model)


def select_onnx_targets(model: ir.Model, config: LoraConfig, model_type: str | None = None) -> list[Target]:
    """``select_targets`` on the model's sites; ``all-linear`` skips fused projections LoRA cannot reach."""
    sites = find_sites(model)
    targets = select_targets(sites, config, model_type=model_type, modules=module_tree(model))
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        targets = [t for t in targets if (p := linear_parts(t.site.handle)) is not None and p.adaptable]
        if not targets:
            raise TargetNotFoundError("all-linear found only fused projections that LoRA cannot adapt in this model")
    return targets


def apply_lora(model: ir.Model, config: LoraConfig, *, model_type: str | None = None,
               adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> ir.Model:
    """Select the sites ``config`` targets and insert LoRA there (what ``lora_fx.apply`` calls for ONNX); the modules
    ``config.modules_to_save`` names (with ``task_type="SEQ_CLS"``: the classification head) train in full beside."""
    from lora_fx.passes.onnx.freeze_base import plan_modules_to_save, record_modules_to_save, selected_modules
    from lora_fx.targeting import refuse_adapted_saved

    targets = select_onnx_targets(model, config, model_type)
    refuse_adapted_saved(targets, selected_modules(model, config))  # refused before the graph changes
    plan_modules_to_save(model, config)
    InsertLora(targets, config.init_lora_weights, adapters, config.lora_dropout)(model)
    # Planned again: inserting LoRA redirected the inputs the first plan's nodes read.
    record_modules_to_save(model, plan_modules_to_save(model, config))
    model.metadata_props[CONFIG_KEY] = config.to_json()
    return model
