"""export_onnx: torch GraphModule, merged ONNX and adapter-slot ONNX agree; adapters round-trip with PEFT."""

from __future__ import annotations

import collections
import copy

import numpy as np
import onnx_ir as ir
import pytest
import torch

import lora_fx
from lora_fx.errors import ConfigError, UnsupportedError
from lora_fx.export import ExportMode, adapters_dir
from lora_fx.onnx_adapter import peft_dir_to_onnx_adapter, read_onnx_adapter
from lora_fx.passes.fx.capture import meta
from tests import models
from tests.exported import TMP, base_exported, eager, exported, feeds, ort_run, rel, trained_gm

NAMES = [pytest.param("gpt2", marks=pytest.mark.slow), pytest.param("llama", marks=pytest.mark.slow),
         pytest.param("minilm", marks=pytest.mark.slow)]
# Sizes other than the export example (2, 8): batch and sequence axes are dynamic.
SHAPES = [(2, 8, 0), (3, 11, 4), (1, 5, 0)]


@pytest.mark.parametrize("name", NAMES)
def test_graph_module_merged_and_adapter_slots_agree(name):
    gm = trained_gm(name)
    merged, served = exported(name, "merged"), exported(name, "adapters")
    adapter = served.adapter_paths[0]
    assert adapter == adapters_dir(served.model_path) / "default.onnx_adapter"
    for batch, seq, pad in SHAPES:
        tb, nb = feeds(batch, seq, pad, seed=batch)
        want = models.run(gm, tb).numpy()
        base = models.run(eager(name), tb).numpy()
        assert rel(want, base) > 1e-3  # the adapter really changes the output
        assert rel(ort_run(merged.model_path, nb), want) <= 1e-4
        assert rel(ort_run(served.model_path, nb, adapter=adapter), want) <= 1e-4
        assert rel(ort_run(served.model_path, nb), base) <= 1e-5  # no adapter active: the base model


@pytest.mark.parametrize("name", NAMES[:1])
def test_names_survive_and_the_merged_model_is_the_base_graph(name):
    gm = trained_gm(name)
    sites = sorted(meta(gm)["lora_sites"])
    served = ir.load(str(exported(name, "adapters").model_path))
    slot_inputs = {v.name for v in served.graph.inputs if v.name in served.graph.initializers}
    assert slot_inputs == {f"{s}.lora_{w}.weight" for s in sites for w in "AB"}
    assert set(read_onnx_adapter(exported(name, "adapters").adapter_paths[0]).tensors) == slot_inputs
    merged = ir.load(str(exported(name, "merged").model_path))
    assert not [n for n in merged.graph.initializers if ".lora_" in n]
    base_model = ir.load(str(base_exported(name).model_path))
    assert collections.Counter(n.op_type for n in merged.graph) == collections.Counter(n.op_type for n in base_model.graph)
    assert [i.name for i in merged.graph.inputs] == [i.name for i in base_model.graph.inputs] == ["input_ids", "attention_mask"]
    # dynamic batch and sequence axes
    assert all(not isinstance(d, int) for d in merged.graph.inputs[0].shape)


@pytest.mark.parametrize("name, outputs", [("bert", ["last_hidden_state", "pooler_output"]), ("gpt2", ["logits"])])
def test_exported_outputs_are_named_like_the_models_outputs(name, outputs):
    batch = models.inputs(2, 8)
    out = base_exported(name)  # export_onnx of the plain capture, shared with the test above
    assert [v.name for v in lora_fx.load(out.model_path).graph.outputs] == outputs
    np.testing.assert_allclose(ort_run(out.model_path, {k: v.numpy() for k, v in batch.items()}),
                               models.run(models.build(name), batch).numpy(), rtol=1e-4, atol=1e-5)


