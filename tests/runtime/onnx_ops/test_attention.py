"""Attention ops (lora_fx.runtime.onnx_ops.attention) against ONNX Runtime: the opset-23/24 Attention
op (masks, causal, past keys, 3-D inputs, nonpad_kv_seqlen), the com.microsoft attention ops and
rotary embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import helper

from lora_fx.errors import UnsupportedError
from lora_fx.runtime.onnx_torch import OnnxModule
from tests.runtime.onnx_ops.single_op import check_against_ort, ms_node, randn, rng, single_op_model


def _attention_case(is_causal: int, mask: str, past: bool, three_d: bool, nonpad: bool = False) -> tuple:
    b, hq, hkv, s, p, d = 2, 4, 2, 5, 3, 8
    q = rng.standard_normal((b, hq, s, d)).astype(np.float32)
    k = rng.standard_normal((b, hkv, s, d)).astype(np.float32)
    v = rng.standard_normal((b, hkv, s, d)).astype(np.float32)
    total = s + (p if past else 0)
    inputs = {"q": q, "k": k, "v": v}
    names = ["q", "k", "v"]
    attrs: dict = {"is_causal": is_causal}
    if three_d:
        inputs = {"q": q.transpose(0, 2, 1, 3).reshape(b, s, hq * d), "k": k.transpose(0, 2, 1, 3).reshape(b, s, hkv * d),
                  "v": v.transpose(0, 2, 1, 3).reshape(b, s, hkv * d)}
        attrs.update(q_num_heads=hq, kv_num_heads=hkv)
    if mask == "bool":
        m = rng.random((b, 1, s, total)) > 0.3
        m[..., 0] = True
        inputs["m"] = m
        names.append("m")
    elif mask == "float":
        inputs["m"] = rng.standard_normal((s, total)).astype(np.float32)
        names.append("m")
    else:
        names.append("")
    if past:
        inputs["pk"] = rng.standard_normal((b, hkv, p, d)).astype(np.float32)
        inputs["pv"] = rng.standard_normal((b, hkv, p, d)).astype(np.float32)
        names += ["pk", "pv"]
    if nonpad:  # opset 24: the second row's last two keys are padding
        inputs["nonpad"] = np.array([total, total - 2], np.int64)
        names += [""] * (6 - len(names)) + ["nonpad"]
    while names[-1] == "":
        names.pop()
    outs = ["y", "pk_out", "pv_out"] if past else ["y"]
    return helper.make_node("Attention", names, outs, **attrs), inputs


@pytest.mark.parametrize("is_causal,mask,past,three_d", [
    (0, "none", False, False), (1, "none", False, False), (0, "bool", False, False), (1, "float", True, False),
    (0, "float", False, True), (1, "bool", True, True),
])
def test_opset23_attention_matches_onnxruntime(is_causal, mask, past, three_d, tmp_path: Path) -> None:
    node, inputs = _attention_case(is_causal, mask, past, three_d)
    model = single_op_model(node, inputs, opset=23)
    check_against_ort(model, inputs, tmp_path, tol=1e-5)


@pytest.mark.parametrize("is_causal,mask,three_d", [(0, "none", False), (1, "none", False), (1, "bool", True),
                                                    (1, "float", False), (0, "bool", True)])
def test_opset24_attention_with_nonpad_kv_seqlen_matches_onnxruntime(is_causal, mask, three_d, tmp_path: Path) -> None:
    """Padded keys hidden per row; causal rows aligned bottom-right to each row's valid keys (offset nonpad - S)."""
    node, inputs = _attention_case(is_causal, mask, False, three_d, nonpad=True)
    assert len(node.input) == 7
    check_against_ort(single_op_model(node, inputs, opset=24), inputs, tmp_path, tol=1e-5)


@pytest.mark.parametrize("attr", ["left_window_size", "right_window_size"])
def test_opset25_attention_windows_are_refused(attr: str) -> None:
    node, inputs = _attention_case(1, "none", False, False)
    node.attribute.append(helper.make_attribute(attr, 2))
    with pytest.raises(UnsupportedError, match="sliding windows"):
        OnnxModule(single_op_model(node, inputs, opset=25), trainable=[])(**{k: torch.from_numpy(v) for k, v in inputs.items()})


