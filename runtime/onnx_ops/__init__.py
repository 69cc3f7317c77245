"""The torch function of every ONNX op lora_fx can execute, registered in ``OPS`` by (domain, op type).

One module per op family: ``elementwise``, ``shapes``, ``indexing``, ``reductions`` (normalizations and
softmax too), ``matmul``, ``conv``, ``quantized``, ``attention``, ``sequences`` and ``control_flow`` (If,
Loop); ``registry`` holds what they share. Importing this package registers them all.
``lora_fx.runtime.onnx_torch`` runs a graph with them.
"""

from __future__ import annotations

from lora_fx.runtime.onnx_ops import (  # noqa: F401  (they register their ops)
    attention, control_flow, conv, elementwise, indexing, matmul, quantized, reductions, sequences, shapes,
)
from lora_fx.runtime.onnx_ops.registry import OPS, Const, Ctx, OpFn, ints, op, scalar, torch_dtype

__all__ = ["OPS", "Const", "Ctx", "OpFn", "ints", "op", "scalar", "torch_dtype"]
