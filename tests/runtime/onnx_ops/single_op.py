"""One ONNX node as a model, run by lora_fx's torch execution and by ONNX Runtime, outputs compared.

The op tests under this folder are tables of nodes whose ONNX semantics differ from torch's defaults
(integer division, negative indices, attribute defaults per opset, ...); ONNX Runtime is the reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import helper

from lora_fx.runtime.onnx_torch import OnnxModule
from tests.runtime import onnx_models as om

MS = "com.microsoft"
rng = np.random.default_rng(0)


def randn(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def ms_node(op: str, ins: list[str], outs: list[str], **attrs) -> onnx.NodeProto:
    return helper.make_node(op, ins, outs, domain=MS, **attrs)


def single_op_model(node: onnx.NodeProto, inputs: dict[str, np.ndarray], opset: int = 18,
                    inits: dict[str, np.ndarray] | None = None) -> ir.Model:
    """``node`` alone in a graph: ``inputs`` are graph inputs, ``inits`` initializers, every output the
    node names (optional ones left empty are skipped) a graph output. A com.microsoft node gets that
    domain's opset too."""
    return graph_model([node], inputs, [o for o in node.output if o], opset=opset, inits=inits)


def graph_model(nodes: list[onnx.NodeProto], inputs: dict[str, np.ndarray], outputs: list[str], opset: int = 18,
                inits: dict[str, np.ndarray] | None = None) -> ir.Model:
    """A few ``nodes`` as a graph (ops that need company, such as sequences, or that hold subgraphs):
    ``inputs`` are graph inputs, ``inits`` initializers, ``outputs`` the graph outputs."""
    def info(name: str, arr: np.ndarray) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), None)

    graph = helper.make_graph(
        nodes, "g", [info(k, v) for k, v in inputs.items()], [helper.make_empty_tensor_value_info(o) for o in outputs],
        initializer=[onnx.numpy_helper.from_array(v, k) for k, v in (inits or {}).items()],
    )
    ms = any(n.domain == MS for n in nodes)
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(MS, 1)] if ms else [])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=imports, ir_version=10))


def check_against_ort(model: ir.Model, inputs: dict[str, np.ndarray], tmp_path: Path, tol: float = 1e-6) -> None:
    """The model's outputs from ``OnnxModule`` equal ONNX Runtime's: shapes, dtypes and values."""
    path = tmp_path / "op.onnx"
    ir.save(model, str(path))
    ref = om.ort_run(path, inputs)
    out = OnnxModule(model, trainable=[])(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    assert len(out) == len(ref)
    for (name, got), r in zip(out.items(), ref):
        got = got.detach().numpy()
        assert got.shape == r.shape and got.dtype == r.dtype, (name, got.shape, r.shape, got.dtype, r.dtype)
        if np.issubdtype(r.dtype, np.floating):
            np.testing.assert_allclose(got, r, rtol=tol, atol=tol)
        else:
            np.testing.assert_array_equal(got, r)
