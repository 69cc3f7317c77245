"""insert_lora on ONNX: zero-B identity and W + A@B equivalence in ONNX Runtime, the public layout,
the same selection as on the FX capture of the source model, fp16/bf16, refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import numpy_helper

import lora_fx
from lora_fx.errors import AdapterError, TargetNotFoundError, UnsupportedError
from lora_fx.passes.onnx.find_sites import find_sites
from lora_fx.passes.onnx.insert_lora import CONFIG_KEY, LORA_KEY, apply_lora, insert_lora, lora_metadata
from lora_fx.sites import SiteKind
from lora_fx.targeting import select_targets

RUNNABLE = [
    "bert-dynamo18", "gpt2-dynamo18", "llama-dynamo18", "bert-dynamo23", "bert-torchscript", "gpt2-torchscript",
    "llama-torchscript", "bert-ortfused", "llama-ortfused", "gemm-mlp", "fp16-mlp", "forms", "llama-dynamo18-noopt",
    "minilm-torchscript",
]


def ort_outputs(model_or_path, feeds) -> list[np.ndarray]:
    import onnxruntime as ort

    data = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _all_linear(entry) -> lora_fx.LoraConfig:
    return lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNNABLE)
def test_zero_b_rewrite_changes_no_output(onnx_corpus, name, tmp_path):
    entry = onnx_corpus.get(name)
    model = lora_fx.load(entry.path)
    lora_fx.apply(model, _all_linear(entry))
    adapted = lora_metadata(model)
    assert len(adapted) >= 2
    out = lora_fx.save(model, tmp_path / "lora.onnx")
    if entry.checker:
        onnx.checker.check_model(str(out), full_check=True)
    for got, want in zip(ort_outputs(out, entry.feeds()), ort_outputs(entry.path, entry.feeds()), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert max_rel(got, want) <= 1e-6


# ---- an independent reference: the original graph with W + A @ B put into each site's weight ------

def _producer(proto: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in proto.graph.node if name in n.output), None)


def _init(proto: onnx.ModelProto, name: str) -> np.ndarray | None:
    t = next((t for t in proto.graph.initializer if t.name == name), None)
    return None if t is None else numpy_helper.to_array(t)


def _attr(node: onnx.NodeProto, key: str, default):
    a = next((a for a in node.attribute if a.name == key), None)
    return default if a is None else onnx.helper.get_attribute_value(a)


def _effective_weight(proto: onnx.ModelProto, name: str) -> np.ndarray:
    """The float weight a MatMul sees on its right, following Transpose / Cast / DequantizeLinear by hand."""
    w = _init(proto, name)
    if w is not None:
        return w.astype(np.float64)
    node = _producer(proto, name)
    src = _effective_weight(proto, node.input[0])
    if node.op_type == "Transpose":
        return src.transpose(_attr(node, "perm", None) or [1, 0])
    if node.op_type == "Cast" or node.op_type == "Identity":
        return src
    if node.op_type == "DequantizeLinear":
        scale = _init(proto, node.input[1]).astype(np.float64)
        zp = _init(proto, node.input[2]).astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
        return (src - zp) * scale
    raise AssertionError(f"unexpected weight op {node.op_type}")


def _unpack_nbits(packed: np.ndarray, scales: np.ndarray, k: int, n: int, block: int) -> np.ndarray:
    low, high = packed & 0x0F, packed >> 4
    q = np.stack([low, high], axis=-1).reshape(n, -1)[:, :k].astype(np.float64)
    return ((q - 8).reshape(n, k // block, block) * scales.reshape(n, k // block, 1)).reshape(n, k)


def reference_with_merged_weights(original: onnx.ModelProto, rewritten: ir.Model, node_names: dict[str, str]) -> onnx.ModelProto:
    """``original`` with each adapted node's weight replaced by ``W_eff + A @ B`` ([in, out], float)."""
    ref = onnx.ModelProto()
    ref.CopyFrom(original)
    meta = lora_metadata(rewritten)
    inits = rewritten.graph.initializers
    for site, rec in meta.items():
        a = inits[rec["a"]].const_value.numpy().astype(np.float64)
        b = inits[rec["b"]].const_value.numpy().astype(np.float64)
        node = next(n for n in ref.graph.node if n.name == node_names[site])
        if node.op_type == "MatMulNBits":
            k, n_out, block = _attr(node, "K", 0), _attr(node, "N", 0), _attr(node, "block_size", 0)
            w = _unpack_nbits(_init(ref, node.input[1]), _init(ref, node.input[2]), k, n_out, block).T
            node.op_type, node.domain = "MatMul", ""
            del node.attribute[:]
            del node.input[2:]
        elif node.op_type == "Gemm":
            w = _effective_weight(ref, node.input[1])
            if _attr(node, "transB", 0):
                w = w.T
            # Gemm computes alpha · x @ W: the site's effective weight is alpha · W, LoRA adds x @ A @ B to it.
            w = w * _attr(node, "alpha", 1.0)
            for att in node.attribute:
                if att.name == "transB":
                    att.i = 0
                if att.name == "alpha":
                    att.f = 1.0
        else:
            w = _effective_weight(ref, node.input[1])
        assert w.shape == a.shape[:1] + b.shape[1:], (site, w.shape, a.shape, b.shape)
        dtype = inits[rec["a"]].const_value.numpy().dtype
        merged = (w + a @ b).astype(dtype)
        new_name = f"ref::{site}"
        ref.graph.initializer.append(numpy_helper.from_array(merged, new_name))
        node.input[1] = new_name
    return ref