MS_CASES = {
    "multi-head-attention-mask": (ms_node("MultiHeadAttention", ["q", "k", "v", "", "m"], ["y"], num_heads=2),
                                  {"q": randn(2, 4, 8), "k": randn(2, 5, 8), "v": randn(2, 5, 8),
                                   "m": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)}),
    "attention-packed-qkv": (ms_node("Attention", ["x", "w", "b", "m"], ["y"], num_heads=2),
                             {"x": randn(2, 4, 8), "w": randn(8, 24), "b": randn(24), "m": np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32)}),
    # prompt mode, right padding (seqlens_k = valid length - 1), 4 query heads over 2 kv heads
    "group-query-attention-prompt": (ms_node("GroupQueryAttention", ["q", "k", "v", "", "", "sl", "tl"], ["y"], num_heads=4, kv_num_heads=2),
                                     {"q": randn(2, 5, 32), "k": randn(2, 5, 16), "v": randn(2, 5, 16),
                                      "sl": np.array([4, 2], np.int32), "tl": np.array(5, np.int32)}),
    "rotary-embedding-ms": (ms_node("RotaryEmbedding", ["x", "p", "c", "s"], ["y"]),
                            {"x": randn(2, 3, 16), "p": np.array([[0, 1, 2], [2, 3, 4]], np.int64),
                             "c": np.cos(randn(8, 4)), "s": np.sin(randn(8, 4))}),
}


@pytest.mark.parametrize("case", list(MS_CASES))
def test_contrib_op_matches_onnxruntime(case: str, tmp_path: Path) -> None:
    node, inputs = MS_CASES[case]
    check_against_ort(single_op_model(node, inputs), inputs, tmp_path, tol=1e-5)


# com.microsoft 1-D mask indices (ContribOperators.md): [B] end positions (key lengths, right padding);
# Attention's mask_index also [2*B], end then start positions (left padding). Ends past the keys mask nothing.
MASK_INDEX_CASES = {
    "attention-key-lengths": ("Attention", np.array([3, 5], np.int32)),
    "attention-end-past-the-keys": ("Attention", np.array([7, 1], np.int32)),
    "attention-ends-then-starts": ("Attention", np.array([5, 4, 2, 0], np.int32)),
    "multi-head-attention-key-lengths": ("MultiHeadAttention", np.array([2, 5], np.int32)),
}


def _mask_index_case(op_type: str, index: np.ndarray) -> tuple:
    if op_type == "Attention":
        return (ms_node("Attention", ["x", "w", "b", "m"], ["y"], num_heads=2),
                {"x": randn(2, 5, 8), "w": randn(8, 24), "b": randn(24), "m": index})
    return (ms_node("MultiHeadAttention", ["q", "k", "v", "", "m"], ["y"], num_heads=2),
            {"q": randn(2, 4, 8), "k": randn(2, 5, 8), "v": randn(2, 5, 8), "m": index})


@pytest.mark.parametrize("case", list(MASK_INDEX_CASES))
def test_contrib_attention_mask_index_matches_onnxruntime(case: str, tmp_path: Path) -> None:
    node, inputs = _mask_index_case(*MASK_INDEX_CASES[case])
    check_against_ort(single_op_model(node, inputs), inputs, tmp_path, tol=1e-5)


@pytest.mark.parametrize("op_type,index,form", [
    ("Attention", np.array([3, 5, 0, 0, 0, 3, 5, 0], np.int32), r"length 8 for a batch of 2 \(likely the \[3\*batch\+2\] form"),
    ("MultiHeadAttention", np.array([5, 4, 2, 0], np.int32), r"length 4 for a batch of 2 is not supported; lora_fx runs the 1-D forms \[batch\] \(key lengths\), and"),
    ("Attention", np.ones((2, 1, 5, 5), np.int32), r"4-D mask of shape \[2, 1, 5, 5\]"),
])
def test_contrib_attention_masks_it_cannot_run_are_refused_naming_the_form(op_type: str, index: np.ndarray, form: str) -> None:
    node, inputs = _mask_index_case(op_type, index)
    with pytest.raises(UnsupportedError, match=rf"com\.microsoft\.{op_type}: .*{form}.*use_raw_attention_mask"):
        OnnxModule(single_op_model(node, inputs), trainable=[])(**{k: torch.from_numpy(v) for k, v in inputs.items()})
