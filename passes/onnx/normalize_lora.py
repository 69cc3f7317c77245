"""Bring the LoRA branches of a ``torch.onnx.export`` graph into the ONNX contract layout.

The exporter (``optimize=False``) writes each FX branch ``y + s * linear(linear(x, A), B)`` with
PEFT-layout initializers ``A [r, in]``, ``B [out, r]`` as one of:

- ``MatMul(x, Transpose(A, perm=[1, 0]))`` (3-D activations) or ``Gemm(x, A, transB=1)`` (2-D),
- the same for B,
- ``Mul(·, s)`` with a constant scale (either operand order), possibly absent when ``s == 1``,
- ``Add(y, ·)`` (either operand order).

The pass rewrites each into ``Add(y, MatMul(MatMul(x, A'), B'))`` with ``A' = A^T [in, r]`` and
``B' = (s B)^T [r, out]`` under the same initializer names (the conversion is
``lora_fx.adapters.to_deployment_layout``), and records the ``lora_fx.lora`` metadata. A branch that
is already in contract layout is left alone; anything else is refused with the reason.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from lora_fx.adapters import to_deployment_layout
from lora_fx.errors import UnsupportedError
from lora_fx.passes.onnx.lora_layout import CONFIG_KEY, a_name, b_name, read_records, write_records
from lora_fx.passes.result import PassResult


def _is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _single_user(value: ir.Value, what: str) -> ir.Node:
    users = [use.node for use in value.uses()]
    if len(users) != 1:
        raise UnsupportedError(f"{what} has {len(users)} users; a LoRA branch is a single chain")
    return users[0]


def _projection(init: ir.Value, what: str) -> tuple[ir.Node, list[ir.Node], ir.Value]:
    """The node computing ``h @ init^T`` and the nodes to delete: (matmul-like node, removable, h)."""
    user = _single_user(init, what)
    if user.op_type == "Transpose" and _is_default_domain(user) and tuple(_attr(user, "perm", (1, 0))) == (1, 0):
        mm = _single_user(user.outputs[0], f"{what}^T")
        if mm.op_type != "MatMul" or mm.inputs[1] is not user.outputs[0]:
            raise UnsupportedError(f"{what}: expected MatMul(h, Transpose({init.name})), found {mm.op_type}")
        return mm, [user, mm], mm.inputs[0]
    if user.op_type == "Gemm" and _is_default_domain(user) and user.inputs[1] is init:
        if _attr(user, "transB", 0) != 1 or _attr(user, "transA", 0) != 0 or len(user.inputs) > 2 and user.inputs[2] is not None:
            raise UnsupportedError(f"{what}: a Gemm with transA/without transB or with a bias is not an exported LoRA projection")
        if float(_attr(user, "alpha", 1.0)) != 1.0:
            raise UnsupportedError(f"{what}: Gemm alpha != 1 is not an exported LoRA projection")
        return user, [user], user.inputs[0]
    raise UnsupportedError(f"{what}: expected Transpose+MatMul or Gemm(transB=1), found {user.op_type}")


def _scale_constant(value: ir.Value) -> tuple[np.ndarray | None, list[ir.Node]]:
    """The constant ``value`` holds, and the Cast to drop with the Mul: a bfloat16/float16 branch multiplies by
    ``Cast(float32 constant)``, so the scale it applies is that constant rounded to the Cast's dtype."""
    const = ir.convenience.get_const_tensor(value)
    if const is not None:
        return const.numpy(), []
    cast = value.producer()
    if cast is None or cast.op_type != "Cast" or not _is_default_domain(cast) or len(value.uses()) != 1:
        return None, []
    source = ir.convenience.get_const_tensor(cast.inputs[0])
    if source is None:
        return None, []
    return source.numpy().astype(ir.DataType(_attr(cast, "to", 0)).numpy()), [cast]


