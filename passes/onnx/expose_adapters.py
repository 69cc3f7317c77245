"""Turn every LoRA adapter initializer into a graph input with a default: ONNX Runtime adapter slots.

ONNX Runtime's adapters (``LoraAdapter`` + ``RunOptions.add_active_adapter``) override graph inputs
by name, so each ``<site>.lora_A.weight`` / ``<site>.lora_B.weight`` becomes an input that keeps a
same-named initializer as the value used when no adapter is active. The defaults are real zeros of
rank 1 (never rank 0: onnxruntime issue 21483 on CUDA), so without an adapter the model computes
exactly the base model. The rank dimension is symbolic (one name per site) so adapters of different
ranks run in one session. The model records the fingerprint of its base weights, which every
``.onnx_adapter`` written for it carries too.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lora_fx.errors import AdapterError
from lora_fx.passes.onnx.lora_layout import find_branch, read_records
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
    """

    def __call__(self, model: ir.Model) -> PassResult:
        from lora_fx.onnx_adapter import stamp_fingerprint

        graph = model.graph
        records = read_records(model)
        if not records:
            raise AdapterError("this model has no LoRA adapter to expose; call lora_fx.apply(model, LoraConfig(...)) first")
        changed = []
        for site, rec in records.items():
            branch = find_branch(graph, site, rec)
            r = rank_dim(site)
            _free_rank(branch.matmul_a.outputs[0], r)
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
        stamp_fingerprint(model)
        return PassResult(model, bool(changed), changed)


def _free_rank(value: ir.Value, r: str) -> None:
    """``x @ A`` gets the slot's symbolic rank as its last dim. torch.onnx.export records that value with
    the trained rank (``[b, s, 4]``) and the optimizer keeps known dims; ONNX Runtime plans its buffers
    from such a shape and refuses an adapter of another rank at the site ("Shape mismatch attempting to
    re-use buffer"), though A and B themselves are symbolic. Done for exposed sites too: it repairs a
    model exported before this was."""
    if value.shape is not None and len(value.shape) and value.shape[-1] != r:
        value.shape = ir.Shape([*value.shape[:-1], r])


def expose_adapters(model: ir.Model) -> PassResult:
    return ExposeAdapters()(model)
