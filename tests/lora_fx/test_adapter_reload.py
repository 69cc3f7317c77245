"""load_adapter onto a model that already has an adapter: the graph then runs the loaded config, as PEFT builds the
adapter from it (its scales, its lora_dropout), and save_adapter records what runs; a config the graph cannot run is
refused. References: PeftModel.from_pretrained, and a fresh load of the same folder (the config applied first)."""

from __future__ import annotations

import collections
import copy
import json

import numpy as np
import pytest
import torch

import lora_fx
from lora_fx.errors import AdapterError
from lora_fx.passes.fx.capture import meta
from tests.models import VOCAB, inputs, max_rel, peft_lora_modules, peft_wrap, run

TARGETS = ["query", "value"]


def _bert_without_base_dropout() -> torch.nn.Module:
    """Tiny BERT whose own dropouts are 0: in train mode only the LoRA dropout varies the outputs."""
    import transformers as tf

    torch.manual_seed(0)
    return tf.BertModel(tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)).eval()


@pytest.fixture(scope="module")
def bert():
    model = _bert_without_base_dropout()
    return model, lora_fx.capture(copy.deepcopy(model), kwargs=inputs(2, 8))


def _peft_dir(model, path, dropout, **extra):
    pm = peft_wrap(model, r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout, init_lora_weights=False, **extra)
    pm.save_pretrained(str(path))
    return pm


def _branch_dropouts(gm) -> list[float]:
    """The rate of each LoRA branch's dropout node in ``gm``."""
    return sorted(n.args[1] for n in gm.graph.nodes
                  if n.target is torch.ops.aten.dropout.default and n.meta.get("lora_fx_inserted"))


def _spread(model, batch, runs=48) -> float:
    """Mean over output elements of their standard deviation across train-mode forwards."""
    torch.manual_seed(0)
    outs = torch.stack([run(model, batch) for _ in range(runs)])
    return float(outs.std(dim=0).mean())


@pytest.mark.parametrize("applied, loaded", [(0.0, 0.5), (0.5, 0.0), (0.1, 0.5)])
def test_a_reload_runs_the_loaded_dropout(bert, tmp_path, applied, loaded):
    model, captured = bert
    pm = _peft_dir(model, tmp_path / "peft", loaded, use_rslora=True, alpha_pattern={"value": 3})
    gm = lora_fx.apply(copy.deepcopy(captured), lora_fx.LoraConfig(r=4, lora_alpha=32, target_modules=TARGETS, lora_dropout=applied))
    lora_fx.load_adapter(gm, tmp_path / "peft")
    fresh = lora_fx.load_adapter(copy.deepcopy(captured), tmp_path / "peft")  # the loaded config applied first
    assert _branch_dropouts(gm) == _branch_dropouts(fresh) == ([loaded] * 4 if loaded else [])

    b = inputs(2, 8, pad=2)
    assert max_rel(run(gm.eval(), b), run(pm.eval(), b)) <= 1e-5
    gm.train(), fresh.train(), pm.train()
    torch.manual_seed(7)
    ours = run(gm, b)
    torch.manual_seed(7)
    assert torch.equal(ours, run(fresh, b))  # the same dropout, drawn in the same order
    spread, peft_spread = _spread(gm, b), _spread(pm, b)
    if loaded:
        assert 0.85 <= spread / peft_spread <= 1.15, (spread, peft_spread)
    else:
        assert spread == peft_spread == 0.0
    gm.eval()

    lora_fx.save_adapter(gm, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (saved["lora_dropout"], saved["lora_alpha"], saved["use_rslora"], saved["alpha_pattern"]) == (loaded, 8, True, {"value": 3})
    assert meta(gm)["adapters"]["default"].lora_dropout == loaded
    assert {rec["alpha"] for rec in meta(gm)["lora_sites"].values()} == {8.0, 3.0}


def test_a_reload_keeps_the_graphs_mode(bert, tmp_path):
    """A dropout added while the graph trains drops at once, as the graph's others do."""
    model, captured = bert
    _peft_dir(model, tmp_path / "peft", 0.5)
    gm = lora_fx.apply(copy.deepcopy(captured), lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).train()
    lora_fx.load_adapter(gm, tmp_path / "peft")
    b = inputs(2, 8)
    assert not torch.equal(run(gm, b), run(gm, b))
    gm.eval()
    assert torch.equal(run(gm, b), run(gm, b))


def _edit_config(path, **changes):
    cfg = path / "adapter_config.json"
    data = json.loads(cfg.read_text())
    data.update(changes)
    cfg.write_text(json.dumps(data))


@pytest.mark.parametrize("changes, message", [
    (dict(target_modules=["query", "value", "key"]), r"it adapts encoder\.layer\.0\.attention\.self\.key.*which this model's adapter lacks"),
    (dict(rank_pattern={"value": 2}), r"other ranks: encoder\.layer\.0\.attention\.self\.value \(r=2 in the config, 4 here\)"),
])
def test_a_config_that_does_not_describe_the_graphs_adapter_is_refused(bert, tmp_path, changes, message):
    """Tensors that fit the graph's slots with a config that would adapt other sites or ranks (PEFT builds the adapter
    from the config, so they would not load there either): refused before anything changes, naming the way out."""
    model, captured = bert
    _peft_dir(model, tmp_path / "peft", 0.0)
    _edit_config(tmp_path / "peft", **changes)
    gm = lora_fx.apply(copy.deepcopy(captured), lora_fx.LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS, lora_dropout=0.2))
    before = (gm.code, {k: v.clone() for k, v in gm.state_dict().items()})
    with pytest.raises(AdapterError, match=message) as info:
        lora_fx.load_adapter(gm, tmp_path / "peft")
    assert "onto the model without adapters" in str(info.value)
    assert gm.code == before[0] and all(torch.equal(v, before[1][k]) for k, v in gm.state_dict().items())
    assert meta(gm)["adapters"]["default"].lora_alpha == 2