class NormalizeLora:
    """Rewrite exported LoRA branches (Transpose/Gemm, Mul by the scale, Add) into contract layout.

    Matches, per site in ``records`` (``{site: {"r", "alpha", "scale", "in_features", "out_features"}}``,
    from the FX model's bookkeeping): initializers ``<site>.lora_A.weight`` ``[r, in]`` and
    ``<site>.lora_B.weight`` ``[out, r]`` used as ``y + s * ((x A^T) B^T)``.
    """

    def __init__(self, records: dict[str, dict[str, Any]], config_json: str | None = None) -> None:
        self.records = records
        self.config_json = config_json

    def __call__(self, model: ir.Model) -> PassResult:
        graph = model.graph
        records = read_records(model)
        changed = []
        for site, rec in self.records.items():
            a = graph.initializers.get(a_name(site))
            b = graph.initializers.get(b_name(site))
            if a is None or b is None:
                raise UnsupportedError(
                    f"site {site}: {a_name(site)} / {b_name(site)} did not survive export; "
                    "export with optimize=False so parameter names are kept"
                )
            if tuple(a.shape) == (rec["in_features"], rec["r"]) and all(u.node.op_type == "MatMul" for u in a.uses()):
                records[site] = self._record(site, rec)
                continue  # already contract layout
            self._rewrite(graph, site, a, b)
            records[site] = self._record(site, rec)
            changed.append(site)
        write_records(model, records)
        if self.config_json is not None:
            model.metadata_props[CONFIG_KEY] = self.config_json
        return PassResult(model, bool(changed), changed)

    @staticmethod
    def _record(site: str, rec: dict[str, Any]) -> dict[str, Any]:
        keep = {k: rec[k] for k in ("r", "alpha", "scale", "in_features", "out_features") if k in rec}
        return {**keep, "a": a_name(site), "b": b_name(site)}

    def _rewrite(self, graph: ir.Graph, site: str, a: ir.Value, b: ir.Value) -> None:
        mm_a, drop_a, x = _projection(a, f"site {site}: lora_A")
        mm_b, drop_b, h = _projection(b, f"site {site}: lora_B")
        if h is not mm_a.outputs[0]:
            raise UnsupportedError(f"site {site}: lora_B does not consume the lora_A projection")
        after = _single_user(mm_b.outputs[0], f"site {site}: the B projection")
        scale = 1.0
        drop_mul: list[ir.Node] = []
        delta = mm_b.outputs[0]
        if after.op_type == "Mul" and _is_default_domain(after):
            other = after.inputs[1] if after.inputs[0] is delta else after.inputs[0]
            const, cast = _scale_constant(other)
            if const is None or const.size != 1:
                raise UnsupportedError(f"site {site}: the LoRA scale is not a scalar constant")
            scale = float(const.reshape(()))
            drop_mul = [after, *cast]
            delta = after.outputs[0]
            after = _single_user(delta, f"site {site}: the scaled branch")
        if after.op_type != "Add" or not _is_default_domain(after):
            raise UnsupportedError(f"site {site}: expected the branch to be added to the site output, found {after.op_type}")
        add = after
        y = add.inputs[1] if add.inputs[0] is delta else add.inputs[0]

        a_np, b_np = np.asarray(a.const_value.numpy()), np.asarray(b.const_value.numpy())
        # Through float64 and back to each stored dtype (bfloat16 as ml_dtypes, which torch.from_numpy refuses):
        # A's transpose is exact; s is folded into B in float64 before B goes back to its dtype.
        a_dep, b_dep = to_deployment_layout(*(torch.from_numpy(t.astype(np.float64)) for t in (a_np, b_np)), scale)
        new_a = ir.Value(name=a.name, shape=ir.Shape(list(a_dep.shape)), type=a.type,
                         const_value=ir.Tensor(a_dep.numpy().astype(a_np.dtype), name=a.name))
        new_b = ir.Value(name=b.name, shape=ir.Shape(list(b_dep.shape)), type=b.type,
                         const_value=ir.Tensor(b_dep.numpy().astype(b_np.dtype), name=b.name))
        m1 = ir.node("MatMul", [x, new_a], name=f"{site}/lora_A/MatMul")
        m2 = ir.node("MatMul", [m1.outputs[0], new_b], name=f"{site}/lora_B/MatMul")
        m3 = ir.node("Add", [y, m2.outputs[0]], name=f"{site}/lora/Add")
        for new, old in ((m1, mm_a), (m2, mm_b), (m3, add)):
            new.outputs[0].shape, new.outputs[0].type = old.outputs[0].shape, old.outputs[0].type
        old_out = add.outputs[0]
        graph.insert_before(add, [m1, m2, m3])
        if old_out in graph.outputs:
            name = old_out.name
            graph.outputs[graph.outputs.index(old_out)] = m3.outputs[0]
            old_out.name = None
            m3.outputs[0].name = name
        else:
            name = old_out.name
            old_out.name = None
            m3.outputs[0].name = name
        ir.convenience.replace_all_uses_with(old_out, m3.outputs[0])
        graph.remove(drop_a + drop_b + drop_mul + [add], safe=True)
        graph.initializers.pop(a.name)
        graph.initializers.pop(b.name)
        graph.register_initializer(new_a)
        graph.register_initializer(new_b)


def normalize_lora(model: ir.Model, records: dict[str, dict[str, Any]], config: Any = None) -> PassResult:
    config_json = None if config is None else json.dumps(config.to_dict(), sort_keys=True)
    return NormalizeLora(records, config_json)(model)
