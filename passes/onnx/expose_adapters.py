"""Turn every LoRA adapter initializer into a graph input with a default: ONNX Runtime adapter slots.

ONNX Runtime's adapters (``LoraAdapter`` + ``RunOptions.add_active_adapter``) override graph inputs
by name, so each ``<site>.lora_A.weight`` / ``<site>.lora_B.weight`` becomes an input that keeps a
same-named initializer as the value used when no adapter is active. The defaults are real zeros of
rank 1 (never rank 0: onnxruntime issue 21483 on CUDA), so without an adapter the model computes
exactly the base model. The rank dimension is symbolic (one name per site) so adapters of different
ranks run in one session. A site inside ``If`` branches (Optimum's merged decoders) has one A and B in the main
graph, read by every branch from the outer scope, so one slot pair serves both branches: ONNX Runtime resolves a
branch's outer-scope read to the fed input or active adapter. (Such overridable inputs are listed by
``InferenceSession.get_overridable_initializers()``, not ``get_inputs()``.)

The parameters of modules trained in full (``modules_to_save``, the SEQ_CLS head) become slots the
same way, under their model names (``classifier.weight``), when their base values are given: the
default is the base (pre-training) value, so no adapter is the base model there too, and the model's
``lora_fx.modules_to_save`` metadata lists them (their names carry no adapter suffix). The model
records the fingerprint of its base weights (slots left out), which every ``.onnx_adapter`` written
for it carries too.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
import onnx_ir as ir

from lora_fx.errors import AdapterError, UnsupportedError
from lora_fx.passes.onnx.lora_layout import find_branches, read_records
from lora_fx.passes.result import PassResult

# The rank of the zero defaults: the smallest real (non-empty) tensor.
DEFAULT_RANK = 1


def rank_dim(site: str) -> str:
    return f"{site}.lora_r"


class ExposeAdapters:
    """Make the adapter initializers of every site in ``lora_fx.lora`` overridable graph inputs.

    Matches each recorded branch ``Add(y, MatMul(MatMul(x, A), B))``; A becomes input ``[in, r]``
    and B ``[r, out]`` with ``r`` symbolic, both defaulting to zeros ``[in, 1]`` / ``[1, out]``, and
    ``x @ A`` gets the same ``r`` as its last dim. Already exposed sites keep their slots.

    ``saved`` (``{parameter name: (module, base value)}``): parameters of modules trained in full, each an
    initializer of that name; it becomes an input of its fixed shape defaulting to the base value, and is
    listed in the ``lora_fx.modules_to_save`` metadata. ``changed`` names them by module.
    """

    def __init__(self, saved: Mapping[str, tuple[str, Any]] | None = None) -> None:
        self.saved = dict(saved or {})

    def __call__(self, model: ir.Model) -> PassResult:
        from lora_fx.onnx_adapter import stamp_fingerprint

        graph = model.graph
        records = read_records(model)
        if not records:
            raise AdapterError("this model has no LoRA adapter to expose; call lora_fx.apply(model, LoraConfig(...)) first")
        found = {site: find_branches(graph, site, rec) for site, rec in records.items()}
        changed = []
        for site, branches in found.items():
            branch = branches[0]
            r = rank_dim(site)
            for each in branches:  # every If branch's copy plans its buffers from its own x @ A
                _free_rank(each.matmul_a.outputs[0], r)
            if branch.a in graph.inputs and branch.b in graph.inputs:
                continue
            in_f, out_f = branch.a.shape[0], branch.b.shape[1]
            for value, shape, default in (
                (branch.a, [in_f, r], np.zeros((in_f, DEFAULT_RANK), dtype=branch.a.const_value.numpy().dtype)),
                (branch.b, [r, out_f], np.zeros((DEFAULT_RANK, out_f), dtype=branch.b.const_value.numpy().dtype)),
            ):
                value.const_value = ir.tensor(default, name=value.name)
                value.shape = ir.Shape(shape)
                if value not in graph.inputs:
                    graph.inputs.append(value)
            changed.append(site)
        changed += _expose_saved(model, self.saved)
        stamp_fingerprint(model)
        return PassResult(model, bool(changed), changed)


def _expose_saved(model: ir.Model, saved: Mapping[str, tuple[str, Any]]) -> list[str]:
    """The head slots: each parameter an input defaulting to its base value, listed in the metadata."""
    from lora_fx.onnx_adapter import SAVED_KEY, read_saved

    graph = model.graph
    listed = read_saved(model.metadata_props)
    changed: list[str] = []
    for name, (module, base) in sorted(saved.items()):
        value = graph.initializers.get(name)
        if value is None or value.const_value is None:
            raise UnsupportedError(
                f"{name} ({module}, trained in full: modules_to_save) is not an initializer of the exported graph, so it "
                "cannot become an adapter slot; export mode='merged' (the trained head written into the model)"
            )
        current = value.const_value.numpy()
        base = np.asarray(base)
        if tuple(base.shape) != tuple(current.shape):
            raise AdapterError(f"the base value of {name} has shape {tuple(base.shape)}, but the graph's is {tuple(current.shape)}")
        if name in listed and value in graph.inputs:
            continue
        value.const_value = ir.tensor(np.ascontiguousarray(base.astype(current.dtype)), name=name)
        value.shape = ir.Shape(list(current.shape))
        if value not in graph.inputs:
            graph.inputs.append(value)
        listed[name] = module
        if module not in changed:
            changed.append(module)
    if listed:
        model.metadata_props[SAVED_KEY] = json.dumps(listed, sort_keys=True)
    return changed


def settle_saved(model: ir.Model) -> list[str]:
    """The head slots (``lora_fx.modules_to_save``) as plain initializers holding the values they hold now, as
    a merge leaves them: no longer inputs, no longer listed. Returns their names."""
    from lora_fx.onnx_adapter import HEADS_AS_BASE_KEY, SAVED_KEY, read_saved

    names = sorted(read_saved(model.metadata_props))
    for name in names:
        value = model.graph.initializers.get(name)
        if value is not None and value in model.graph.inputs:
            model.graph.inputs.remove(value)
    for key in (SAVED_KEY, HEADS_AS_BASE_KEY):
        model.metadata_props.pop(key, None)
    return names


def _free_rank(value: ir.Value, r: str) -> None:
    """``x @ A`` gets the slot's symbolic rank as its last dim. torch.onnx.export records that value with
    the trained rank (``[b, s, 4]``) and the optimizer keeps known dims; ONNX Runtime plans its buffers
    from such a shape and refuses an adapter of another rank at the site ("Shape mismatch attempting to
    re-use buffer"), though A and B themselves are symbolic. Done for exposed sites too: it repairs a
    model exported before this was."""
    if value.shape is not None and len(value.shape) and value.shape[-1] != r:
        value.shape = ir.Shape([*value.shape[:-1], r])


def expose_adapters(model: ir.Model, saved: Mapping[str, tuple[str, Any]] | None = None) -> PassResult:
    return ExposeAdapters(saved)(model)