def test_output_names_follow_the_tree_and_clashes_keep_the_exporters_names():
    import torch.utils._pytree as pytree

    from lora_fx.export import _leaf_names, _name_outputs

    spec = pytree.tree_structure({"logits": 0, "past_key_values": ((0, 0), (0, 0))})
    assert _leaf_names(spec) == ["logits", "past_key_values.0.0", "past_key_values.0.1", "past_key_values.1.0",
                                 "past_key_values.1.1"]
    x = ir.Value(name="x", shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.FLOAT))
    a, b = ir.node("Relu", [x]), ir.node("Neg", [x])
    a.outputs[0].name, b.outputs[0].name = "relu_0", "neg_0"
    graph = ir.Graph([x], [a.outputs[0], b.outputs[0]], nodes=[a, b], opset_imports={"": 18})
    _name_outputs(ir.Model(graph, ir_version=10), pytree.tree_structure({"logits": 0, "x": 0}))  # "x" is the input's
    assert [o.name for o in graph.outputs] == ["relu_0", "neg_0"]
    _name_outputs(ir.Model(graph, ir_version=10), pytree.tree_structure({"logits": 0, "hidden": 0}))
    assert [o.name for o in graph.outputs] == ["logits", "hidden"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_merge_into_the_base_graph(dtype, tmp_path):
    """fp16/bf16 bases train fp32 adapters (as PEFT does), so the exported branch casts x up and the sum
    back down; the merge folds A @ B into the half-precision W and drops those Casts again."""
    model = models.build("llama").to(dtype)
    example = models.inputs(2, 8)
    captured = lora_fx.capture(model, kwargs=example)
    base = lora_fx.export_onnx(copy.deepcopy(captured), tmp_path / "base.onnx", kwargs=example)
    torch.manual_seed(0)
    gm = lora_fx.apply(captured,
                       lora_fx.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    merged = lora_fx.export_onnx(gm, tmp_path / "merged.onnx", kwargs=example, mode="merged")
    got_model, base_model = ir.load(str(merged.model_path)), ir.load(str(base.model_path))
    assert collections.Counter(n.op_type for n in got_model.graph) == collections.Counter(n.op_type for n in base_model.graph)
    # The folded W is W + (A @ B) * scale rounded once to the model's dtype (stored [out, in] or, with the
    # exporter's transpose folded into it, [in, out]; half-precision weights may lose their names there).
    site = "model.layers.0.self_attn.q_proj"
    mod = gm.get_submodule(site)
    w0 = model.get_submodule(site).weight.detach().double()
    delta = (mod.lora_B.weight.detach().double() @ mod.lora_A.weight.detach().double()) * meta(gm)["lora_sites"][site]["scale"]
    expect = (w0 + delta).to(dtype).float()
    stored = [torch.from_numpy(np.asarray(v.const_value.numpy()).astype(np.float32)) for v in got_model.graph.initializers.values()
              if v.const_value is not None and tuple(v.shape) in {tuple(expect.shape), tuple(expect.shape[::-1])}]
    assert any(torch.equal(w, expect) or torch.equal(w, expect.t()) for w in stored)
    assert not torch.equal(expect, w0.to(dtype).float())  # the adapter really moved W
    if dtype is torch.float16:  # ONNX Runtime's CPU provider has no bf16 kernels for these ops
        nb = {k: v.numpy() for k, v in example.items()}
        with torch.no_grad():
            want = models.run(gm, example).float().numpy()
        assert rel(ort_run(merged.model_path, nb), want) <= 5e-3  # fp16 rounding of the merged W


@pytest.mark.parametrize("name", NAMES[:2])
def test_written_peft_dir_loads_in_peft_and_gives_our_outputs(name):
    import peft

    gm = trained_gm(name)
    peft_dir = exported(name, "adapters").peft_dirs[0]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(eager(name)), str(peft_dir)).eval()
    for batch, seq, pad in SHAPES[:2]:
        tb, _ = feeds(batch, seq, pad)
        assert rel(models.run(pm, tb).numpy(), models.run(gm, tb).numpy()) <= 1e-5


@pytest.mark.parametrize("name", NAMES[:2])
def test_peft_adapter_becomes_an_onnx_adapter_that_gives_peft_outputs(name):
    """A PEFT-trained adapter of another rank (2, the export had 4) runs on the exported slots in plain ORT."""
    torch.manual_seed(3)
    pm = models.peft_wrap(eager(name), r=2, lora_alpha=5, target_modules="all-linear", init_lora_weights=False)
    peft_dir = TMP / f"{name}-peft-trained"
    pm.save_pretrained(str(peft_dir))
    served = exported(name, "adapters").model_path
    out = peft_dir_to_onnx_adapter(peft_dir, served, TMP / f"{name}-from-peft.onnx_adapter")
    for batch, seq, pad in SHAPES[:2]:
        tb, nb = feeds(batch, seq, pad)
        want = models.run(pm, tb).numpy()
        assert rel(want, models.run(eager(name), tb).numpy()) > 1e-3
        assert rel(ort_run(served, nb, adapter=out), want) <= 1e-4


@pytest.mark.parametrize("name", NAMES[:2])
def test_a_peft_directory_is_served_as_it_is(name, tmp_path, capsys):
    """A PEFT user's directory goes straight into runtime.Session, lora-fx run and export --merge --adapter, converted
    on the way (it used to need peft_dir_to_onnx_adapter first), giving PEFT's outputs."""
    import json

    from lora_fx.cli import main
    from lora_fx.errors import AdapterError
    from lora_fx.runtime import Session

    torch.manual_seed(5)
    pm = models.peft_wrap(eager(name), r=2, lora_alpha=5, target_modules="all-linear", init_lora_weights=False)
    peft_dir = tmp_path / "legal"
    pm.save_pretrained(str(peft_dir))
    served = exported(name, "adapters").model_path
    tb, nb = feeds(2, 7, pad=1)
    want = models.run(pm, tb).numpy()
    assert rel(want, models.run(eager(name), tb).numpy()) > 1e-3
    sess = Session(served)
    info = sess.add_adapter("legal", peft_dir)
    assert info.default_sites == []
    assert rel(sess.run(nb, adapter="legal")[0], want) <= 1e-4
    np.savez(tmp_path / "feeds.npz", **nb)
    assert main(["run", str(served), "--adapter", str(peft_dir), "--inputs", str(tmp_path / "feeds.npz"),
                 "-o", str(tmp_path / "out.npz")]) == 0
    with np.load(tmp_path / "out.npz") as out:
        assert rel(out[sess.outputs[0]], want) <= 1e-4
    assert main(["export", str(served), "-o", str(tmp_path / "merged.onnx"), "--merge", "--adapter", str(peft_dir)]) == 0
    assert rel(ort_run(tmp_path / "merged.onnx", nb), want) <= 1e-4
    # Folders that are no LoRA directory are refused by what they are.
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="folder without adapter_config.json"):
        sess.add_adapter("empty", tmp_path / "empty")
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}))
    with pytest.raises(AdapterError, match="PREFIX_TUNING PEFT adapter; only LoRA directories"):
        sess.add_adapter("prefix", prefix)
    capsys.readouterr()
    assert main(["run", str(served), "--adapter", str(prefix), "--inputs", str(tmp_path / "feeds.npz")]) != 0
    assert "only LoRA directories convert" in capsys.readouterr().err


