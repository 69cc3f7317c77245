"""ONNX test models for the torch runtime: exports of the tiny zoo and a LoRA rewrite.

``add_lora`` uses ``lora_fx.passes.onnx.insert_lora`` when it exists and otherwise builds the same
public layout by hand (``<site>.lora_A.weight`` ``[in, r]``, ``<site>.lora_B.weight`` ``[r, out]``,
scale folded into B, ``lora_fx.lora`` metadata), so these tests do not wait for the ONNX front end.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests import models

OUTPUTS = {"bert": ["last_hidden_state", "pooler_output"], "minilm": ["last_hidden_state", "pooler_output"],
           "gpt2": ["logits"], "llama": ["logits"]}


def export(name: str, path: Path, *, opset: int = 18, dynamo: bool = True, token_types: bool = False) -> Path:
    """Export zoo model ``name`` with dynamic batch and sequence to ``path``."""
    model = models.build(name)
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False
    kwargs: dict[str, Any] = models.inputs(2, 8)
    if token_types:
        kwargs["token_type_ids"] = torch.zeros_like(kwargs["input_ids"])
    names = list(kwargs)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
            torch.onnx.export(
                model, (), str(path), kwargs=kwargs, dynamo=True, opset_version=opset, input_names=names,
                output_names=OUTPUTS[name], dynamic_shapes={k: {0: batch, 1: seq} for k in names}, verbose=False,
            )
        else:
            torch.onnx.export(
                _Positional(model, names, OUTPUTS[name]), tuple(kwargs[k] for k in names), str(path), dynamo=False, opset_version=opset,
                input_names=names, output_names=OUTPUTS[name],
                dynamic_axes={k: {0: "batch", 1: "seq"} for k in names},
            )
    return path


class _Positional(torch.nn.Module):
    """The TorchScript exporter passes inputs positionally and wants tuple outputs."""

    def __init__(self, model: torch.nn.Module, names: list[str], outputs: list[str]) -> None:
        super().__init__()
        self.model, self.names, self.outputs = model, names, outputs

    def forward(self, *args: torch.Tensor) -> tuple:
        out = self.model(**dict(zip(self.names, args)))
        return tuple(out[k] for k in self.outputs)


def _site_name(node: Any) -> str:
    """The source module of a linear node, from the exporter's namespace metadata."""
    scope = node.metadata_props.get("namespace", "")
    linear = [part.split(":")[0].strip() for part in scope.split("/") if "torch.nn.modules.linear.Linear" in part]
    return linear[-1] if linear else (node.name or "node")


def _add_lora_by_hand(model: Any, r: int, alpha: float, targets: list[str], random_b: bool, seed: int) -> dict:
    import onnx_ir as ir

    gen = torch.Generator().manual_seed(seed)
    graph = model.graph
    meta: dict[str, dict] = {}
    outputs = {id(v) for v in graph.outputs}
    for node in list(graph):
        if node.op_type != "MatMul" or len(node.inputs) != 2:
            continue
        w = node.inputs[1]
        if w is None or not w.is_initializer() or w.const_value is None or len(w.const_value.shape) != 2:
            continue
        site = _site_name(node)
        if not any(site == t or site.endswith("." + t) for t in targets) or site in meta:
            continue
        y = node.outputs[0]
        if id(y) in outputs:
            continue
        n_in, n_out = w.const_value.shape
        bound = 1 / math.sqrt(n_in)  # kaiming-uniform(a=sqrt(5)) on [r, in], as PEFT
        a = (torch.rand(n_in, r, generator=gen) * 2 - 1) * bound
        b = (torch.randn(r, n_out, generator=gen) * 0.1) if random_b else torch.zeros(r, n_out)
        scale = alpha / r
        values = []
        for which, t in (("A", a), ("B", b * scale)):
            name = f"{site}.lora_{which}.weight"
            v = ir.Value(name=name, shape=ir.Shape(list(t.shape)), type=ir.TensorType(ir.DataType.FLOAT),
                         const_value=ir.Tensor(t.numpy().astype(np.float32), name=name))
            graph.register_initializer(v)
            values.append(v)
        xa = ir.node("MatMul", inputs=[node.inputs[0], values[0]], name=f"{site}/lora_A")
        xab = ir.node("MatMul", inputs=[xa.outputs[0], values[1]], name=f"{site}/lora_B")
        add = ir.node("Add", inputs=[y, xab.outputs[0]], name=f"{site}/lora_add")
        graph.insert_after(node, [xa, xab, add])
        y.replace_all_uses_with(add.outputs[0])
        add.replace_input_with(0, y)
        meta[site] = {"r": r, "alpha": alpha, "scale": scale, "in_features": n_in, "out_features": n_out,
                      "a": values[0].name, "b": values[1].name}
    model.metadata_props["lora_fx.lora"] = json.dumps(meta)
    return meta


def add_lora(model: Any, *, r: int = 4, alpha: float = 8.0, targets: list[str] | None = None,
             random_b: bool = False, seed: int = 0) -> Any:
    """Rewrite ``model`` in place with LoRA at linear sites whose name ends in one of ``targets``."""
    targets = targets or ["query", "value", "c_attn", "q_proj", "v_proj", "dense"]
    meta = _add_lora_by_hand(model, r, alpha, targets, random_b, seed)
    if not meta:
        raise AssertionError("no LoRA site found in the test model")
    return model


def ort_run(path: str | Path, feeds: dict[str, Any]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in feeds.items() if k in names})


def save(model: Any, path: Path) -> Path:
    import onnx_ir as ir

    # an external data file of its own: a model loaded from another folder must not point back there
    ir.save(model, str(path), external_data=path.name + ".data")
    return path
