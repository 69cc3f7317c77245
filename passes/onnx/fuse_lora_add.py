"""Fuse each LoRA branch's ``MatMul(·, B)`` and ``Add`` into one ``Gemm`` that accumulates into the site output.

In a served model the adapters are graph inputs, so ONNX Runtime cannot prepack them and the branch
costs more than its FLOPs (about 3.5% of MiniLM's at r=8): ``MatMul(·, B)`` writes an activation-sized
delta and the ``Add`` reads it back with the site output. ``Gemm(u, B, C)`` computes ``u @ B + C`` in
one node with no delta tensor (ONNX Runtime still copies C into its output first, which is most of
what the branch costs after this pass). ``Gemm`` takes 2-D operands only, hence the ``Flatten`` /
``Reshape`` around it for 3-D activations (views in ONNX Runtime, not copies). Measured in
``benchmarks/ort_inference.py`` (MiniLM, r=8: slot/base 1.11 -> 1.06 at batch 1, 1.18 -> 1.13 at batch 8).

What the branch still costs is memory traffic, not FLOPs: ONNX Runtime profiles of MiniLM at batch 8
(1024 rows) put the 37 B-side Gemms at about 7% of the base's time, each copying C into its output and
then reading and writing it again with K = r; the 37 ``x @ A`` MatMuls (N = r) add about 4%. Measured
and not kept, because they did not lower slot/base: one MatMul for the A projections of the sites that
read the same input (q, k, v: Concat of their A slots, one MatMul, Split; 1.064 -> 1.063 at batch 1,
within noise at batch 8), zero-padded B sides reading that one product, A concatenated onto W (the
weight is no longer a constant ONNX Runtime can prepack: 1.25x), and ``[x | x @ A] @ [W; B]`` (1.23x).
Merging at run time, ``x @ (W + A @ B)``, was measured per layer shape (1 thread, ratio to the base
MatMul + bias): at 1024 rows it beats this Gemm for 384x384 (1.07 against 1.22) and 384x1536 (1.08
against 1.12) but loses for 1536x384 (1.15 against 1.09), and at 128 rows (batch 1) it loses
everywhere (1.33-1.47 against 1.08-1.20): the merged W is not prepacked. Whole-model estimate at
batch 8 about 1.09, worse at batch 1; not kept. Absorbing the bias ``Add`` that follows a site into
this Gemm (``x @ A`` padded with a column of ones, B with the bias as an extra row) removes those
Adds (about 3 ms of 320 at batch 8 in a profile) but measured within noise of this form: slot/base
1.078 against 1.079 (every site) and 1.091 (q, k, v only), interquartile ranges of +-10%. The base GEMM accumulating into the branch (``delta = x @ A @ B``,
then ``Gemm(x, W, delta)`` with W still a prepacked constant) saves one pass over each site output: in
ONNX Runtime profiles (kernel time, MiniLM) slot/base 1.080 against 1.110 for this form at batch 8, 1.10
against 1.12 at batch 1; not kept, as it is still far from 1.05 and the base's MatMuls become Gemms (a new
branch form for every reader). What remains is mostly ``x @ A``: a MatMul with N = r runs at about a
third of MLAS's peak (192 us for 1024x384 @ 384x8 on one thread, and neither ``Gemm`` nor its transposed
form ``A^T @ x^T`` is faster). Doing the sum in the base GEMM's epilogue needs a
fused kernel, which no standard ONNX op (nor a com.microsoft contrib op on CPU) offers.

The result is the GEMM form of ``lora_layout`` (``BranchForm.GEMM``), which ``find_branch`` — and so
``fold_lora`` and ``expose_adapters`` — reads like the contract form. Run it last, after
``expose_adapters``, ``hoist_lora_add`` and the optimizer.
"""

from __future__ import annotations

import onnx_ir as ir

from lora_fx.passes.onnx.lora_layout import Branch, BranchForm, find_branches, read_records
from lora_fx.passes.result import PassResult


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _check(model: ir.Model, branch: Branch) -> str | None:
    """Why this branch is left in the contract form, or None when it can be fused."""
    rank, y_rank = _rank(branch.x), _rank(branch.y)
    if rank is not None and y_rank is not None and rank != y_rank:
        return f"the site output (rank {y_rank}) is broadcast against the branch (rank {rank})"
    if rank is None and model.opset_imports.get("", 1) < 11:
        return "the input's rank is unknown and the model's opset is below 11 (Flatten needs axis=-1)"
    return None


class FuseLoraAdd:
    """Matches each recorded branch ``out = Add(y, MatMul(MatMul(x, A), B))`` and rewrites it to
    ``out = Reshape(Gemm(Flatten(MatMul(x, A)), B, Flatten(y)), Shape(y))`` — for a 2-D ``x`` simply
    ``Gemm(MatMul(x, A), B, y)``. ``x @ A`` stays a MatMul (its input may be N-D; of unknown rank,
    ``Flatten(axis=-1)``). Branches it leaves alone, with the reason, are in ``refused``: a site output
    broadcast against the branch, an input of unknown rank below opset 11. Fused branches stay as they are.
    """

    def __init__(self) -> None:
        self.refused: dict[str, str] = {}

    def __call__(self, model: ir.Model) -> PassResult:
        changed = []
        for site, rec in read_records(model).items():
            # A site inside If branches has a branch per branch node: all are fused, or all left as they are.
            branches = [b for b in find_branches(model.graph, site, rec) if b.form is not BranchForm.GEMM]
            if not branches:
                continue  # fused already
            why = next((w for b in branches if (w := _check(model, b)) is not None), None)
            if why is not None:
                self.refused[site] = why
                continue
            for i, branch in enumerate(branches):
                self._rewrite(branch.graph, branch, f".{i}" if i else "")
            changed.append(site)
        return PassResult(model, bool(changed), changed)

    @staticmethod
    def _rewrite(graph: ir.Graph, branch: Branch, tag: str = "") -> None:
        site, add = branch.site, branch.add
        rank = _rank(branch.x)

        def node(op: str, inputs: list[ir.Value], name: str, **attrs: int) -> ir.Value:
            new = ir.node(op, inputs, attributes=attrs, name=f"{site}.lora_{name}")
            new.outputs[0].name = f"{site}.lora_{name}_out{tag}"  # value names are unique across graphs
            graph.insert_before(add, new)
            return new.outputs[0]

        u = branch.matmul_a.outputs[0]
        if rank == 2:
            out = node("Gemm", [u, branch.b, branch.y], "gemm")
        else:
            # Shape(y) first, so the Gemm is y's last reader and ONNX Runtime may accumulate in place.
            shape = node("Shape", [branch.y], "shape")
            axis = rank - 1 if rank is not None else -1  # all leading dims into rows, like MatMul does
            flat_u = node("Flatten", [u], "flatten_u", axis=axis)
            flat_y = node("Flatten", [branch.y], "flatten_y", axis=axis)
            gemm = node("Gemm", [flat_u, branch.b, flat_y], "gemm")
            out = node("Reshape", [gemm, shape], "reshape")
        old = add.outputs[0]
        out.shape, out.type = old.shape, old.type
        if old in graph.outputs:  # the graph output keeps its name
            graph.outputs[graph.outputs.index(old)] = out
            name, old.name = old.name, None
            out.name = name
        ir.convenience.replace_all_uses_with(old, out)
        graph.remove([add, branch.matmul_b], safe=True)


def fuse_lora_add(model: ir.Model) -> PassResult:
    return FuseLoraAdd()(model)
