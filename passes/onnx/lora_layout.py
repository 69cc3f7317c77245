"""The ONNX LoRA contract, read and checked in one place (helpers, not a pass).

Per adapted site the graph holds initializers ``<site>.lora_A.weight`` ``[in, r]`` and
``<site>.lora_B.weight`` ``[r, out]`` (deployment layout, scale folded into B), and the site's
output ``y`` is replaced by ``Add(y, MatMul(MatMul(x, A), B))``. ``metadata_props`` hold
``lora_fx.lora`` (JSON ``{site: {"r", "alpha", "scale", "in_features", "out_features", "a", "b"}}``)
and ``lora_fx.lora_config`` (the LoraConfig JSON).

With ``lora_dropout`` > 0 the branch reads ``Dropout(x)`` instead of ``x`` (``insert_lora``); the
Dropout feeds nothing but ``MatMul(·, A)`` and ``Branch.x`` is its input, the site's input.

A served model may hold the same sum in the form ``fuse_lora_add`` writes (``BranchForm.GEMM``):
``Reshape(Gemm(Flatten(MatMul(x, A)), B, Flatten(y)), Shape(y))`` (or ``Gemm(MatMul(x, A), B, y)``
when ``x`` is 2-D). ``find_branch`` reads both, so folding and exposing work on either.

A site inside ``If`` branches (``find_sites``' ``Sites.inside``: Optimum's merged decoders) has its A and B once, in
the main graph, and one branch at every node of the site, each in the subgraph holding that node and reading A and B
from the outer scope. ``find_branches`` returns them all (``Branch.graph`` the graph each lies in); ``find_branch``
reads a site with one branch and refuses one with several.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from lora_fx.errors import UnsupportedError

LORA_KEY = "lora_fx.lora"
CONFIG_KEY = "lora_fx.lora_config"
# sha256 of the base weights of a model with adapter slots; .onnx_adapter files record it too.
FINGERPRINT_KEY = "lora_fx.base_fingerprint"
# Metadata keys a prefix-tuning rewrite leaves; their presence means "cannot be folded".
PREFIX_KEY_START = "lora_fx.prefix"


def read_records(model: ir.Model) -> dict[str, dict[str, Any]]:
    """The ``lora_fx.lora`` site records, ``{}`` when the model has no LoRA."""
    text = model.metadata_props.get(LORA_KEY)
    if not text:
        return {}
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UnsupportedError(f"metadata {LORA_KEY} is not valid JSON ({exc}); re-run lora_fx.apply on the base model") from None
    return {site: dict(rec) for site, rec in records.items()}


def write_records(model: ir.Model, records: dict[str, dict[str, Any]]) -> None:
    if records:
        model.metadata_props[LORA_KEY] = json.dumps(records, sort_keys=True)
    else:
        model.metadata_props.pop(LORA_KEY, None)


def has_prefix(model: ir.Model) -> bool:
    return any(key.startswith(PREFIX_KEY_START) for key in model.metadata_props)


def a_name(site: str) -> str:
    return f"{site}.lora_A.weight"


def b_name(site: str) -> str:
    return f"{site}.lora_B.weight"


class BranchForm(enum.Enum):
    """How a site's ``y + (x @ A) @ B`` is spelled in the graph."""

    MATMUL_ADD = "matmul_add"  # the contract: Add(y, MatMul(MatMul(x, A), B))
    GEMM = "gemm"  # fuse_lora_add's: one Gemm multiplies by B and accumulates into y


@dataclass
class Branch:
    """One site's LoRA branch. ``add`` is the node whose output is the adapted site output (the
    ``Add`` of the contract; the ``Reshape``, or for 2-D inputs the ``Gemm``, of the GEMM form);
    ``matmul_b`` the node multiplying by B (``MatMul`` or ``Gemm``); ``nodes`` every node of the branch."""

    site: str
    a: ir.Value
    b: ir.Value
    matmul_a: ir.Node
    matmul_b: ir.Node
    add: ir.Node
    x: ir.Value
    y: ir.Value
    form: BranchForm = BranchForm.MATMUL_ADD
    nodes: list[ir.Node] = field(default_factory=list)
    # The graph the branch's nodes lie in: the main graph, or the If branch holding the site's node.
    # Kept from construction: once the branch is removed its nodes belong to no graph.
    graph: ir.Graph = field(init=False)

    def __post_init__(self) -> None:
        self.graph = self.matmul_a.graph


