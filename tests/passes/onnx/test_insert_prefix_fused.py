"""ONNX insert_prefix on fused attention ops: the opset-23 ``Attention`` op, ``com.microsoft``
``MultiHeadAttention`` and ``GroupQueryAttention``. Each rewritten file, run in ONNX Runtime, equals an
independent reference holding the same prefixes: the FX-rewritten transformers model (which equals PEFT,
tests/passes/fx) for the corpus exports, a NumPy attention for the hand-built graphs below."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import lora_fx
from lora_fx.errors import UnsupportedError
from lora_fx.passes.onnx.find_sites import find_sites
from lora_fx.passes.onnx.insert_prefix import PREFIX_KEY, InsertPrefix, prefix_metadata
from lora_fx.sites import SiteKind
from tests.models import inputs, run
from tests.passes.onnx.test_insert_prefix import prefix_like_fx

T = 3
TOL = 1e-5


def _attention(model):
    return [s for s in find_sites(model) if s.kind is SiteKind.ATTENTION]


def _session(model, path):
    lora_fx.save(model, path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _rel(ours, ref, keep):
    return np.abs(ours[keep] - ref[keep]).max() / np.abs(ref[keep]).max()


# ---- corpus exports against the FX-rewritten model ------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name, op, shapes", [
    ("bert-dynamo23", "Attention", [(2, 8, 2), (3, 11, 4)]),
    # ORT 1.31's opset-23 RotaryEmbedding kernel rejects batch > 1 with a shared cos/sin cache: batch 1 only.
    ("llama-dynamo23", "Attention", [(1, 8, 0), (1, 5, 0)]),
    ("llama-ortfused", "com.microsoft.MultiHeadAttention", [(2, 8, 2), (3, 11, 4)]),
    # packed QKV weight: unpacked into MatMul + Split + MultiHeadAttention, which takes the prefix
    ("bert-ortfused", "com.microsoft.Attention", [(2, 8, 2), (3, 11, 4)]),
])
def test_fused_prefix_equals_fx_prefix(onnx_corpus, tmp_path, name, op, shapes):
    entry, gm, model, prefixes, result = prefix_like_fx(onnx_corpus, name)
    assert {s.op for s in _attention(lora_fx.load(entry.path))} == {op}
    assert any(c.startswith("positions:") for c in result.changed)
    record = prefix_metadata(model)
    assert record["num_virtual_tokens"] == T and set(record["sites"]) == set(prefixes)
    for site, rec in record["sites"].items():
        assert rec == {"kv_heads": entry.heads[1], "head_dim": entry.heads[2],
                       "key": f"{site}.prefix_key", "value": f"{site}.prefix_value"}
    sess = _session(model, tmp_path / "prefixed.onnx")
    for batch, seq, pad in shapes:
        b = inputs(batch, seq, pad=pad, seed=batch + seq)
        ours = sess.run(None, {i.name: b[i.name].numpy() for i in sess.get_inputs()})[0]
        keep = b["attention_mask"].bool().numpy()
        ref = run(gm, b).numpy()
        assert _rel(ours, ref, keep) <= TOL, (batch, seq, pad)
        assert _rel(ours, run(entry.model, b).numpy(), keep) > 1e-2  # the prefix does change the output


# ---- hand-built graphs (forms no exporter here writes) against a NumPy attention ----------------------
# x [B, S, 64] → q/k/v projections → attention (4 query heads of 16) → o_proj; attention_mask [B, S] pads on the right.

D, N, HD = 64, 4, 16  # GroupQueryAttention with do_rotary wants head_size % 16 == 0
MAX_POS = 64


def _rotary_tables(positions):
    inv = 1.0 / 10000 ** (np.arange(0, HD, 2) / HD)
    freqs = np.asarray(positions, np.float64)[:, None] * inv
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def _rotate(x, positions):
    """Non-interleaved rotary on x [B, S, heads, HD] at ``positions`` [S]."""
    cos, sin = (t[None, :, None, :] for t in _rotary_tables(positions))
    x1, x2 = x[..., : HD // 2], x[..., HD // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _graph(form, *, past=False):
    """A one-block model with attention ``form``; returns (ModelProto, weights)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(11)
    kv = N if form == "mha" else 2
    w = {"q": rng.standard_normal((D, N * HD)) * 0.3, "k": rng.standard_normal((D, kv * HD)) * 0.3,
         "v": rng.standard_normal((D, kv * HD)) * 0.3, "o": rng.standard_normal((N * HD, D)) * 0.3}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    inits = [numpy_helper.from_array(w[p], f"blk.{p}_proj.weight") for p in "qkvo"]
    nodes = [helper.make_node("MatMul", ["x", f"blk.{p}_proj.weight"], [p], name=f"blk.{p}_proj/MatMul") for p in "qkv"]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", D]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])]
    ms = form not in ("attn23", "attn24")
    if form == "attn24":  # opset 24: padding as nonpad_kv_seqlen (valid keys per row), no mask input
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
        nodes += [
            helper.make_node("ReduceSum", ["attention_mask", "axis1"], ["nonpad"], keepdims=0),
            helper.make_node("Attention", ["q", "k", "v", "", "", "", "nonpad"], ["att"], name="blk.attn",
                             q_num_heads=N, kv_num_heads=kv, is_causal=1),
        ]
    elif form == "attn23":
        inits += [numpy_helper.from_array(np.array([1, 2], np.int64), "axes12"),
                  numpy_helper.from_array(np.array(1e9, np.float32), "big"), numpy_helper.from_array(np.array(1.0, np.float32), "one")]
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
            helper.make_node("Sub", ["mf", "one"], ["m0"]),
            helper.make_node("Mul", ["m0", "big"], ["m1"]),
            helper.make_node("Unsqueeze", ["m1", "axes12"], ["mask"]),
            helper.make_node("Attention", ["q", "k", "v", "mask"] + (["past_key", "past_value"] if past else []), ["att"],
                             name="blk.attn", q_num_heads=N, kv_num_heads=kv, is_causal=1),
        ]
        if past:
            inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", kv, "past", HD]) for n in ("past_key", "past_value")]
    elif form == "mha":
        w["bias"] = (rng.standard_normal(3 * N * HD) * 0.5).astype(np.float32)
        inits.append(numpy_helper.from_array(w["bias"], "blk.qkv_bias"))
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["kpm"], to=TensorProto.INT32),
            helper.make_node("MultiHeadAttention", ["q", "k", "v", "blk.qkv_bias", "kpm"], ["att"], name="blk.attn",
                             domain="com.microsoft", num_heads=N, unidirectional=1),
        ]
    else:  # gqa
        cos, sin = _rotary_tables(np.arange(MAX_POS))
        inits += [numpy_helper.from_array(cos, "cos_cache"), numpy_helper.from_array(sin, "sin_cache"),
                  numpy_helper.from_array(np.array([1], np.int64), "axis1"), numpy_helper.from_array(np.array(1, np.int64), "one_i")]
        nodes += [
            helper.make_node("ReduceSum", ["attention_mask", "axis1"], ["lens"], keepdims=0),
            helper.make_node("Sub", ["lens", "one_i"], ["last"]),
            helper.make_node("Cast", ["last"], ["seqlens_k"], to=TensorProto.INT32),
            helper.make_node("Shape", ["x"], ["seq1"], start=1, end=2),
            helper.make_node("Squeeze", ["seq1"], ["seq0"]),
            helper.make_node("Cast", ["seq0"], ["total"], to=TensorProto.INT32),
            helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_key" if past else "", "past_value" if past else "",
                                                     "seqlens_k", "total", "cos_cache", "sin_cache"],
                             ["att", "present_key", "present_value"], name="blk.attn", domain="com.microsoft",
                             num_heads=N, kv_num_heads=kv, do_rotary=1),
        ]
        if past:
            inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", kv, "past", HD]) for n in ("past_key", "past_value")]
    nodes.append(helper.make_node("MatMul", ["att", "blk.o_proj.weight"], ["y"], name="blk.o_proj/MatMul"))
    graph = helper.make_graph(nodes, form, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", D])], inits)
    opsets = [helper.make_opsetid("", 24 if form == "attn24" else 23)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=opsets, ir_version=10))
    return model, w


