"""Move each LoRA ``Add`` in front of the site's bias ``Add`` so ONNX Runtime's bias fusions still apply.

The contract places the branch after the bias: ``Add(Add(x @ W, bias), x @ A @ B)``. ONNX Runtime fuses
``Add(bias) → Gelu`` into ``BiasGelu`` and ``Add(bias) → Add(residual) → LayerNormalization`` into
``SkipLayerNormalization`` only when the bias ``Add`` feeds those ops directly, so in that order the
adapter-slot model loses the base model's fusions and runs slower than branch FLOPs explain. The
same sum in the order ``Add(Add(x @ W, x @ A @ B), bias)`` keeps them. The branch stays
``MatMul, MatMul, Add`` on the adapter initializers, so ``fold_lora`` and ``expose_adapters`` still
recognise it (its site output is then the bias-free ``x @ W``). ``benchmarks/ort_inference.py`` keeps
the unhoisted order as an ablation; on MiniLM the two measure within noise of each other.
"""

from __future__ import annotations

import onnx_ir as ir

from lora_fx.passes.onnx.lora_layout import Branch, BranchForm, find_branches, read_records
from lora_fx.passes.result import PassResult


def _is_bias(graph: ir.Graph, value: ir.Value | None) -> bool:
    init = graph.initializers.get(value.name) if value is not None and value.name else None
    return init is value and init is not None and len(init.shape) == 1


class HoistLoraAdd:
    """Matches ``out = Add(y, x @ A @ B)`` with ``y = Add(MatMul(x, W), bias)`` (bias a 1-D initializer,
    ``y`` and the MatMul output used once, ``out`` not a graph output) and rewrites it to
    ``out = Add(Add(MatMul(x, W), x @ A @ B), bias)``."""

    def __call__(self, model: ir.Model) -> PassResult:
        root = model.graph
        changed = []
        for site, rec in read_records(model).items():
            hoisted = [self._hoist(root, branch) for branch in find_branches(root, site, rec)]
            if any(hoisted):
                changed.append(site)
        return PassResult(model, bool(changed), changed)

    @staticmethod
    def _hoist(root: ir.Graph, branch: Branch) -> bool:
        """One branch (a site inside If branches has one per branch node; each is hoisted where it lies)."""
        graph = branch.graph
        if branch.form is not BranchForm.MATMUL_ADD:
            return False  # fuse_lora_add ran first: its Gemm accumulates into whatever y is
        bias_add = branch.y.producer()
        if bias_add is None or bias_add.op_type != "Add" or len(list(branch.y.uses())) != 1:
            return False
        idx = next((i for i in (0, 1) if _is_bias(root, bias_add.inputs[1 - i])), None)
        if idx is None:
            return False
        mm_out = bias_add.inputs[idx]
        producer = mm_out.producer() if mm_out is not None else None
        if producer is None or producer.op_type != "MatMul" or len(list(mm_out.uses())) != 1:
            return False
        out = branch.add.outputs[0]
        if out in graph.outputs or branch.y in graph.outputs:
            return False
        y_slot = 0 if branch.add.inputs[0] is branch.y else 1
        # The LoRA Add's readers read the bias Add instead, which now comes last.
        ir.convenience.replace_all_uses_with(out, branch.y)
        branch.add.replace_input_with(y_slot, mm_out)
        bias_add.replace_input_with(idx, out)
        graph.remove(bias_add)
        graph.insert_after(branch.add, bias_add)
        return True


def hoist_lora_add(model: ir.Model) -> PassResult:
    return HoistLoraAdd()(model)