RANDOM = {
    "bert-dynamo18": ["query", "value", "dense"], "gpt2-dynamo18": ["c_attn", "c_proj", "c_fc"],
    "llama-dynamo18": ["q_proj", "v_proj", "down_proj"], "bert-dynamo23": ["query", "key"],
    "bert-torchscript": ["query", "value", "dense"], "gpt2-torchscript": ["c_attn", "c_fc"],
    "llama-torchscript": ["k_proj", "o_proj", "up_proj"], "llama-dynamo18-noopt": ["q_proj", "v_proj", "lm_head"],
    "minilm-torchscript": ["query", "value"], "llama-ortfused": ["q_proj", "v_proj", "gate_proj"],
    "bert-ortfused": ["dense"], "gemm-mlp": ["fc1", "fc2", "head"], "fp16-mlp": ["up", "mid", "out"],
    "forms": ["enc.proj", "enc.half", "enc.q8", "enc.q4", "tied", "tied_1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", RANDOM)
def test_random_adapters_equal_merged_weights(onnx_corpus, name, tmp_path):
    entry = onnx_corpus.get(name)
    model = lora_fx.load(entry.path)
    torch.manual_seed(0)
    config = lora_fx.LoraConfig(r=3, lora_alpha=6, target_modules=RANDOM[name], init_lora_weights=False)
    sites = find_sites(model)
    node_names = {s.name: s.handle.name for s in sites}
    apply_lora(model, config)
    assert set(lora_metadata(model)) == {t.site.name for t in select_targets(sites, config)}
    out = lora_fx.save(model, tmp_path / "lora.onnx")
    ref = reference_with_merged_weights(onnx.load(str(entry.path)), model, node_names)
    tol = 2e-2 if name == "fp16-mlp" else 1e-4
    got, want, base = ort_outputs(out, entry.feeds()), ort_outputs(ref, entry.feeds()), ort_outputs(entry.path, entry.feeds())
    for g, w, b in zip(got, want, base, strict=True):
        assert max_rel(g, w) <= tol
        assert max_rel(g, b) > 10 * tol, "random adapters must change the output"


# ---- the public layout ------------------------------------------------------------------------

def test_layout_metadata_and_scale_folded_into_b(onnx_corpus):
    entry = onnx_corpus.get("gemm-mlp")
    model = lora_fx.load(entry.path)
    torch.manual_seed(1)
    a_peft, b_peft = torch.randn(2, 32), torch.randn(24, 2)  # fc2: in 32, out 24; PEFT layout
    config = lora_fx.LoraConfig(r=2, lora_alpha=5, target_modules=["fc2"])
    apply_lora(model, config, adapters={"fc2": (a_peft, b_peft)})
    meta = json.loads(model.metadata_props[LORA_KEY])
    assert meta == {"fc2": {"r": 2, "alpha": 5.0, "scale": 2.5, "in_features": 32, "out_features": 24,
                            "a": "fc2.lora_A.weight", "b": "fc2.lora_B.weight"}}
    assert lora_fx.LoraConfig.from_json(model.metadata_props[CONFIG_KEY]).target_modules == ["fc2"]
    a = model.graph.initializers["fc2.lora_A.weight"].const_value.numpy()
    b = model.graph.initializers["fc2.lora_B.weight"].const_value.numpy()
    np.testing.assert_array_equal(a, a_peft.numpy().T)
    np.testing.assert_allclose(b, 2.5 * b_peft.numpy().T, rtol=1e-6)
    # MatMul(x, A) -> MatMul(., B) -> Add(y, .), right after the site
    fc2 = next(n for n in model.graph if n.name == "fc2")
    add = next(u for u, _ in fc2.outputs[0].uses() if u.op_type == "Add")
    mm_b = add.inputs[1].producer()
    mm_a = mm_b.inputs[0].producer()
    assert (mm_b.op_type, mm_b.inputs[1].name, mm_a.op_type, mm_a.inputs[1].name) == ("MatMul", "fc2.lora_B.weight", "MatMul", "fc2.lora_A.weight")
    assert mm_a.inputs[0] is fc2.inputs[0]


def test_output_site_keeps_graph_output_name(onnx_corpus, tmp_path):
    entry = onnx_corpus.get("gemm-mlp")
    model = lora_fx.load(entry.path)
    apply_lora(model, lora_fx.LoraConfig(r=2, target_modules=["head"]))
    assert [o.name for o in model.graph.outputs] == ["y"]
    assert model.graph.outputs[0].producer().op_type == "Add"
    out = lora_fx.save(model, tmp_path / "m.onnx")
    onnx.checker.check_model(str(out), full_check=True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_models_get_adapters_in_their_dtype(onnx_corpus, dtype, tmp_path):
    entry = onnx_corpus.get("fp16-mlp")
    model = lora_fx.load(entry.path)
    if dtype == "bfloat16":
        # Same graph in bf16: cast the weights and declare bf16 activations.
        import ml_dtypes

        for v in model.graph.initializers.values():
            arr = v.const_value.numpy().astype(np.float32).astype(ml_dtypes.bfloat16)
            v.const_value = ir.Tensor(arr, dtype=ir.DataType.BFLOAT16, name=v.name)
            v.dtype = ir.DataType.BFLOAT16
        for v in list(model.graph.inputs) + list(model.graph.outputs):
            v.dtype = ir.DataType.BFLOAT16
    sites = find_sites(model)
    assert {s.dtype for s in sites} == {dtype}
    apply_lora(model, lora_fx.LoraConfig(r=2, target_modules="all-linear"))
    want = ir.DataType.FLOAT16 if dtype == "float16" else ir.DataType.BFLOAT16
    for rec in lora_metadata(model).values():
        for key in ("a", "b"):
            assert model.graph.initializers[rec[key]].const_value.dtype == want
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


# ---- same selection as on the torch model -----------------------------------------------------

CONFIGS = {
    "minilm": [dict(target_modules=["query", "value"]), dict(target_modules="all-linear")],
    "bert": [dict(target_modules=["query", "value"]), dict(target_modules="all-linear"),
             dict(target_modules=r".*attention\.(self\.key|output\.dense)"), dict(target_modules=["dense"], layers_to_transform=[1])],
    "gpt2": [dict(target_modules=["c_attn"]), dict(target_modules="all-linear"), dict(target_modules=["c_proj"], exclude_modules=["mlp.c_proj"])],
    "llama": [dict(target_modules=["q_proj", "v_proj"]), dict(target_modules="all-linear"), dict(target_modules=["k_proj", "up_proj"], layers_to_transform=0)],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert-dynamo18", "gpt2-dynamo18", "llama-dynamo18", "bert-torchscript", "gpt2-torchscript",
                                  "llama-torchscript", "llama-ortfused", "bert-dynamo23", "llama-dynamo23",
                                  "llama-dynamo18-noopt", "minilm-torchscript"])
def test_same_config_selects_same_sites_as_fx(onnx_corpus, zoo, name):
    entry = onnx_corpus.get(name)
    arch = name.split("-")[0]
    onnx_sites = lora_fx.find_sites(lora_fx.load(entry.path))
    for site in onnx_sites:
        site.name = site.name.removeprefix(entry.prefix)
    fx_sites = lora_fx.find_sites(zoo.gm(arch))
    for kwargs in CONFIGS[arch]:
        config = lora_fx.LoraConfig(r=2, **kwargs)
        ours = sorted(t.site.name for t in select_targets(onnx_sites, config))
        theirs = sorted(t.site.name for t in select_targets(fx_sites, config))
        assert ours == theirs, kwargs
        assert ours


# ---- refusals ---------------------------------------------------------------------------------

def test_second_rewrite_of_a_site_is_refused_and_changes_nothing(onnx_corpus):
    model = lora_fx.load(onnx_corpus.get("gemm-mlp").path)
    apply_lora(model, lora_fx.LoraConfig(r=2, target_modules=["fc1"]))
    n_nodes, meta = len(model.graph), dict(model.metadata_props)
    with pytest.raises(AdapterError, match="fc1 already has a LoRA adapter"):
        apply_lora(model, lora_fx.LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    assert len(model.graph) == n_nodes and dict(model.metadata_props) == meta
    # Other sites can still be added.
    apply_lora(model, lora_fx.LoraConfig(r=2, target_modules=["fc2"]))
    assert set(lora_metadata(model)) == {"fc1", "fc2"}


def test_unknown_target_names_the_choices(onnx_corpus):
    model = lora_fx.load(onnx_corpus.get("gemm-mlp").path)
    with pytest.raises(TargetNotFoundError, match="closest to 'fc3'"):
        apply_lora(model, lora_fx.LoraConfig(r=2, target_modules=["fc3"]))


@pytest.mark.slow
def test_packed_qkv_of_fused_attention_is_refused_clearly_and_skipped_by_all_linear(onnx_corpus):
    entry = onnx_corpus.get("bert-ortfused")
    model = lora_fx.load(entry.path)
    with pytest.raises(UnsupportedError, match="packed QKV projection"):
        apply_lora(model, lora_fx.LoraConfig(r=2, target_modules=["qkv"]))
    apply_lora(model, lora_fx.LoraConfig(r=2, target_modules="all-linear"))
    assert not any(name.endswith(".qkv") for name in lora_metadata(model))


def test_insert_lora_pass_returns_what_it_changed(onnx_corpus):
    model = lora_fx.load(onnx_corpus.get("gemm-mlp").path)
    sites = [s for s in find_sites(model) if s.kind is SiteKind.LINEAR]
    result = insert_lora(model, select_targets(sites, lora_fx.LoraConfig(r=2, target_modules=["fc1", "head"])))
    assert result.modified and result.changed == ["fc1", "head"] and result.model is model


# ---- lora_dropout -----------------------------------------------------------------------------

def _dropout_models(entry, p: float, opset: int | None = None):
    """The same random adapter on the same sites, inserted with lora_dropout ``p`` and without."""
    out = []
    for dropout in (p, 0.0):
        model = lora_fx.load(entry.path)
        if opset is not None:  # gemm-mlp's ops (Gemm, Relu, Add, MatMul) read the same at opset 11
            model.opset_imports[""] = opset
        torch.manual_seed(3)
        apply_lora(model, lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", lora_dropout=dropout,
                                             init_lora_weights=False))
        out.append(model)
    return out


@pytest.mark.parametrize("name, opset", [("gemm-mlp", None), ("gemm-mlp", 11),
                                         pytest.param("llama-dynamo18", None, marks=pytest.mark.slow)])
def test_lora_dropout_reads_the_site_input_for_the_branch_alone_and_is_inert_in_inference(onnx_corpus, name, opset, tmp_path):
    entry = onnx_corpus.get(name)
    with_dropout, without = _dropout_models(entry, 0.25, opset)
    records = lora_metadata(with_dropout)
    assert records and all(rec["dropout"] == 0.25 for rec in records.values())
    assert all("dropout" not in rec for rec in lora_metadata(without).values())
    for site, rec in records.items():
        mm_a = next(u.node for u in with_dropout.graph.initializers[rec["a"]].uses())
        drop = mm_a.inputs[0].producer()
        assert drop.op_type == "Dropout"
        assert [u.node for u in drop.outputs[0].uses()] == [mm_a]  # the base path never sees the mask
        if opset == 11:
            assert drop.attributes["ratio"].as_float() == 0.25 and len(drop.inputs) == 1
        else:
            assert float(drop.inputs[1].const_value.numpy()) == 0.25
    path = lora_fx.save(with_dropout, tmp_path / "dropout.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    got = ort_outputs(path, entry.feeds())
    want = ort_outputs(lora_fx.save(without, tmp_path / "plain.onnx"), entry.feeds())
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_lora_dropout_below_opset_7_is_refused_before_anything_changes(onnx_corpus):
    model = lora_fx.load(onnx_corpus.get("gemm-mlp").path)
    model.opset_imports[""] = 6
    n_nodes = len(model.graph)
    with pytest.raises(UnsupportedError, match="opset 7 or later.*lora_dropout=0"):
        apply_lora(model, lora_fx.LoraConfig(r=2, target_modules=["fc1"], lora_dropout=0.1))
    assert len(model.graph) == n_nodes and LORA_KEY not in model.metadata_props
