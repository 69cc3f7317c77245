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

Modules trained in full (``modules_to_save``; ``task_type="SEQ_CLS"`` adds the classification head) are chosen on
the file's modules (``saved_module_paths``: ``module_tree``, the linear sites, the owners of named parameters) as
PEFT chooses them. Each of their parameters becomes an initializer under its model name in torch's layout
(``classifier.weight`` ``[out, in]``, ``classifier.bias``): kept where the exporter stored it so (Gemm transB=1, a
Transpose of the named weight), else a new initializer read through a ``Transpose`` (MatMul) or with ``transB=1``
(Gemm), and a zero bias the dynamo exporter's optimizer dropped is given back (its ``fx_node`` metadata names it).
``lora_fx.modules_to_save`` (``onnx_adapter.SAVED_KEY``) lists them ``{parameter: module}``, so they train beside
the adapters and are saved under PEFT's keys; ``lora_fx.modules_to_save_base`` names, per parameter, an initializer
no node reads that keeps its base value (``classifier.original_module.weight``, as PEFT's ModulesToSaveWrapper
keeps the original module): what an adapter without that module runs, and the default of an exported head slot.
ONNX Runtime warns that it drops those when it runs the training file; the exports remove them.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir
import torch

from lora_fx.adapters import to_deployment_layout
from lora_fx.config import ALL_LINEAR, InitLoraWeights, LoraConfig
from lora_fx.errors import AdapterError, TargetNotFoundError, UnsupportedError
from lora_fx.passes.fx.insert_lora import init_lora
from lora_fx.passes.onnx.find_sites import INSERTED, LinearParts, const_tensor, dtype_name, find_sites, linear_parts, module_tree
from lora_fx.passes.result import PassResult
from lora_fx.sites import SiteKind
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

    def _check(self, model: ir.Model) -> list[tuple[Target, LinearParts]]:
        graph = model.graph
        self._opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"lora_dropout must be in [0, 1), got {self.dropout!r}")
        if self.dropout > 0 and self._opset < 7:
            raise UnsupportedError(
                f"lora_dropout={self.dropout} needs ONNX's Dropout of opset 7 or later, and this model imports opset "
                f"{self._opset}: convert it with onnx.version_converter, or set lora_dropout=0"
            )
        existing = lora_metadata(model)
        plan: list[tuple[Target, LinearParts]] = []
        seen: set[str] = set()
        for target in self.targets:
            site, node = target.site, target.site.handle
            if not isinstance(node, ir.Node) or node.graph is not graph:
                raise AdapterError(f"site {site.name} does not belong to this model; call find_sites on the model you rewrite")
            a_name, b_name = lora_names(site.name)
            if site.name in existing or site.name in seen or ADAPTED in node.metadata_props or a_name in graph.initializers or b_name in graph.initializers:
                raise AdapterError(
                    f"site {site.name} already has a LoRA adapter; a second one would double the branch. "
                    f"Rewrite the original model, or fold the existing adapter first"
                )
            parts = linear_parts(node)
            if parts is None:
                raise UnsupportedError(f"node {node.name!r} of site {site.name} is no longer a linear site lora_fx can rewrite")
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
            plan.append((target, parts))
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

    def _rewrite(self, graph: ir.Graph, target: Target, parts: LinearParts) -> dict[str, Any]:
        site = target.site
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

        y = parts.output
        is_graph_output = any(o is y for o in graph.outputs)
        uses = list(y.uses())  # before the new Add becomes one of them
        # Read the input now, not at planning time: an adapted site just before this one has already
        # redirected it to its own adapted output.
        x = parts.node.inputs[0]
        meta = {INSERTED: "lora", SITE: site.name}
        new_nodes = []
        if self.dropout > 0:
            drop = self._dropout_node(graph, site.name, x, dtype, meta)
            new_nodes.append(drop)
            x = drop.outputs[0]
        xa = ir.node("MatMul", [x, a_val], name=f"{site.name}/lora_A/MatMul", metadata_props=dict(meta))
        xab = ir.node("MatMul", [xa.outputs[0], b_val], name=f"{site.name}/lora_B/MatMul", metadata_props=dict(meta))
        add = ir.node("Add", [y, xab.outputs[0]], name=f"{site.name}/lora/Add", metadata_props=dict(meta))
        xa.outputs[0].name = f"{site.name}/lora_A/output"
        xab.outputs[0].name = f"{site.name}/lora_B/output"
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
            add.outputs[0].name = f"{site.name}/lora/output"
        parts.node.metadata_props[ADAPTED] = "default"
        record = {
            "r": target.r, "alpha": target.alpha, "scale": target.scale,
            "in_features": parts.in_features, "out_features": parts.out_features, "a": a_name, "b": b_name,
        }
        if self.dropout > 0:
            record["dropout"] = self.dropout
        if target.part_of:  # PEFT files key it under the module it was adapted with (adapters.peft_site_name)
            record["part_of"] = target.part_of
        return record

    def _dropout_node(self, graph: ir.Graph, site: str, x: ir.Value, dtype: ir.DataType, meta: dict[str, str]) -> ir.Node:
        """``Dropout(x, ratio)`` for the branch alone; the site's own node keeps reading ``x``."""
        name = f"{site}/lora_dropout/Dropout"
        if self._opset >= 12:  # ratio became an input in opset 12
            ratio = _initializer(graph, f"{site}.lora_dropout.ratio", ir.tensor(np.array(self.dropout, np.float32)))
            drop = ir.node("Dropout", [x, ratio], name=name, metadata_props=dict(meta))
        else:
            drop = ir.node("Dropout", [x], attributes={"ratio": self.dropout}, name=name, metadata_props=dict(meta))
        drop.outputs[0].name = f"{site}/lora_dropout/output"
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