def _reference(form, w, x, mask, pk, pv):
    """What PEFT's prefix-tuning computes for the block: prefix keys/values (no rotary, no bias) in front of the
    real ones, visible to every query; real tokens causal, padded keys hidden, real positions T..T+n-1."""
    B, S, _ = x.shape
    kv = pk.shape[0]
    q, k, v = x @ w["q"], x @ w["k"], x @ w["v"]
    if form == "mha":
        q, k, v = q + w["bias"][: N * HD], k + w["bias"][N * HD: 2 * N * HD], v + w["bias"][2 * N * HD:]
    q, k, v = q.reshape(B, S, N, HD), k.reshape(B, S, kv, HD), v.reshape(B, S, kv, HD)
    if form == "gqa":
        q, k = _rotate(q, np.arange(T, T + S)), _rotate(k, np.arange(T, T + S))
    k = np.concatenate([np.broadcast_to(pk.transpose(1, 0, 2), (B, T, kv, HD)), k], axis=1)
    v = np.concatenate([np.broadcast_to(pv.transpose(1, 0, 2), (B, T, kv, HD)), v], axis=1)
    k, v = np.repeat(k, N // kv, axis=2), np.repeat(v, N // kv, axis=2)  # head h reads kv head h // (N / kv)
    scores = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(HD)
    i, j = np.arange(S)[:, None], np.arange(T + S)[None, :]
    real = np.concatenate([np.ones((B, T), bool), mask.astype(bool)], axis=1)
    # attn24's is_causal is aligned to each row's valid keys (ONNX: offset nonpad_kv_seqlen - S), the others' to S.
    offset = mask.sum(1) - S if form == "attn24" else np.zeros(B, np.int64)
    visible = (j[None] <= i[None] + T + offset[:, None, None]) & real[:, None, :]
    scores = np.where(visible[:, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    att = np.einsum("bhqk,bkhd->bqhd", p, v.astype(np.float64)).reshape(B, S, N * HD)
    return att @ w["o"]


@pytest.mark.parametrize("form, op", [("attn23", "Attention"), ("attn24", "Attention"), ("mha", "com.microsoft.MultiHeadAttention"),
                                      ("gqa", "com.microsoft.GroupQueryAttention")])
def test_hand_built_fused_forms_equal_numpy_reference(tmp_path, form, op):
    import onnx_ir as ir

    from lora_fx.passes.onnx.expose_prefixes import expose_prefixes

    proto, w = _graph(form)
    model = ir.from_proto(proto)
    (site,) = _attention(model)
    kv = N if form == "mha" else 2
    assert site.op == op and (site.num_heads, site.kv_heads, site.head_dim) == (N, kv, HD)
    rng = np.random.default_rng(5)
    pk, pv = (rng.standard_normal((kv, T, HD)).astype(np.float32) for _ in range(2))
    import torch

    InsertPrefix(lora_fx.PrefixConfig(num_virtual_tokens=T), [site], {site.name: (torch.from_numpy(pk), torch.from_numpy(pv))})(model)
    rec = prefix_metadata(model)["sites"][site.name]
    assert rec == {"kv_heads": kv, "head_dim": HD, "key": f"{site.name}.prefix_key", "value": f"{site.name}.prefix_value"}
    # Deployment: the prefixes become swappable inputs whose defaults are the inserted ones.
    assert sorted(expose_prefixes(model).changed) == [rec["key"], rec["value"]]
    sess = _session(model, tmp_path / f"{form}.onnx")
    assert {i.name for i in sess.get_overridable_initializers()} == {rec["key"], rec["value"]}
    shapes = [(2, 7, 3), (3, 5, 0), (1, 1, 0)]
    if form == "gqa":
        # The prefix is GroupQueryAttention's past; ORT 1.31's CPU kernel takes a past with a multi-token query for
        # batch 1 only ("batch_size must be 1 when sequence_length > 1 and past context is given").
        shapes = [(1, 7, 0), (1, 5, 0), (3, 1, 0)]
    if form == "attn24":
        (nonpad,) = [n for n in model.graph if n.op_type == "Add" and n.name.endswith("nonpad_kv_seqlen")]
        assert nonpad.outputs[0] is site_node(model).inputs[6] and site_node(model).attributes.get_int("is_causal") == 1
    for batch, seq, pad in shapes:
        x = rng.standard_normal((batch, seq, D)).astype(np.float32)
        mask = np.ones((batch, seq), np.int64)
        mask[-1, seq - pad:] = 0
        keep = mask.astype(bool)
        ours = sess.run(None, {"x": x, "attention_mask": mask})[0]
        assert _rel(ours, _reference(form, w, x, mask, pk, pv), keep) <= TOL, (batch, seq, pad)
        qk, qv = (rng.standard_normal((kv, T, HD)).astype(np.float32) for _ in range(2))
        swapped = sess.run(None, {"x": x, "attention_mask": mask, rec["key"]: qk, rec["value"]: qv})[0]
        assert _rel(swapped, _reference(form, w, x, mask, qk, qv), keep) <= TOL, (batch, seq, pad)


def site_node(model):
    (node,) = [n for n in model.graph if n.name == "blk.attn"]
    return node


@pytest.mark.parametrize("attr", ["left_window_size", "right_window_size"])
def test_sliding_window_attention_is_refused_naming_the_site(attr):
    import onnx_ir as ir

    model = ir.from_proto(_graph("attn24")[0])
    model.opset_imports[""] = 25
    site_node(model).attributes[attr] = ir.AttrInt64(attr, 4)
    before = len(list(model.graph))
    with pytest.raises(UnsupportedError, match=rf"blk\.attn.*sliding window \({attr}\)"):
        lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=2))
    assert len(list(model.graph)) == before and PREFIX_KEY not in model.metadata_props


@pytest.mark.parametrize("form", ["attn23", "gqa"])
def test_kv_cache_sites_are_refused_naming_the_site(form):
    import onnx_ir as ir

    model = ir.from_proto(_graph(form, past=True)[0])
    before = len(list(model.graph))
    with pytest.raises(UnsupportedError, match=r"attention site blk(\.attn)? \(.*cannot take a prefix: it reads or writes a KV cache.*use_cache=False"):
        lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=2))
    assert len(list(model.graph)) == before and PREFIX_KEY not in model.metadata_props
