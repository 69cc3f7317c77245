"""Keep the base frozen but for the modules trained in full (``modules_to_save``, the SEQ_CLS head) of an
ONNX model, and keep those modules' base values: the ONNX counterpart of ``passes/fx/freeze_base``.

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

from lora_fx.config import LoraConfig
from lora_fx.errors import AdapterError, UnsupportedError
from lora_fx.passes.onnx.find_sites import const_tensor, find_sites, linear_parts, module_tree
from lora_fx.passes.onnx.insert_lora import _TORCH_DTYPES, ADAPTED, _initializer, to_ir_tensor
from lora_fx.sites import SiteKind


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
    from lora_fx.onnx_adapter import read_name_map

    return read_name_map(model.metadata_props, key)


def _fx_linear_args(node: ir.Node) -> list[str] | None:
    """The arguments of the ``aten.linear`` call the dynamo exporter made ``node`` from, as its metadata records them."""
    match = _LINEAR_ARGS.search(node.metadata_props.get(_FX_NODE, ""))
    return [a.strip() for a in match.group(1).split(",")] if match else None


def _site_params(graph: ir.Graph, site: Any, module: str) -> list[HeadParam]:
    """The weight (and bias) of a linear site inside a module trained in full."""
    node = site.handle
    parts = linear_parts(node)
    where = f"modules_to_save names {module}, whose linear layer {site.name}"
    if node.graph is not graph:
        # Its weight is read by a node in each If branch: a rewiring here would reach one of them only.
        raise UnsupportedError(
            f"{where} lies inside If branches (an Optimum merged decoder), where lora_fx trains no module in full; "
            "adapt it with LoRA (target_modules) instead, or train decoder_model.onnx, which has no If")
    if ADAPTED in node.metadata_props:
        from lora_fx.targeting import adapted_and_saved

        raise AdapterError(adapted_and_saved(site.name, module))
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


def check_saved_tensors(model: ir.Model, config: LoraConfig, saved: dict[str, Any], where: Any, key_prefix: str | None = None) -> None:
    """Refuse, before anything changes, an adapter's modules trained in full (``saved``: model name -> tensor, read from
    keys ``key_prefix`` + name, PEFT's LoRA ``base_model.model.`` by default) that do not fit the parameters
    ``config.modules_to_save`` names in this ONNX model, or lack some of them."""
    from lora_fx.adapters import PEFT_PREFIX
    from lora_fx.onnx_adapter import read_saved

    lora = key_prefix in (None, PEFT_PREFIX)
    key_prefix = key_prefix or PEFT_PREFIX

    paths = selected_modules(model, config)
    params = {p.name: p.shape for p in plan_modules_to_save(model, config)}
    for name, module in read_saved(model.metadata_props).items():
        if any(module == m or module.startswith(f"{m}.") for m in paths):
            params[name] = tuple(model.graph.initializers[name].shape)
    for name, value in saved.items():
        if name not in params:
            raise AdapterError(
                f"adapter tensor {key_prefix + name!r} is neither {'a LoRA matrix' if lora else 'a prefix'} nor a parameter of a module its config's "
                f"modules_to_save={config.modules_to_save!r} names in this ONNX model"
                + (f" (those hold: {', '.join(sorted(params)[:6])})" if params else "") + "; was it saved from another model?"
            )
        if tuple(value.shape) != tuple(params[name]):
            raise AdapterError(f"adapter tensor {key_prefix}{name} has shape {tuple(value.shape)}, but this model's {name} "
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
