"""lora_layout: the contract's branches as the passes read them."""

from __future__ import annotations

from lora_fx.passes.onnx.lora_layout import find_branches, read_records, remove_branch
from tests.exported import lora_onnx


def test_a_removed_branch_still_names_its_graph():
    """Passes read ``branch.graph`` after removing the branch (fold_lora's cast clean-up): the nodes belong to
    no graph then, so the branch keeps the one it was found in."""
    model = lora_onnx("gemm-mlp")
    site, rec = next(iter(read_records(model).items()))
    (branch,) = find_branches(model.graph, site, rec)
    remove_branch(model.graph, branch)
    assert branch.matmul_a.graph is None  # what a property reading the node would return
    assert branch.graph is model.graph
    assert branch.add not in list(model.graph)