def refuse_modules_to_save(model: ir.Model, config: LoraConfig) -> None:
    """Refuse, before anything changes, a module ``config.modules_to_save`` names that this ONNX model cannot train in
    full (a quantized weight, a fused projection, a parameter lora_fx cannot find): the checks ``apply_lora`` makes."""
    plan_modules_to_save(model, config)


# ---- modules trained in full (modules_to_save, the SEQ_CLS head) ---------------------------------------------
#
# Each parameter of such a module is an initializer under its model name (``classifier.weight``) in torch's layout
# (``[out, in]``, as PEFT saves it); the model's ``lora_fx.modules_to_save`` metadata (onnx_adapter.SAVED_KEY) lists
# it with its module, and ``lora_fx.modules_to_save_base`` names the unused initializer that keeps its base value
# (``classifier.original_module.weight``, after PEFT's ModulesToSaveWrapper).

SAVED_BASE_KEY = "lora_fx.modules_to_save_base"
_FX_NODE = "pkg.torch.onnx.fx_node"
_LINEAR_ARGS = re.compile(r"aten\.linear\.default\]\(args = \(([^)]*)\)")
_QUANT_OPS = {"DequantizeLinear", "MatMulNBits", "MatMulBnb4", "QLinearMatMul", "MatMulInteger"}
_PARAM_NAME = re.compile(r"^[A-Za-z_]\w*(\.\w+)*\.(weight|bias)$")


class How(str, enum.Enum):
    """How the graph comes to hold a parameter trained in full by its model name, in torch's layout."""

    KEEP = "keep"  # the stored initializer, renamed
    REWIRE = "rewire"  # a new initializer read by the node: through a Transpose for MatMul, with transB=1 for Gemm
    RESTORE = "restore"  # a zero bias the exporter's optimizer removed, which the module has


@dataclass
class HeadParam:
    """One parameter of a module trained in full: its torch-layout value, and (``how``) where the graph reads it: the
    stored ``value`` (KEEP), or ``node``'s input ``index`` (REWIRE, RESTORE)."""

    name: str
    module: str
    how: How
    array: np.ndarray
    dtype: ir.DataType
    value: ir.Value | None = None
    node: ir.Node | None = None
    index: int = 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


def saved_module_paths(model: ir.Model) -> dict[str, tuple[str, ...]]:
    """The module paths ``select_modules_to_save`` chooses from in an ONNX model: ``module_tree``'s, the linear
    sites', the owners of named parameters (``classifier`` of ``classifier.bias``), and every module above them."""
    from lora_fx.onnx_adapter import read_saved

    tree: dict[str, tuple[str, ...]] = dict(module_tree(model) or {})
    paths = [s.name for s in find_sites(model) if s.kind is SiteKind.LINEAR]
    bases = set(_read_json(model, SAVED_BASE_KEY).values())
    paths += [name.rpartition(".")[0] for name in model.graph.initializers if _PARAM_NAME.match(name) and name not in bases]
    paths += [module for module in read_saved(model.metadata_props).values()]
    for path in paths:
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            tree.setdefault(".".join(parts[:i]), ())
    return tree


