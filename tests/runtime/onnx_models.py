"""ONNX test models for the torch runtime: exports of the tiny zoo (``tests.onnx_corpus`` builds on
``export``), a LoRA rewrite through ``lora_fx.apply``, a small Gemm classifier, and ORT runs."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import TensorProto, helper

from tests import models

OUTPUTS = {"bert": ["last_hidden_state", "pooler_output"], "minilm": ["last_hidden_state", "pooler_output"],
           "gpt2": ["logits"], "llama": ["logits"]}


def export(name: str, path: Path, *, opset: int = 18, dynamo: bool = True, token_types: bool = False) -> Path:
    """Export zoo model ``name`` with dynamic batch and sequence to ``path``."""
    model = models.build(name)
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False
    if opset < 14 and not dynamo:
        # TorchScript writes scaled_dot_product_attention from opset 14 on: older opsets get eager attention
        # (scores scaled after the MatMul, the mask added after the scale).
        model.set_attn_implementation("eager")
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


def add_lora(model: Any, *, r: int = 4, alpha: float = 8.0, targets: list[str] | None = None,
             random_b: bool = False, seed: int = 0) -> Any:
    """``lora_fx.apply`` with LoRA at ``targets`` (default all-linear); ``random_b`` makes the output change."""
    import lora_fx

    torch.manual_seed(seed)
    config = lora_fx.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or "all-linear",
                                init_lora_weights=False if random_b else True)
    return lora_fx.apply(model, config)


def mlp(hidden: int = 16, lora: bool = True, extra_node: onnx.NodeProto | None = None) -> ir.Model:
    """Gemm + Relu + Gemm classifier with LoRA on the first layer (zero B, as a fresh adapter)."""
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.5  # noqa: E731
    inits = {"w1": f(hidden, 8), "b1": f(hidden), "w2": f(3, hidden), "b2": f(3)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1)]
    last = "h"
    if lora:
        inits["fc1.lora_A.weight"] = f(8, 2)
        inits["fc1.lora_B.weight"] = np.zeros((2, hidden), np.float32)
        nodes += [helper.make_node("MatMul", ["x", "fc1.lora_A.weight"], ["xa"]),
                  helper.make_node("MatMul", ["xa", "fc1.lora_B.weight"], ["xab"]),
                  helper.make_node("Add", ["h", "xab"], ["h2"])]
        last = "h2"
    nodes += [helper.make_node("Relu", [last], ["r"]), helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], transB=1)]
    if extra_node is not None:
        nodes.append(extra_node)
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])]
    if extra_node is not None:
        outputs.append(helper.make_empty_tensor_value_info(extra_node.output[0]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])], outputs,
                              initializer=[onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))


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
