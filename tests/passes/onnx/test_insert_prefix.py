"""ONNX insert_prefix: an ONNX file rewritten with given prefixes computes, in ONNX Runtime, what the
FX-rewritten model with the same prefixes computes (which equals PEFT: tests/passes/fx)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

import lora_fx
from lora_fx.errors import AdapterError, TargetNotFoundError
from lora_fx.passes.onnx.find_sites import find_sites
from lora_fx.passes.onnx.insert_prefix import InsertPrefix, prefix_metadata
from lora_fx.prefix_adapters import current_prefixes
from lora_fx.sites import SiteKind
from tests.models import build, inputs, run

T = 3


def _attention(model):
    return [s for s in find_sites(model) if s.kind is SiteKind.ATTENTION]


def _session(model, tmp_path):
    path = tmp_path / "prefixed.onnx"
    lora_fx.save(model, path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def prefix_like_fx(onnx_corpus, name):
    """The corpus file ``name`` and the FX-captured transformers model it was exported from, both prefix-rewritten
    with the same prefixes: (entry, graph module, ONNX model, prefixes by site, the ONNX PassResult)."""
    entry = onnx_corpus.get(name)
    arch = name.split("-")[0]
    gm = lora_fx.apply(lora_fx.capture(build(arch), kwargs=inputs(2, 8)), lora_fx.PrefixConfig(num_virtual_tokens=T))
    model = lora_fx.load(entry.path)
    sites = _attention(model)
    # TorchScript exports name modules with their wrapper's prefix ("model.").
    prefixes = {f"{entry.prefix}{site}": p for site, p in current_prefixes(gm).items()}
    assert sorted(s.name for s in sites) == sorted(prefixes)
    result = InsertPrefix(lora_fx.PrefixConfig(num_virtual_tokens=T), sites, prefixes)(model)
    return entry, gm, model, prefixes, result


@pytest.mark.parametrize("name", ["bert-dynamo18", "gpt2-dynamo18", "llama-dynamo18",
                                  "bert-torchscript", "gpt2-torchscript", "llama-torchscript",
                                  # opset 12: the inserted nodes spelled in its ops; eager attention adds the mask after
                                  # the scale, so the search back from the Softmax meets the mask's nodes too
                                  "llama-torchscript12"])
def test_onnx_prefix_equals_fx_prefix(onnx_corpus, tmp_path, name):
    entry, gm, model, prefixes, result = prefix_like_fx(onnx_corpus, name)
    assert result.modified and any(c.startswith("positions:") for c in result.changed)
    record = prefix_metadata(model)
    assert record["num_virtual_tokens"] == T and set(record["sites"]) == set(prefixes)
    for site, rec in record["sites"].items():
        init = model.graph.initializers[rec["key"]]
        assert rec["key"] == f"{site}.prefix_key" and tuple(init.shape) == tuple(prefixes[site][0].shape)
    sess = _session(model, tmp_path)
    for batch, seq, pad in [(2, 8, 2), (3, 11, 4), (1, 5, 0)]:
        b = inputs(batch, seq, pad=pad, seed=batch)
        feeds = {i.name: b[i.name].numpy() for i in sess.get_inputs()}
        ours = sess.run(None, feeds)[0]
        ref = run(gm, b).numpy()
        keep = b["attention_mask"].bool().numpy()
        assert np.abs(ours[keep] - ref[keep]).max() / np.abs(ref).max() <= 1e-5, (batch, seq, pad)
        plain = run(entry.model, b).numpy()
        assert np.abs(ours[keep] - plain[keep]).max() / np.abs(plain).max() > 1e-2


def test_apply_marks_the_model_and_fold_refuses_it(onnx_corpus):
    from lora_fx.passes.onnx.fold_lora import fold_lora

    model = lora_fx.load(onnx_corpus.get("bert-dynamo18").path)
    lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=4))
    assert json.loads(model.metadata_props["lora_fx.prefix_config"])["num_virtual_tokens"] == 4
    with pytest.raises(AdapterError, match="already has prefixes"):
        lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=4))
    with pytest.raises(Exception, match="prefix"):
        fold_lora(model)


def test_model_without_attention_is_refused(onnx_corpus):
    model = lora_fx.load(onnx_corpus.get("gemm-mlp").path)
    with pytest.raises(TargetNotFoundError, match="no attention site"):
        lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=2))


def test_cli_rewrite_with_prefix(onnx_corpus, tmp_path, capsys):
    from lora_fx.cli import main

    out = tmp_path / "p.onnx"
    entry = onnx_corpus.get("gpt2-dynamo18")
    assert main(["rewrite", str(entry.path), "-o", str(out), "--method", "prefix", "--num-virtual-tokens", "6", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "prefix" and set(summary["sites"]) == {"transformer.h.0.attn", "transformer.h.1.attn"}
    model = lora_fx.load(out)
    assert tuple(model.graph.initializers["transformer.h.1.attn.prefix_value"].shape) == (4, 6, 8)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    b = inputs(2, 7, pad=1)
    logits = sess.run(None, {i.name: b[i.name].numpy() for i in sess.get_inputs()})[0]
    assert logits.shape == (2, 7, 96) and np.isfinite(logits).all()
    assert main(["rewrite", str(entry.path), "-o", str(tmp_path / "q.onnx"), "--method", "prefix", "--num-virtual-tokens", "0"]) != 0
    assert "num_virtual_tokens must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists()


def test_exported_prefixes_are_swappable_inputs(tmp_path):
    """A prefix-tuned torch graph exported to ONNX: its prefixes become ORT adapter slots (inputs with defaults)."""
    import torch

    from lora_fx.export import to_onnx_ir
    from lora_fx.passes.fx.capture import meta
    from lora_fx.passes.onnx.expose_prefixes import expose_prefixes

    gm = lora_fx.apply(lora_fx.capture(build("llama"), kwargs=inputs(2, 8)), lora_fx.PrefixConfig(num_virtual_tokens=T))
    model = to_onnx_ir(gm, inputs(2, 8))
    result = expose_prefixes(model)
    assert sorted(result.changed) == sorted(f"model.layers.{i}.self_attn.prefix_{w}" for i in (0, 1) for w in ("key", "value"))
    assert prefix_metadata(model)["sites"]["model.layers.0.self_attn"]["kv_heads"] == 2
    sess = _session(model, tmp_path)
    b = inputs(3, 9, pad=3, seed=4)
    keep = b["attention_mask"].bool().numpy()
    feeds = {"input_ids": b["input_ids"].numpy(), "attention_mask": b["attention_mask"].numpy()}
    default = sess.run(None, feeds)[0]
    ref = run(gm, b).numpy()
    assert np.abs(default[keep] - ref[keep]).max() / np.abs(ref).max() <= 1e-5
    # Swap in other prefixes per request: the output follows the FX graph holding the same prefixes.
    torch.manual_seed(5)
    with torch.no_grad():
        for site in meta(gm)["prefix"]["sites"]:
            for w in ("key", "value"):
                p = getattr(gm.get_submodule(site), f"prefix_{w}")
                p.copy_(torch.randn_like(p))
                feeds[f"{site}.prefix_{w}"] = p.numpy().copy()
    swapped = sess.run(None, feeds)[0]
    ref2 = run(gm, b).numpy()
    assert np.abs(swapped[keep] - ref2[keep]).max() / np.abs(ref2).max() <= 1e-5
    assert np.abs(swapped[keep] - default[keep]).max() > 1e-3


@pytest.mark.parametrize("name", ["llama-dynamo18", "gpt2-torchscript"])
def test_peft_adapter_loads_onto_an_onnx_file(onnx_corpus, tmp_path, name):
    import copy

    import peft

    entry = onnx_corpus.get(name)
    arch = name.split("-")[0]
    base = build(arch)
    task = "CAUSAL_LM"
    pm = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=4)).eval()
    pm.save_pretrained(tmp_path / "adapter")
    model = lora_fx.load_adapter(lora_fx.load(entry.path), tmp_path / "adapter")
    sess = _session(model, tmp_path)
    for batch, seq, pad in [(2, 8, 2), (3, 6, 0)]:
        b = inputs(batch, seq, pad=pad, seed=7)
        keep = b["attention_mask"].bool().numpy()
        ours = sess.run(None, {i.name: b[i.name].numpy() for i in sess.get_inputs()})[0]
        ref = run(pm, b).numpy()
        assert np.abs(ours[keep] - ref[keep]).max() / np.abs(ref).max() <= 1e-5
    # A second adapter onto the same file replaces the values in its prefix slots.
    torch_seeded = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=4)).eval()
    torch_seeded.save_pretrained(tmp_path / "second")
    lora_fx.load_adapter(model, tmp_path / "second")
    assert len([n for n in model.graph.initializers if n.endswith(".prefix_key")]) == 2
    sess = _session(model, tmp_path / "again")
    b = inputs(2, 8, pad=2, seed=7)
    keep = b["attention_mask"].bool().numpy()
    ours = sess.run(None, {i.name: b[i.name].numpy() for i in sess.get_inputs()})[0]
    ref = run(torch_seeded, b).numpy()
    assert np.abs(ours[keep] - ref[keep]).max() / np.abs(ref).max() <= 1e-5
    assert np.abs(ref[keep] - run(pm, b).numpy()[keep]).max() > 1e-3

    # And back out: the ONNX file's prefixes saved in PEFT's format load in PEFT with the same outputs.
    lora_fx.save_adapter(model, tmp_path / "out")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    back_out = run(back, b).numpy()
    assert np.abs(back_out[keep] - ref[keep]).max() / np.abs(ref).max() <= 1e-5


def test_two_additive_terms_each_gain_prefix_columns(tmp_path):
    """A model adding a bias and then the mask to the scores (a hand-built graph input, no T5 relative position bias,
    which is computed again instead: test_insert_prefix_t5.py): both get T visible columns, with distinct
    node names (ONNX Runtime refuses a model with two nodes of one name), and the result is attention over the
    prefix keys/values followed by the real ones."""
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper
    import onnx_ir as ir

    B, H, S, D = 2, 2, 5, 4
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2], name="/attn/Transpose"),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="/attn/MatMul"),
        helper.make_node("Mul", ["s", "scale"], ["ss"], name="/attn/Mul"),
        helper.make_node("Add", ["ss", "position_bias"], ["sb"], name="/attn/Add"),
        helper.make_node("Add", ["sb", "mask"], ["sm"], name="/attn/Add_1"),
        helper.make_node("Softmax", ["sm"], ["p"], axis=-1, name="/attn/Softmax"),
        helper.make_node("MatMul", ["p", "v"], ["o"], name="/attn/MatMul_1"),
    ]
    qkv = [helper.make_tensor_value_info(n, f, [B, H, S, D]) for n in ("q", "k", "v")]
    extra = [helper.make_tensor_value_info("position_bias", f, [1, H, S, S]), helper.make_tensor_value_info("mask", f, [B, 1, 1, S])]
    graph = helper.make_graph(nodes, "two_terms", qkv + extra, [helper.make_tensor_value_info("o", f, [B, H, S, D])],
                              [numpy_helper.from_array(np.array(0.5, np.float32), "scale")])
    # Static shapes recorded on every value (a fixed-size model, as ViT's patches): the key axis must grow by T.
    proto = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10))
    model = ir.serde.deserialize_model(proto)
    assert model.graph.node(5).outputs[0].shape == ir.Shape([B, H, S, S])  # the Softmax
    sites = _attention(model)
    gen = torch.Generator().manual_seed(0)
    pk, pv = torch.randn(H, T, D, generator=gen), torch.randn(H, T, D, generator=gen)
    InsertPrefix(lora_fx.PrefixConfig(num_virtual_tokens=T), sites, {sites[0].name: (pk, pv)})(model)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((B, H, S, D)).astype(np.float32) for n in ("q", "k", "v")}
    feeds["position_bias"] = rng.standard_normal((1, H, S, S)).astype(np.float32)
    feeds["mask"] = np.zeros((B, 1, 1, S), np.float32)
    feeds["mask"][1, ..., -2:] = -1e9
    ours = _session(model, tmp_path).run(None, feeds)[0]
    keys = np.concatenate([np.broadcast_to(pk.numpy(), (B, H, T, D)), feeds["k"]], axis=2)
    values = np.concatenate([np.broadcast_to(pv.numpy(), (B, H, T, D)), feeds["v"]], axis=2)
    pad = lambda a: np.concatenate([np.zeros(a.shape[:-1] + (T,), np.float32), a], axis=-1)  # noqa: E731
    scores = feeds["q"] @ keys.transpose(0, 1, 3, 2) * 0.5 + pad(feeds["position_bias"]) + pad(feeds["mask"])
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ values
    assert np.abs(ours - want).max() <= 1e-5


@pytest.mark.slow
def test_peft_layer_order_holds_past_ten_layers(tmp_path):
    """PEFT's prompt_embeddings hold one block per layer in layer order; site names sort ``h.10`` before ``h.2``,
    so a record kept in name order gave layer 10 the prefixes of layer 2 (and back out the same way)."""
    import copy

    import peft
    import torch
    import transformers as tf

    from tests.runtime.onnx_models import _Positional

    torch.manual_seed(0)
    base = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=16, n_layer=12, n_head=2, n_positions=64)).eval()
    base.config.use_cache = False
    b = inputs(2, 6, pad=1, seed=3)
    names = ["input_ids", "attention_mask"]
    with torch.no_grad():
        torch.onnx.export(_Positional(base, names, ["logits"]), tuple(b[k] for k in names), str(tmp_path / "gpt2.onnx"),
                          dynamo=False, input_names=names, output_names=["logits"], opset_version=17,
                          dynamic_axes={k: {0: "b", 1: "s"} for k in names})
    pm = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)).eval()
    pm.save_pretrained(tmp_path / "adapter")
    model = lora_fx.load_adapter(lora_fx.load(tmp_path / "gpt2.onnx"), tmp_path / "adapter")
    assert [s.split("transformer.")[1] for s in prefix_metadata(model)["sites"]] == [f"h.{i}.attn" for i in range(12)]
    sess = _session(model, tmp_path)
    keep = b["attention_mask"].bool().numpy()
    ours = sess.run(None, {i.name: b[i.name].numpy() for i in sess.get_inputs()})[0]
    ref = run(pm, b).numpy()
    assert np.abs(ours[keep] - ref[keep]).max() / np.abs(ref).max() <= 1e-5
    lora_fx.save_adapter(model, tmp_path / "out")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    assert np.abs(run(back, b).numpy()[keep] - ref[keep]).max() / np.abs(ref).max() <= 1e-5