def _only_use(value: ir.Value, op_type: str | tuple[str, ...], what: str) -> ir.Node:
    wanted = (op_type,) if isinstance(op_type, str) else op_type
    users = [use.node for use in value.uses()]
    if len(users) != 1 or users[0].op_type not in wanted or users[0].domain not in ("", "ai.onnx"):
        found = ", ".join(sorted(u.op_type for u in users)) or "nothing"
        raise UnsupportedError(f"{what} should feed exactly one {' or '.join(wanted)} node (the LoRA contract), but feeds {found}")
    return users[0]


def _plain_gemm(node: ir.Node) -> bool:
    """``Gemm(u, B, C)`` computing exactly ``u @ B + C``."""
    attrs = node.attributes
    return (len(node.inputs) == 3 and all(attrs.get_float(k, 1.0) == 1.0 for k in ("alpha", "beta"))
            and all(attrs.get_int(k, 0) == 0 for k in ("transA", "transB")))


def _branch_input(mm_a: ir.Node) -> tuple[ir.Value, list[ir.Node]]:
    """The site input ``x`` the branch reads, and the branch's own ``Dropout`` in front of ``MatMul(·, A)``
    if it has one (a Dropout that feeds nothing else and whose mask nobody reads)."""
    x = mm_a.inputs[0]
    drop = x.producer() if x is not None else None
    if (drop is not None and drop.op_type == "Dropout" and drop.domain in ("", "ai.onnx")
            and [use.node for use in x.uses()] == [mm_a]
            and (len(drop.outputs) < 2 or not list(drop.outputs[1].uses()))):
        return drop.inputs[0], [drop]
    return x, []


def _gemm_branch(graph: ir.Graph, site: str, a: ir.Value, b: ir.Value, mm_a: ir.Node, first: ir.Node) -> Branch:
    """The GEMM form, from the node reading ``x @ A`` (a ``Flatten`` or, for 2-D inputs, the ``Gemm``)."""
    def refuse(why: str) -> UnsupportedError:
        return UnsupportedError(f"site {site}: the fused LoRA branch (Gemm form) {why}")

    x, nodes = _branch_input(mm_a)
    nodes.append(mm_a)
    flat_u = None
    if first.op_type == "Flatten":
        flat_u = first
        nodes.append(flat_u)
        gemm = _only_use(flat_u.outputs[0], "Gemm", f"site {site}: Flatten(x @ A)")
    else:
        gemm = first
    if gemm.inputs[1] is not b or not _plain_gemm(gemm):
        raise refuse(f"must be Gemm(x @ A, {b.name}, y) with alpha = beta = 1 and no transposes")
    nodes.append(gemm)
    c = gemm.inputs[2]
    if flat_u is None:
        return Branch(site, a, b, mm_a, gemm, gemm, x, c, BranchForm.GEMM, nodes)
    flat_y = c.producer() if c is not None else None
    if flat_y is None or flat_y.op_type != "Flatten" or len(list(c.uses())) != 1:
        raise refuse("must accumulate into Flatten(y), read by the Gemm alone")
    y = flat_y.inputs[0]
    reshape = _only_use(gemm.outputs[0], "Reshape", f"site {site}: the Gemm")
    shape = reshape.inputs[1].producer() if reshape.inputs[1] is not None else None
    if shape is None or shape.op_type != "Shape" or shape.inputs[0] is not y or len(list(reshape.inputs[1].uses())) != 1:
        raise refuse("must be reshaped back to Shape(y)")
    nodes += [flat_y, shape, reshape]
    return Branch(site, a, b, mm_a, gemm, reshape, x, y, BranchForm.GEMM, nodes)


def _adapter_values(graph: ir.Graph, site: str, rec: dict[str, Any]) -> tuple[ir.Value, ir.Value]:
    values = []
    for name in (rec.get("a") or a_name(site), rec.get("b") or b_name(site)):
        value = graph.initializers.get(name)
        if value is None:
            raise UnsupportedError(f"site {site}: adapter initializer {name!r} is missing from the graph")
        values.append(value)
    return values[0], values[1]