def selected_modules(model: ir.Model, config: LoraConfig) -> list[str]:
    from lora_fx.targeting import select_modules_to_save

    return select_modules_to_save(config, saved_module_paths(model))


def plan_modules_to_save(model: ir.Model, config: LoraConfig) -> list[HeadParam]:
    """The parameters of the modules ``config.modules_to_save`` names that are not yet trained in full, each checked to
    be a float parameter the graph can hold by its name (nothing changes here); raises naming what cannot train."""
    from lora_fx.onnx_adapter import read_saved

    paths = selected_modules(model, config)
    if not paths:
        return []
    graph = model.graph
    recorded = read_saved(model.metadata_props)
    bases = set(_read_json(model, SAVED_BASE_KEY).values())
    sites = [s for s in find_sites(model) if s.kind is SiteKind.LINEAR]
    plan: list[HeadParam] = []
    for path in paths:
        mine: list[HeadParam] = []
        for site in sites:
            if site.name == path or site.name.startswith(f"{path}."):
                mine += _site_params(graph, site, path)
        claimed = {id(p.value) for p in mine if p.value is not None}
        for name, value in graph.initializers.items():
            # Other parameters the module holds under their names (a norm's, an embedding's): trained as they are.
            if (not name.startswith(f"{path}.") or not _PARAM_NAME.match(name) or id(value) in claimed or name in bases
                    or name.endswith(".lora_A.weight") or name.endswith(".lora_B.weight") or value.is_graph_input()
                    or value.const_value is None or not list(value.uses())):
                continue
            if value.const_value.dtype not in _TORCH_DTYPES:
                raise UnsupportedError(
                    f"modules_to_save names {path}, whose parameter {name} is {value.const_value.dtype.name} in this ONNX "
                    f"file (quantized?): a module trained in full needs float weights; start from the float model"
                )
            mine.append(HeadParam(name, path, How.KEEP, np.array(value.const_value.numpy()), value.const_value.dtype, value))
        if not mine and not any(m == path or m.startswith(f"{path}.") for m in recorded.values()):
            raise UnsupportedError(
                f"modules_to_save names {path}, but lora_fx finds no parameter of it in this ONNX file (no linear site of "
                f"that name and no initializer named {path}.weight / {path}.bias); name the module by its path in the "
                "file (lora_fx.find_sites lists the linear ones), or drop it from modules_to_save"
            )
        plan += mine
    names = [p.name for p in plan]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UnsupportedError(f"modules_to_save: two parameters of this ONNX model would both be named {twice[0]}; "
                               "name fewer modules in modules_to_save")
    return [p for p in plan if p.name not in recorded]


def _read_json(model: ir.Model, key: str) -> dict[str, str]:
    text = model.metadata_props.get(key)
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise AdapterError(f"model metadata {key} is not a JSON map; apply the adapter to the original model again")
    return data


def _fx_linear_args(node: ir.Node) -> list[str] | None:
    """The arguments of the ``aten.linear`` call the dynamo exporter made ``node`` from, as its metadata records them."""
    match = _LINEAR_ARGS.search(node.metadata_props.get(_FX_NODE, ""))
    return [a.strip() for a in match.group(1).split(",")] if match else None