# ---- ONNX ---------------------------------------------------------------------------------------
def _onnx_dropouts(model) -> list[tuple[str, float]]:
    """(input name, ratio) of each LoRA Dropout node."""
    out = []
    for node in model.graph:
        if node.op_type == "Dropout":
            ratio = node.inputs[1].const_value.numpy() if len(node.inputs) > 1 else node.attributes["ratio"].value
            out.append((node.inputs[0].name, round(float(ratio), 6)))
    return sorted(out)


@pytest.mark.parametrize("applied, loaded", [(0.0, 0.4), (0.4, 0.0), (0.1, 0.4)])
def test_an_onnx_reload_runs_and_records_the_loaded_config(zoo, tmp_path, applied, loaded):
    from tests.exported import base_exported, ort_run, rel, save

    path = base_exported("bert").model_path
    pm = peft_wrap(zoo.model("bert"), r=4, lora_alpha=8, use_rslora=True, target_modules=TARGETS, alpha_pattern={"value": 3},
                   lora_dropout=loaded, init_lora_weights=False)
    pm.save_pretrained(str(tmp_path / "peft"))
    model = lora_fx.apply(lora_fx.load(path), lora_fx.LoraConfig(r=4, lora_alpha=32, target_modules=TARGETS, lora_dropout=applied))
    lora_fx.load_adapter(model, tmp_path / "peft")
    fresh = lora_fx.load_adapter(lora_fx.load(path), tmp_path / "peft")

    assert _onnx_dropouts(model) == _onnx_dropouts(fresh)
    assert len(_onnx_dropouts(model)) == (4 if loaded else 0)
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops == collections.Counter(n.op_type for n in fresh.graph)
    ratios = sorted(n for n in model.graph.initializers if n.endswith(".lora_dropout.ratio"))
    assert ratios == sorted(n for n in fresh.graph.initializers if n.endswith(".lora_dropout.ratio"))
    assert model.metadata_props["lora_fx.lora"] == fresh.metadata_props["lora_fx.lora"]

    b = inputs(2, 8, pad=2)
    feeds = {k: v.numpy() for k, v in b.items()}
    assert rel(ort_run(save(model, f"reload-{applied}-{loaded}.onnx"), feeds), run(pm, b).numpy()) <= 1e-5

    lora_fx.save_adapter(model, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (saved["lora_dropout"], saved["lora_alpha"], saved["use_rslora"], saved["alpha_pattern"]) == (loaded, 8, True, {"value": 3})
    from safetensors.numpy import load_file

    theirs, ours = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")), load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert sorted(theirs) == sorted(ours)
    assert max(float(np.abs(ours[k] - theirs[k]).max() / np.abs(theirs[k]).max()) for k in theirs) <= 1e-5


def test_an_onnx_reload_below_opset_12_sets_the_dropout_ratio_attribute(tmp_path):
    """Opset 7-11 Dropout takes its ratio as an attribute: a reload adds, changes and removes it there."""
    from tests.exported import lora_onnx

    model = lora_onnx("gemm-mlp", dropout=0.0)
    model.opset_imports[""] = 11
    lora_fx.save_adapter(model, tmp_path / "ad")
    for p in (0.3, 0.6, 0.0):
        _edit_config(tmp_path / "ad", lora_dropout=p)
        lora_fx.load_adapter(model, tmp_path / "ad")
        drops = [n for n in model.graph if n.op_type == "Dropout"]
        assert len(drops) == (3 if p else 0)
        assert all(len(n.inputs) == 1 and abs(n.attributes["ratio"].value - p) < 1e-7 for n in drops)
        assert not any(n.endswith(".lora_dropout.ratio") for n in model.graph.initializers)
        assert json.loads(model.metadata_props["lora_fx.lora_config"])["lora_dropout"] == p