def find_branch(graph: ir.Graph, site: str, rec: dict[str, Any]) -> Branch:
    """Locate the MatMul, MatMul, Add of ``site``; anything else is refused with the reason. A site with a branch in
    several places (inside If branches) is refused: read it with ``find_branches``."""
    a, b = _adapter_values(graph, site, rec)
    users = [use.node for use in a.uses()]
    if len(users) > 1 and any(u.graph is not graph for u in users):
        raise UnsupportedError(
            f"site {site} lies inside control-flow subgraphs, with its LoRA branch in {len(users)} places (one per If "
            "branch reading its weight); read it with lora_layout.find_branches")
    return _branch_from(site, a, b, _only_use(a, "MatMul", f"site {site}: {a.name}"))


def find_branches(graph: ir.Graph, site: str, rec: dict[str, Any]) -> list[Branch]:
    """Every branch of ``site`` (``graph`` the main graph, holding A and B): one for a main-graph site, one per node
    of the site for a site inside If branches, each read as ``find_branch`` reads one; anything else is refused."""
    a, b = _adapter_values(graph, site, rec)
    users = [use.node for use in a.uses()]
    if len(users) < 2 or all(u.graph is graph for u in users):
        return [find_branch(graph, site, rec)]
    bad = sorted({u.op_type for u in users if u.op_type != "MatMul" or u.domain not in ("", "ai.onnx")})
    if bad:
        raise UnsupportedError(f"{a.name} should feed only MatMul nodes (x @ A, one per branch of site {site}), "
                               f"but feeds {', '.join(bad)}")
    return [_branch_from(site, a, b, mm_a) for mm_a in users]


def _branch_from(site: str, a: ir.Value, b: ir.Value, mm_a: ir.Node) -> Branch:
    graph = mm_a.graph
    if mm_a.inputs[1] is not a:
        raise UnsupportedError(f"site {site}: {a.name} must be the right operand of its MatMul (x @ A)")
    mm_b = _only_use(mm_a.outputs[0], ("MatMul", "Flatten", "Gemm"), f"site {site}: x @ A")
    if mm_b.op_type != "MatMul":
        return _gemm_branch(graph, site, a, b, mm_a, mm_b)
    if mm_b.inputs[1] is not b:
        raise UnsupportedError(f"site {site}: x @ A must be multiplied by {b.name} (x @ A @ B)")
    add = _only_use(mm_b.outputs[0], "Add", f"site {site}: x @ A @ B")
    delta = mm_b.outputs[0]
    y = add.inputs[1] if add.inputs[0] is delta else add.inputs[0]
    x, nodes = _branch_input(mm_a)
    return Branch(site, a, b, mm_a, mm_b, add, x, y, BranchForm.MATMUL_ADD, [*nodes, mm_a, mm_b, add])


def replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Every user of ``old`` (and a graph output) reads ``new``; a graph output keeps its name."""
    if old in graph.outputs:
        idx = graph.outputs.index(old)
        old_name = old.name
        old.name = None
        graph.outputs[idx] = new
        if new.name is not None and new not in graph.outputs[:idx]:
            new.name = old_name
    ir.convenience.replace_all_uses_with(old, new)


def remove_branch(graph: ir.Graph, branch: Branch) -> None:
    """Drop the branch's nodes (from the graph holding them) and, once no other branch of the site reads them, its
    initializers in ``graph`` (A, B, a Dropout's ratio); the Add's users (and a graph output) read ``y`` again."""
    replace_value(branch.graph, branch.add.outputs[0], branch.y)
    own = [v for node in branch.nodes for v in node.inputs
           if v is not None and v.name in graph.initializers and graph.initializers[v.name] is v and v not in (branch.a, branch.b)]
    branch.graph.remove(list(reversed(branch.nodes)), safe=True)
    for value in (branch.a, branch.b):
        if list(value.uses()):
            continue  # another branch of the site (inside If branches) still reads it
        graph.initializers.pop(value.name, None)
        if value in graph.inputs:
            graph.inputs.remove(value)
    for value in own:  # constants of the branch (the Dropout ratio) that nothing reads now
        if not list(value.uses()) and value not in graph.outputs and value not in graph.inputs:
            graph.initializers.pop(value.name, None)


def adapter_names(records: dict[str, dict[str, Any]]) -> set[str]:
    return {n for site, rec in records.items() for n in (rec.get("a") or a_name(site), rec.get("b") or b_name(site))}