MIXED_RANKS = {
    "gpt2": dict(r=3, lora_alpha=5, target_modules=["c_proj"], layers_to_transform=[1]),
    "llama": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                  rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 6}, alpha_pattern={"q_proj": 1.5}),
}


@pytest.mark.parametrize("name", NAMES[:2])
def test_an_adapter_with_other_ranks_at_some_sites_runs_on_the_exported_slots(name):
    """Ranks unlike the trained one (4) at some sites, other sites left at their defaults: the exporter's
    recorded shape of ``x @ A`` must not fix the rank, or ORT fails planning buffers on such an adapter."""
    from lora_fx.runtime import Session

    torch.manual_seed(4)
    pm = models.peft_wrap(eager(name), init_lora_weights=False, **MIXED_RANKS[name])
    peft_dir = TMP / f"{name}-peft-mixed-ranks"
    pm.save_pretrained(str(peft_dir))
    served = exported(name, "adapters").model_path
    out = peft_dir_to_onnx_adapter(peft_dir, served, TMP / f"{name}-mixed-ranks.onnx_adapter")
    sess = Session(served)
    sess.add_adapter("mixed", out)
    tb, nb = feeds(3, 9, pad=2)
    want = models.run(pm, tb).numpy()
    assert rel(want, models.run(eager(name), tb).numpy()) > 1e-3
    assert rel(ort_run(served, nb, adapter=out), want) <= 1e-4
    assert rel(sess.run(nb, adapter="mixed")[0], want) <= 1e-4


