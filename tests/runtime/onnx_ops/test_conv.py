"""Convolutions (lora_fx.runtime.onnx_ops.conv) against ONNX Runtime: Conv and ConvTranspose in 1-D, 2-D and
3-D with every padding mode (explicit uneven pads, SAME_UPPER, SAME_LOWER, VALID), strides, dilations, groups,
with and without bias; gradients reach input, weight and bias."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from onnx import helper

from lora_fx.runtime.onnx_torch import OnnxModule
from tests.runtime.onnx_ops.single_op import check_against_ort, randn, single_op_model


def _conv(inputs: tuple[str, ...] = ("x", "w", "b"), **attrs):
    return helper.make_node("Conv", list(inputs), ["y"], **attrs)


def _conv_t(inputs: tuple[str, ...] = ("x", "w", "b"), **attrs):
    return helper.make_node("ConvTranspose", list(inputs), ["y"], **attrs)


# (node, inputs, initializers): the weight is an initializer, as exporters write it
CONV_CASES = {
    "2d-vit-patch-embedding": (_conv(kernel_shape=[8, 8], strides=[8, 8]), {"x": randn(2, 3, 32, 32)},
                               {"w": randn(16, 3, 8, 8), "b": randn(16)}),
    "2d-pads-uneven-stride-dilation": (_conv(pads=[1, 0, 2, 3], strides=[2, 1], dilations=[1, 2]),
                                       {"x": randn(2, 4, 9, 10)}, {"w": randn(6, 4, 3, 3), "b": randn(6)}),
    "2d-same-upper-stride": (_conv(auto_pad="SAME_UPPER", strides=[2, 3]), {"x": randn(1, 3, 9, 10)},
                             {"w": randn(4, 3, 4, 3), "b": randn(4)}),
    # ONNX Runtime refuses dilations with SAME_*: these cases have none
    "2d-same-lower-stride": (_conv(auto_pad="SAME_LOWER", strides=[2, 2]), {"x": randn(1, 3, 8, 7)},
                               {"w": randn(4, 3, 2, 4), "b": randn(4)}),
    "2d-valid-no-bias": (_conv(("x", "w"), auto_pad="VALID", strides=[2, 2]), {"x": randn(2, 3, 9, 9)},
                         {"w": randn(5, 3, 3, 3)}),
    "2d-groups-depthwise": (_conv(group=4, pads=[1, 1, 1, 1]), {"x": randn(2, 4, 6, 6)},
                            {"w": randn(8, 1, 3, 3), "b": randn(8)}),
    "1d-audio-stride-pads": (_conv(pads=[3, 2], strides=[2], group=2), {"x": randn(2, 4, 20)},
                             {"w": randn(6, 2, 5), "b": randn(6)}),
    "1d-same-upper-even-kernel": (_conv(auto_pad="SAME_UPPER"), {"x": randn(1, 2, 11)}, {"w": randn(3, 2, 4), "b": randn(3)}),
    "1d-dilation-kernel-shape": (_conv(kernel_shape=[3], dilations=[3], pads=[2, 4]), {"x": randn(1, 2, 11)},
                                 {"w": randn(3, 2, 3), "b": randn(3)}),
    "3d-pads-strides": (_conv(pads=[1, 0, 1, 0, 1, 1], strides=[1, 2, 2]), {"x": randn(1, 2, 4, 6, 5)},
                        {"w": randn(3, 2, 2, 3, 3), "b": randn(3)}),
    "3d-same-lower-no-bias": (_conv(("x", "w"), auto_pad="SAME_LOWER", strides=[2, 1, 2]), {"x": randn(1, 2, 5, 4, 6)},
                              {"w": randn(2, 2, 2, 2, 3)}),
}

CONV_T_CASES = {
    "2d-stride-pads-output-padding": (_conv_t(strides=[2, 3], pads=[1, 0, 0, 2], output_padding=[1, 2]),
                                      {"x": randn(1, 4, 5, 4)}, {"w": randn(4, 3, 3, 3), "b": randn(3)}),
    "2d-symmetric-dilation-groups": (_conv_t(strides=[2, 2], pads=[1, 1, 1, 1], dilations=[2, 1], group=2),
                                     {"x": randn(2, 4, 4, 5)}, {"w": randn(4, 3, 3, 2), "b": randn(6)}),
    "2d-output-shape": (_conv_t(("x", "w"), strides=[2, 2], output_shape=[10, 9]), {"x": randn(1, 2, 4, 4)},
                        {"w": randn(2, 3, 3, 3)}),
    "2d-same-upper": (_conv_t(auto_pad="SAME_UPPER", strides=[2, 2]), {"x": randn(1, 2, 3, 4)},
                      {"w": randn(2, 2, 3, 2), "b": randn(2)}),
    "1d-upsampler": (_conv_t(strides=[4], pads=[2, 2]), {"x": randn(2, 3, 7)}, {"w": randn(3, 2, 8), "b": randn(2)}),
    "3d-valid": (_conv_t(("x", "w"), auto_pad="VALID", strides=[1, 2, 1]), {"x": randn(1, 2, 3, 3, 2)},
                 {"w": randn(2, 2, 2, 2, 2)}),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_matches_onnxruntime(case: str, tmp_path: Path) -> None:
    node, inputs, inits = CONV_CASES[case]
    check_against_ort(single_op_model(node, inputs, inits=inits), inputs, tmp_path, tol=1e-5)


@pytest.mark.parametrize("case", list(CONV_T_CASES))
def test_conv_transpose_matches_onnxruntime(case: str, tmp_path: Path) -> None:
    node, inputs, inits = CONV_T_CASES[case]
    check_against_ort(single_op_model(node, inputs, inits=inits), inputs, tmp_path, tol=1e-5)


def test_conv_gradients_equal_torch_conv() -> None:
    """An uneven-padded Conv trains: its gradients for input, weight and bias are those of the same
    convolution written in torch (pad, then conv2d)."""
    node, inputs, inits = CONV_CASES["2d-pads-uneven-stride-dilation"]
    module = OnnxModule(single_op_model(node, inputs, inits=inits), trainable=["w", "b"])
    x = torch.from_numpy(inputs["x"]).requires_grad_()
    (module(x=x)["y"] ** 2).sum().backward()
    x_ref = torch.from_numpy(inputs["x"]).requires_grad_()
    w, b = (torch.from_numpy(inits[k]).requires_grad_() for k in ("w", "b"))
    padded = torch.nn.functional.pad(x_ref, [0, 3, 1, 2])  # ONNX pads [top, left, bottom, right]
    (torch.nn.functional.conv2d(padded, w, b, stride=(2, 1), dilation=(1, 2)) ** 2).sum().backward()
    for got, want in ((x.grad, x_ref.grad), (module.tensor("w").grad, w.grad), (module.tensor("b").grad, b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_conv_refuses_a_kernel_shape_its_weight_contradicts(tmp_path: Path) -> None:
    from lora_fx.errors import UnsupportedError

    model = single_op_model(_conv(kernel_shape=[2, 2]), {"x": randn(1, 3, 6, 6)}, inits={"w": randn(4, 3, 3, 3), "b": randn(4)})
    with pytest.raises(UnsupportedError, match=r"kernel_shape=\[2, 2\].*\[3, 3\]"):
        OnnxModule(model, trainable=[])(x=torch.from_numpy(randn(1, 3, 6, 6)))


@pytest.mark.parametrize("auto_pad,dilations,strides,kernel,size", [
    ("SAME_UPPER", [2, 1], [1, 2], [3, 2], (9, 8)), ("SAME_LOWER", [3, 2], [2, 1], [2, 3], (8, 7)),
])
def test_conv_same_padding_with_dilation_matches_the_onnx_reference(auto_pad, dilations, strides, kernel, size) -> None:
    """ONNX Runtime refuses dilations with SAME_* padding; the ONNX reference evaluator defines them."""
    import onnx_ir as ir
    from onnx.reference import ReferenceEvaluator

    inputs, inits = {"x": randn(1, 2, *size)}, {"w": randn(3, 2, *kernel), "b": randn(3)}
    model = single_op_model(_conv(auto_pad=auto_pad, dilations=dilations, strides=strides), inputs, inits=inits)
    want = ReferenceEvaluator(ir.to_proto(model)).run(None, inputs)[0]
    got = OnnxModule(model, trainable=[])(x=torch.from_numpy(inputs["x"]))["y"].numpy()
    assert got.shape == want.shape
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-5, atol=1e-5)