def _site_params(graph: ir.Graph, site: Any, module: str) -> list[HeadParam]:
    """The weight (and bias) of a linear site inside a module trained in full."""
    node = site.handle
    parts = linear_parts(node)
    where = f"modules_to_save names {module}, whose linear layer {site.name}"
    if ADAPTED in node.metadata_props:
        raise AdapterError(f"{where} already has a LoRA adapter; a module is trained in full or adapted, not both: "
                           "leave it out of target_modules")
    ops = [n.op_type for n in parts.chain] if parts is not None else []
    if parts is None or node.op_type in _QUANT_OPS or any(op in _QUANT_OPS for op in ops):
        raise UnsupportedError(
            f"{where} is stored quantized in this ONNX file ({node.op_type}{' after ' + ', '.join(ops) if ops else ''}): "
            f"a module trained in full needs float weights; quantize without it (QuantConfig(exclude_modules=[{module!r}])) "
            "or start from the float model"
        )
    if not parts.adaptable or node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
        raise UnsupportedError(f"{where} is computed by {node.domain or 'ai.onnx'}.{node.op_type}, whose weight lora_fx "
                               "cannot train in full; export the model without that fusion")
    if any(op != "Transpose" for op in ops) or parts.alpha != 1.0 or node.attributes.get_float("beta", 1.0) != 1.0:
        raise UnsupportedError(f"{where} reaches its {node.op_type} through {', '.join(ops) or 'alpha/beta scaling'}, which "
                               "lora_fx cannot train in full; export the model in float without the optimizer's rewrites")
    stored = const_tensor(parts.weight)
    if stored.dtype not in _TORCH_DTYPES:
        raise UnsupportedError(f"{where} stores its weight as {stored.dtype.name}: a module trained in full needs float weights")
    arr = np.array(stored.numpy())
    weight = arr if parts.stored_out_in else arr.T  # torch's nn.Linear layout, [out, in]
    name = f"{site.name}.weight"
    w = parts.weight
    inits = graph.initializers
    sole = len(list(w.uses())) == 1 and all(len(list(n.outputs[0].uses())) == 1 for n in parts.chain)
    if inits.get(w.name) is w and parts.stored_out_in and sole and inits.get(name, w) is w:
        out = [HeadParam(name, module, How.KEEP, weight, stored.dtype, w)]
    elif name in inits:
        raise UnsupportedError(f"{where}: its weight cannot be named {name}, which another initializer of this ONNX file has")
    else:
        out = [HeadParam(name, module, How.REWIRE, np.ascontiguousarray(weight), stored.dtype, w, node, 1)]
    bias_name = f"{site.name}.bias"
    if parts.bias is not None:
        b = const_tensor(parts.bias)
        if b is None:
            raise UnsupportedError(f"{where} computes its bias ({parts.bias.name}) instead of storing it; lora_fx cannot "
                                   "train it in full")
        bias = np.array(b.numpy()).reshape(-1)
        v = parts.bias
        user = parts.bias_node or node
        if inits.get(v.name) is v and len(list(v.uses())) == 1 and tuple(b.shape) == bias.shape and inits.get(bias_name, v) is v:
            out.append(HeadParam(bias_name, module, How.KEEP, bias, b.dtype, v))
        elif bias_name in inits:
            raise UnsupportedError(f"{where}: its bias cannot be named {bias_name}, which another initializer has")
        else:
            index = next(i for i, inp in enumerate(user.inputs) if inp is v)
            out.append(HeadParam(bias_name, module, How.REWIRE, bias, b.dtype, v, user, index))
    else:
        args = _fx_linear_args(node)
        if args and len(args) > 2 and args[2] != "None":
            # The module has a bias, all zeros (a freshly made head): the exporter's optimizer dropped it.
            if bias_name in inits:
                raise UnsupportedError(f"{where}: its bias cannot be named {bias_name}, which another initializer has")
            out.append(HeadParam(bias_name, module, How.RESTORE, np.zeros(parts.out_features, dtype=arr.dtype), stored.dtype,
                                 None, node, 2))
    return out


def record_modules_to_save(model: ir.Model, plan: Sequence[HeadParam]) -> list[str]:
    """Give the graph the planned parameters under their model names in torch's layout, list them as trained in full
    (``onnx_adapter.SAVED_KEY``) and keep each one's base value in an initializer of its own; returns their names."""
    from lora_fx.onnx_adapter import SAVED_KEY, read_saved

    graph = model.graph
    saved = read_saved(model.metadata_props)
    bases = _read_json(model, SAVED_BASE_KEY)
    for p in plan:
        _materialize(graph, p)
        tail = p.name[len(p.module):] if p.name.startswith(f"{p.module}.") else f".{p.name}"
        base = f"{p.module}.original_module{tail}"
        i = 1
        while base in graph.initializers:
            base, i = f"{p.module}.original_module{tail}_{i}", i + 1
        _initializer(graph, base, ir.Tensor(np.array(graph.initializers[p.name].const_value.numpy()), name=base))
        saved[p.name], bases[p.name] = p.module, base
    if plan:
        model.metadata_props[SAVED_KEY] = json.dumps(saved, sort_keys=True)
        model.metadata_props[SAVED_BASE_KEY] = json.dumps(bases, sort_keys=True)
    return [p.name for p in plan]


