"""The ONNX translation of lora_fx's quantized linear ops, for ``torch.onnx.export(dynamo=True)``:
``custom_translation_table`` entries that write MatMulBnb4 (nf4), MatMulNBits (int4) and
DequantizeLinear + MatMul (int8) with the packed bytes unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from lora_fx.kernels.quantized_linear import linear_int4, linear_int8, linear_nf4


def _register_contrib_schemas() -> None:
    """onnx ships no schemas for ONNX Runtime's contrib ops; the exporter's tracer needs one to build a node."""
    import onnx
    from onnx.defs import OpSchema

    def param(name: str, type_str: str, optional: bool = False) -> Any:
        option = OpSchema.FormalParameterOption.Optional if optional else OpSchema.FormalParameterOption.Single
        return OpSchema.FormalParameter(name, type_str, "", param_option=option)

    def attr(name: str, kind: Any, required: bool) -> Any:
        # OpSchema.Attribute(name, type, description) defaults to required=True: say it every time.
        return OpSchema.Attribute(name, kind, "", required=required)

    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    ints = OpSchema.AttrType.INT
    specs = {
        "MatMulBnb4": ([param("A", "T1"), param("B", "T2"), param("absmax", "T1")],
                       [attr("K", ints, True), attr("N", ints, True), attr("block_size", ints, True), attr("quant_type", ints, True)]),
        "MatMulNBits": ([param("A", "T1"), param("B", "T2"), param("scales", "T1"), param("zero_points", "T2", True)],
                        [attr("K", ints, True), attr("N", ints, True), attr("bits", ints, False), attr("block_size", ints, True),
                         attr("accuracy_level", ints, False)]),
    }
    for name, (inputs, attributes) in specs.items():
        if onnx.defs.has(name, "com.microsoft"):
            continue
        schema = OpSchema(name, "com.microsoft", 1, inputs=inputs, outputs=[param("Y", "T1")],
                          type_constraints=[("T1", floats, ""), ("T2", ["tensor(uint8)"], "")], attributes=attributes)
        onnx.defs.register_schema(schema)


def _onnx_functions() -> dict[Any, Callable]:
    """Translations of the quantized linear ops for ``torch.onnx.export(dynamo=True)``.

    W stays packed in the file, as ONNX Runtime's own block-quantized matmuls, which
    ``passes/onnx/find_sites`` recognises as linear sites:

    * nf4 -> ``com.microsoft.MatMulBnb4`` (quant_type 1): the same flattened ``[N, K]`` layout, high
      nibble first, one absmax per block; double-quantized absmaxes are decoded in the graph first.
    * int4 -> ``com.microsoft.MatMulNBits`` (bits 4): blocks along K, each row padded to whole blocks,
      low nibble first, zero point 8 unless affine; ``accuracy_level=0`` so ONNX Runtime computes in
      float, as training did (level 4 would quantize the activations to int8).
    * int8 -> ``DequantizeLinear`` (per output channel, axis 0) -> ``Transpose`` -> ``MatMul``, the
      form ``passes/onnx/quantize_weights`` writes. Not ``MatMulNBits(bits=8)``: ONNX Runtime 1.31's
      CPU kernel decodes W on every call, 2-4x slower (four 384x1536 layers: 8.05 vs 2.41 ms for 1
      row, 19.3 vs 13.5 ms for 128). Under default session options ONNX Runtime fuses this form into
      ``MatMulNBits(accuracy_level=4)`` (int8 activations, ~0.4% off); ``lora_fx.runtime.ort.Session``
      sets ``session.qdq_matmulnbits_accuracy_level=0``, and plain ONNX Runtime users set the same.

    Export with ``optimize=False``: the exporter's optimizer would fold the int8 dequantize back
    into a float constant.
    """
    import onnxscript
    from onnxscript import opset20 as op

    _register_contrib_schemas()
    ms_opset = onnxscript.values.Opset("com.microsoft", 1)
    matmul_bnb4 = onnxscript.values.Op(ms_opset, "MatMulBnb4")
    matmul_nbits = onnxscript.values.Op(ms_opset, "MatMulNBits")

    def _bias(y, bias):
        return y if bias is None else op.Add(y, bias)

    def _nf4(x, qweight, qscale, qscale_factor, qscale_mean, bias, out_features, in_features, block_size, scaler_block_size):
        n_blocks = -(-out_features * in_features // block_size)
        if qscale_factor is None:
            absmax = op.CastLike(qscale, x)
        else:
            groups = -(-n_blocks // scaler_block_size)
            factor = op.Expand(op.Unsqueeze(qscale_factor, op.Constant(value_ints=[1])),
                               op.Constant(value_ints=[groups, scaler_block_size]))
            factor = op.Slice(op.Reshape(factor, op.Constant(value_ints=[-1])), op.Constant(value_ints=[0]),
                              op.Constant(value_ints=[n_blocks]))
            absmax = op.Add(op.Div(op.Cast(qscale, to=1), factor), qscale_mean)  # to=1: FLOAT
            absmax = op.CastLike(absmax, x)
        packed = qweight
        if n_blocks * block_size != out_features * in_features:  # drop the padding bytes of the last block
            packed = op.Slice(qweight, op.Constant(value_ints=[0]), op.Constant(value_ints=[(out_features * in_features + 1) // 2]))
        y = matmul_bnb4(x, packed, absmax, K=in_features, N=out_features, block_size=block_size, quant_type=1)
        return _bias(y, bias)

    def _int4(x, qweight, qscale, qzero, bias, out_features, in_features, block_size):
        # lora_fx's int4 storage is MatMulNBits' own (blocks along rows, each row padded to whole blocks,
        # zero points packed per row): only the shape of B changes.
        per_row = -(-in_features // block_size)
        b = op.Reshape(qweight, op.Constant(value_ints=[out_features, per_row, block_size // 2]))
        scales = op.CastLike(qscale, x)
        if qzero is None:
            y = matmul_nbits(x, b, scales, K=in_features, N=out_features, bits=4, block_size=block_size, accuracy_level=0)
        else:
            y = matmul_nbits(x, b, scales, qzero, K=in_features, N=out_features, bits=4, block_size=block_size,
                             accuracy_level=0)
        return _bias(y, bias)

    def _int8(x, qweight, qscale, bias, out_features, in_features):
        w = op.DequantizeLinear(qweight, qscale, axis=0)
        return _bias(op.MatMul(x, op.Transpose(op.CastLike(w, x), perm=[1, 0])), bias)

    return {linear_nf4._opoverload: _nf4, linear_int4._opoverload: _int4, linear_int8._opoverload: _int8}


def onnx_translation_table() -> dict[Any, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)`` / ``lora_fx.export_onnx``."""
    return _onnx_functions()