def test_modes_parse_from_strings_and_bad_modes_are_refused(tmp_path):
    assert ExportMode.parse("merged") is ExportMode.MERGED and ExportMode.parse("ADAPTERS") is ExportMode.ADAPTERS
    with pytest.raises(ConfigError, match="'folded' is not an export mode"):
        lora_fx.export_onnx(trained_gm("gpt2"), tmp_path / "x.onnx", kwargs=models.inputs(2, 8), mode="folded")
    with pytest.raises(ConfigError, match="example inputs"):
        lora_fx.export_onnx(trained_gm("gpt2"), tmp_path / "x.onnx", mode="merged")
    assert not list(tmp_path.iterdir())


def test_adapters_mode_needs_an_adapter_and_prefixes_cannot_merge(zoo, tmp_path):
    plain = zoo.gm("gpt2")
    with pytest.raises(ConfigError, match="no LoRA adapter to expose"):
        lora_fx.export_onnx(plain, tmp_path / "x.onnx", kwargs=models.inputs(2, 8), mode="adapters")
    meta(plain)["adapters"]["prefix"] = lora_fx.PrefixConfig(num_virtual_tokens=4)
    with pytest.raises(UnsupportedError, match="prefix.*mode='adapters'"):
        lora_fx.export_onnx(plain, tmp_path / "x.onnx", kwargs=models.inputs(2, 8), mode="merged")
    assert not list(tmp_path.iterdir())


class _TransposedLinear(torch.nn.Linear):
    """Falcon's FalconLinear: x @ W.T + b instead of F.linear."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class _TransposedMlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = _TransposedLinear(8, 16)
        self.down = _TransposedLinear(16, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("mode", ["merged", "adapters"])
def test_transposed_weight_sites_export_and_run_in_onnx_runtime(tmp_path, mode):
    torch.manual_seed(0)
    model = _TransposedMlp().eval()
    example = {"x": torch.randn(2, 5, 8)}
    gm = lora_fx.apply(lora_fx.capture(model, kwargs=example),
                       lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=["up", "down"], init_lora_weights=False))
    assert sorted(meta(gm)["lora_sites"]) == ["down", "up"]
    out = lora_fx.export_onnx(gm, tmp_path / "m.onnx", kwargs=example, mode=mode)
    saved = ir.load(str(out.model_path))
    lora_inits = [n for n in saved.graph.initializers if ".lora_" in n]
    assert (not lora_inits) if mode == "merged" else sorted(lora_inits) == sorted(f"{s}.lora_{w}.weight" for s in ("up", "down") for w in "AB")
    adapter = out.adapter_paths[0] if mode == "adapters" else None
    for shape in [(2, 5), (3, 7)]:
        x = torch.randn(*shape, 8)
        with torch.no_grad():
            want, base = gm(x=x).numpy(), model(x).numpy()
        assert rel(want, base) > 1e-3
        assert rel(ort_run(out.model_path, {"x": x.numpy()}, adapter=adapter), want) <= 1e-4


class _SharedLayer(torch.nn.Module):
    """One layer run twice per forward, as ALBERT shares its layers' weights."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.layer(torch.relu(self.layer(x)))))


@pytest.mark.parametrize("mode", ["merged", "adapters"])
def test_an_adapted_module_that_runs_twice_is_refused_before_export(tmp_path, mode):
    example = {"x": torch.randn(2, 5, 8)}
    gm = lora_fx.apply(lora_fx.capture(_SharedLayer().eval(), kwargs=example),
                       lora_fx.LoraConfig(r=2, target_modules=["layer", "head"], init_lora_weights=False))
    with pytest.raises(UnsupportedError, match=r"more than once per forward .*: layer; .*exclude_modules"):
        lora_fx.export_onnx(gm, tmp_path / "m.onnx", kwargs=example, mode=mode)
    assert not list(tmp_path.iterdir())


def test_export_shows_the_user_no_torch_internal_leafspec_warning(tmp_path):
    """torch 2.13 warns (FutureWarning) about its own deprecated LeafSpec when the exporter deep-copies an output
    spec; the demo printed it at every export, and the user can do nothing about it."""
    import warnings

    kw = {k: v for k, v in models.inputs(2, 8).items()}
    gm = lora_fx.apply(lora_fx.capture(models.build("bert"), kwargs=kw), lora_fx.LoraConfig(r=2, target_modules=["query"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora_fx.export_onnx(gm, tmp_path / "m.onnx", kwargs=kw, mode="merged")
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