def _materialize(graph: ir.Graph, p: HeadParam) -> None:
    if p.how is How.KEEP:
        if p.value.name != p.name:
            p.value.name = p.name
        return
    value = _initializer(graph, p.name, ir.Tensor(np.ascontiguousarray(p.array), dtype=p.dtype, name=p.name))
    node = p.node
    if p.how is How.RESTORE and node.op_type == "Gemm":
        node.resize_inputs(3)
        node.replace_input_with(2, value)
        return
    if p.how is How.RESTORE:
        y = node.outputs[0]
        uses = list(y.uses())
        add = ir.node("Add", [y, value], name=f"{p.name}/Add")
        add.outputs[0].dtype, add.outputs[0].shape = y.dtype, y.shape
        graph.insert_after(node, [add])
        for user, index in uses:
            user.replace_input_with(index, add.outputs[0])
        for i, out in enumerate(graph.outputs):
            if out is y:
                graph.outputs[i] = add.outputs[0]
                original, y.name = y.name, f"{y.name}/lora_fx_unbiased"
                add.outputs[0].name = original
        return
    old = node.inputs[p.index]
    if p.index == 1 and node.op_type == "MatMul":
        tr = ir.node("Transpose", [value], attributes={"perm": [1, 0]}, name=f"{p.name}/Transpose")
        tr.outputs[0].name = f"{p.name}/transposed"
        tr.outputs[0].dtype, tr.outputs[0].shape = p.dtype, ir.Shape(list(reversed(p.shape)))
        graph.insert_before(node, [tr])
        node.replace_input_with(1, tr.outputs[0])
    else:
        node.replace_input_with(p.index, value)
        if p.index == 1:  # Gemm: the weight in torch's layout
            node.attributes["transB"] = ir.AttrInt64("transB", 1)
    _drop_unused(graph, old)


def _drop_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove ``value`` and what computed only it (the replaced weight and its Transpose) once nothing reads it."""
    while value is not None and not list(value.uses()) and not value.is_graph_output() and not value.is_graph_input():
        node = value.producer()
        if node is None:
            if graph.initializers.get(value.name) is value:
                graph.initializers.pop(value.name)
            return
        if any(list(o.uses()) or o.is_graph_output() for o in node.outputs):
            return
        inputs = [i for i in node.inputs if i is not None]
        graph.remove(node, safe=True)
        value = inputs[0] if len(inputs) == 1 else None


def saved_base(model: ir.Model) -> dict[str, tuple[str, np.ndarray]]:
    """``{parameter name: (module, base value)}`` of the modules the model trains in full."""
    from lora_fx.onnx_adapter import read_saved

    saved = read_saved(model.metadata_props)
    out = {}
    for name, base in _read_json(model, SAVED_BASE_KEY).items():
        value = model.graph.initializers.get(base)
        if name not in saved or value is None or value.const_value is None:
            raise AdapterError(f"the base value of {name} (modules_to_save), initializer {base}, is missing from this ONNX "
                               "model; apply the adapter to the original model again")
        out[name] = (saved[name], np.array(value.const_value.numpy()))
    return out


def drop_saved_base(model: ir.Model) -> dict[str, tuple[str, np.ndarray]]:
    """Remove the base copies of the parameters trained in full (before an export: a merged model has no use for
    them, and a served one holds them as its slots' defaults); returns what ``saved_base`` gave."""
    out = saved_base(model)
    for base in _read_json(model, SAVED_BASE_KEY).values():
        model.graph.initializers.pop(base, None)
    model.metadata_props.pop(SAVED_BASE_KEY, None)
    return out


def _restore_base(model: ir.Model, names: Sequence[str]) -> None:
    """Parameters no longer trained in full: back to their base values, no longer listed or trainable."""
    from lora_fx.onnx_adapter import SAVED_KEY, read_saved

    if not names:
        return
    base = saved_base(model)
    saved, bases = read_saved(model.metadata_props), _read_json(model, SAVED_BASE_KEY)
    for name in names:
        value = model.graph.initializers[name]
        value.const_value = ir.Tensor(base[name][1], dtype=value.const_value.dtype, name=name)
        model.graph.initializers.pop(bases.pop(name), None)
        saved.pop(name)
    for key, data in ((SAVED_KEY, saved), (SAVED_BASE_KEY, bases)):
        if data:
            model.metadata_props[key] = json.dumps(data, sort_keys=True)
        else:
            model.metadata_props.pop(key, None)


def check_saved_tensors(model: ir.Model, config: LoraConfig, saved: dict[str, Any], where: Any) -> None:
    """Refuse, before anything changes, an adapter's modules trained in full (``saved``: model name -> tensor) that do
    not fit the parameters ``config.modules_to_save`` names in this ONNX model, or lack some of them."""
    from lora_fx.adapters import PEFT_PREFIX
    from lora_fx.onnx_adapter import read_saved

    paths = selected_modules(model, config)
    params = {p.name: p.shape for p in plan_modules_to_save(model, config)}
    for name, module in read_saved(model.metadata_props).items():
        if any(module == m or module.startswith(f"{m}.") for m in paths):
            params[name] = tuple(model.graph.initializers[name].shape)
    for name, value in saved.items():
        if name not in params:
            raise AdapterError(
                f"adapter tensor {PEFT_PREFIX}{name!r} is neither a LoRA matrix nor a parameter of a module its config's "
                f"modules_to_save={config.modules_to_save!r} names in this ONNX model"
                + (f" (those hold: {', '.join(sorted(params)[:6])})" if params else "") + "; was it saved from another model?"
            )
        if tuple(value.shape) != tuple(params[name]):
            raise AdapterError(f"adapter tensor {PEFT_PREFIX}{name} has shape {tuple(value.shape)}, but this model's {name} "
                               f"is {tuple(params[name])}; was it trained on another model (another number of labels)?")
    missing = sorted(set(params) - set(saved))
    if missing:
        raise AdapterError(f"adapter in {where} lacks the trained {', '.join(missing[:6])}: its config trains "
                           f"modules_to_save={config.modules_to_save!r} in full, so PEFT saves their weights with the adapter")


def load_saved_tensors(model: ir.Model, config: LoraConfig, saved: dict[str, Any]) -> ir.Model:
    """Set the modules ``config`` trains in full to ``saved`` (checked by ``check_saved_tensors``), recording those not
    yet recorded; modules ``lora_fx.apply`` recorded earlier that ``config`` does not name go back to their base values
    and stop training, as PEFT runs them with this adapter active."""
    from lora_fx.onnx_adapter import read_saved

    paths = selected_modules(model, config)
    record_modules_to_save(model, plan_modules_to_save(model, config))
    # Only what lora_fx.apply recorded with a base copy: a served model's head slots hold the base as their default.
    bases = _read_json(model, SAVED_BASE_KEY)
    stale = [n for n, m in read_saved(model.metadata_props).items()
             if n in bases and not any(m == p or m.startswith(f"{p}.") for p in paths)]
    _restore_base(model, stale)
    for name, tensor in saved.items():
        value = model.graph.initializers[name]
        value.const_value = to_ir_tensor(torch.as_tensor(tensor), value.const_value.dtype, name)
    return model


def apply_lora(model: ir.Model, config: LoraConfig, *, model_type: str | None = None,
               adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> ir.Model:
    """Select the sites ``config`` targets and insert LoRA there (what ``lora_fx.apply`` calls for ONNX); the modules
    ``config.modules_to_save`` names (with ``task_type="SEQ_CLS"``: the classification head) train in full beside."""
    targets = select_onnx_targets(model, config, model_type)
    plan_modules_to_save(model, config)  # refused before the graph changes
    InsertLora(targets, config.init_lora_weights, adapters, config.lora_dropout)(model)
    # Planned again: inserting LoRA redirected the inputs the first plan's nodes read.
    record_modules_to_save(model, plan_modules_to_save(model, config))
    model.metadata_props[CONFIG_KEY] = config.to_json()
    return model
