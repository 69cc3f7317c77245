"""Adapter files in PEFT's format, both ways: ours load in PEFT, PEFT's load here, same outputs."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch

import lora_fx
from lora_fx.adapters import WEIGHTS_NAME, from_deployment_layout, parse_peft_key, to_deployment_layout
from lora_fx.errors import AdapterError, ConfigError
from lora_fx.passes.fx.capture import meta
from tests.models import TINY, inputs, max_rel, peft_lora_modules, peft_wrap, run

CONFIGS = {
    "bert": dict(r=4, lora_alpha=8, target_modules=["query", "value"], rank_pattern={"value": 2}, alpha_pattern={"query": 3}),
    "gpt2": dict(r=4, lora_alpha=16, target_modules="all-linear"),
    "llama": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], use_rslora=True),
}


def _randomize_b(module_pairs):
    """PEFT and lora_fx start B at zero; give the adapter a visible effect."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in module_pairs:
            b.copy_(torch.randn(b.shape, generator=gen) * 0.5)


@pytest.mark.parametrize("name", TINY)
def test_our_adapter_loads_in_peft_with_our_outputs(zoo, name, tmp_path):
    from peft import PeftModel

    gm = lora_fx.apply(zoo.gm(name), lora_fx.LoraConfig(**CONFIGS[name]))
    _randomize_b([gm.get_submodule(s).lora_B.weight for s in meta(gm)["lora_sites"]])
    lora_fx.save_adapter(gm, tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", WEIGHTS_NAME]
    pm = PeftModel.from_pretrained(copy.deepcopy(zoo.model(name)), str(tmp_path / "ad")).eval()
    assert set(peft_lora_modules(pm)) == set(meta(gm)["lora_sites"])
    for batch, seq, pad in [(2, 8, 3), (3, 13, 0)]:
        b = inputs(batch, seq, pad=pad, seed=seq)
        ours = run(gm, b)
        assert max_rel(ours, run(pm, b)) <= 1e-5
        assert max_rel(ours, run(zoo.model(name), b)) > 1e-3


@pytest.mark.parametrize("name", TINY)
def test_peft_adapter_loads_here_with_peft_outputs(zoo, name, tmp_path):
    pm = peft_wrap(zoo.model(name), **CONFIGS[name])
    _randomize_b([m.lora_B["default"].weight for m in peft_lora_modules(pm).values()])
    pm.save_pretrained(str(tmp_path / "peft"), safe_serialization=True)
    gm = lora_fx.load_adapter(zoo.gm(name), tmp_path / "peft")
    for batch, seq, pad in [(2, 8, 3), (1, 6, 0)]:
        b = inputs(batch, seq, pad=pad, seed=seq)
        ours = run(gm, b)
        assert max_rel(ours, run(pm, b)) <= 1e-5
        assert max_rel(ours, run(zoo.model(name), b)) > 1e-3


def test_loading_onto_an_applied_model_takes_the_files_scales(zoo, tmp_path):
    pm = peft_wrap(zoo.model("bert"), **CONFIGS["bert"])
    _randomize_b([m.lora_B["default"].weight for m in peft_lora_modules(pm).values()])
    pm.save_pretrained(str(tmp_path / "peft"))
    # Same ranks, other alphas: the loaded config's scales must replace the applied ones.
    gm = lora_fx.apply(zoo.gm("bert"), lora_fx.LoraConfig(r=4, lora_alpha=1, target_modules=["query", "value"], rank_pattern={"value": 2}))
    lora_fx.load_adapter(gm, tmp_path / "peft")
    b = inputs(2, 8, pad=2)
    assert max_rel(run(gm, b), run(pm, b)) <= 1e-5


def test_config_json_round_trip_through_our_files(zoo, tmp_path):
    cfg = lora_fx.LoraConfig(**CONFIGS["bert"])
    lora_fx.save_adapter(lora_fx.apply(zoo.gm("bert"), cfg), tmp_path / "ad")
    back = lora_fx.LoraConfig.from_pretrained(tmp_path / "ad")
    assert back == cfg
    import peft

    theirs = peft.LoraConfig.from_pretrained(str(tmp_path / "ad"))
    assert (theirs.r, theirs.lora_alpha, theirs.rank_pattern, theirs.alpha_pattern) == (4, 8, {"value": 2}, {"query": 3})


def test_all_linear_is_saved_as_the_expanded_names(zoo, tmp_path):
    gm = lora_fx.apply(zoo.gm("llama"), lora_fx.LoraConfig(r=2, target_modules="all-linear"))
    lora_fx.save_adapter(gm, tmp_path / "ad")
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(meta(gm)["lora_sites"])
    assert "lm_head" not in saved["target_modules"]


def test_wrong_shape_is_refused_with_the_expected_shape(zoo, tmp_path):
    pm = peft_wrap(zoo.model("llama"), r=4, target_modules=["q_proj"])
    pm.save_pretrained(str(tmp_path / "r4"))
    gm = lora_fx.apply(zoo.gm("llama"), lora_fx.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterError) as info:
        lora_fx.load_adapter(gm, tmp_path / "r4")
    msg = str(info.value)
    assert "has shape (4, 32)" in msg and "expects (2, 32)" in msg


def test_adapter_for_other_sites_is_refused(zoo, tmp_path):
    peft_wrap(zoo.model("llama"), r=2, target_modules=["k_proj"]).save_pretrained(str(tmp_path / "k"))
    gm = lora_fx.apply(zoo.gm("llama"), lora_fx.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match="has no LoRA slot in this model"):
        lora_fx.load_adapter(gm, tmp_path / "k")


def test_missing_tensors_are_refused(zoo, tmp_path):
    from safetensors.torch import load_file, save_file

    peft_wrap(zoo.model("llama"), r=2, target_modules=["q_proj"]).save_pretrained(str(tmp_path / "a"))
    path = tmp_path / "a" / WEIGHTS_NAME
    tensors = {k: v for k, v in load_file(str(path)).items() if "layers.1" not in k or "lora_A" not in k}
    save_file(tensors, str(path))
    gm = zoo.gm("llama")
    code = gm.code
    with pytest.raises(AdapterError, match=r"lacks tensors for: model.layers.1.self_attn.q_proj.lora_A"):
        lora_fx.load_adapter(gm, tmp_path / "a")
    # Refused before anything changed: no adapter was applied to the model on the way.
    assert not meta(gm).get("lora_sites") and gm.code == code
    assert not any(".lora_" in n for n, _ in gm.named_parameters())


class _Trap:
    """Unpickling this creates a file: proof that a loader unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_weights_are_never_read(zoo, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    lora_fx.LoraConfig(r=2, target_modules=["q_proj"]).save_pretrained(d)
    marker = tmp_path / "unpickled"
    (d / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(AdapterError, match="adapter_model.bin, a pickle file lora_fx never reads"):
        lora_fx.load_adapter(zoo.gm("llama"), d)
    assert not marker.exists()


def test_corrupt_or_missing_files_are_refused(zoo, tmp_path):
    with pytest.raises(AdapterError, match="is not a directory"):
        lora_fx.load_adapter(zoo.gm("llama"), tmp_path / "nowhere")
    d = tmp_path / "bad"
    d.mkdir()
    with pytest.raises(ConfigError, match="adapter_config.json not found"):
        lora_fx.load_adapter(zoo.gm("llama"), d)
    lora_fx.LoraConfig(r=2, target_modules=["q_proj"]).save_pretrained(d)
    with pytest.raises(AdapterError, match="not found"):
        lora_fx.load_adapter(zoo.gm("llama"), d)
    (d / WEIGHTS_NAME).write_bytes(b"\x00garbage")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        lora_fx.load_adapter(zoo.gm("llama"), d)


def test_save_without_adapter_is_refused(zoo, tmp_path):
    with pytest.raises(AdapterError, match="no LoRA adapter to save"):
        lora_fx.save_adapter(zoo.gm("bert"), tmp_path / "x")
    assert not (tmp_path / "x" / WEIGHTS_NAME).exists()


def test_deployment_layout_round_trip():
    a, b = torch.randn(4, 32), torch.randn(16, 4)
    da, db = to_deployment_layout(a, b, 2.5)
    assert da.shape == (32, 4) and db.shape == (4, 16)
    x = torch.randn(3, 32)
    torch.testing.assert_close(x @ da @ db, 2.5 * (x @ a.t() @ b.t()))
    ra, rb = from_deployment_layout(da, db, 2.5)
    torch.testing.assert_close(ra, a)
    torch.testing.assert_close(rb, b)


def test_peft_keys_parse_with_and_without_adapter_name():
    assert parse_peft_key("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight") == ("model.layers.0.mlp.up_proj", "A")
    assert parse_peft_key("base_model.model.h.0.attn.lora_B.default.weight") == ("h.0.attn", "B")
    with pytest.raises(AdapterError, match="not a LoRA weight key"):
        parse_peft_key("base_model.model.classifier.weight")


def test_an_interrupted_peft_dir_write_leaves_no_folder_behind(tmp_path, monkeypatch):
    """lora-fx export --adapters interrupted while it wrote the PEFT folder left an empty <name>/ folder, later
    read as an adapter without weights. The folder is written under a temporary name and renamed into place."""
    import os

    import safetensors.torch

    from lora_fx.cli import main
    from tests.exported import lora_onnx, ort_run, rel, save
    from tests.onnx_corpus import corpus

    entry = corpus().get("gemm-mlp")
    lora = lora_onnx("gemm-mlp", r=4, alpha=6)
    src = save(lora, "adapters-interrupted.onnx")
    want = ort_run(src, entry.feeds())
    real_save = safetensors.torch.save_file

    def interrupted(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    out = tmp_path / "served.onnx"
    assert main(["export", str(src), "-o", str(out), "--adapters", "--name", "legal"]) == 130  # "interrupted"
    adapters = tmp_path / "served.adapters"
    # The adapter files are written before the model: interrupted, the export leaves nothing at all.
    assert not adapters.exists() and not out.exists()
    # Interrupted while writing the config instead: the same.
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)

    def config_interrupted(self, directory):
        raise KeyboardInterrupt

    monkeypatch.setattr(lora_fx.LoraConfig, "save_pretrained", config_interrupted)
    assert main(["export", str(src), "-o", str(out), "--adapters", "--name", "legal"]) == 130
    assert not adapters.exists() and not out.exists()
    monkeypatch.undo()
    # Uninterrupted: the folder appears whole, with a new folder's permissions, and loads back as the trained adapter.
    assert main(["export", str(src), "-o", str(out), "--adapters", "--name", "legal"]) == 0
    peft_dir = adapters / "legal"
    assert sorted(p.name for p in peft_dir.iterdir()) == ["adapter_config.json", WEIGHTS_NAME]
    umask = os.umask(0)
    os.umask(umask)
    assert peft_dir.stat().st_mode & 0o777 == 0o777 & ~umask
    fresh = lora_fx.load_adapter(lora_fx.load(entry.path), peft_dir)
    assert rel(ort_run(save(fresh, "adapters-interrupted-back.onnx"), entry.feeds()), want) <= 1e-6
    # Into the existing folder, interrupted: its two files stay whole, as they were, and no temporary file is left.
    kept = {p.name: p.read_bytes() for p in peft_dir.iterdir()}
    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lora_fx.save_adapter(lora_onnx("gemm-mlp", r=4, alpha=6, seed=1), peft_dir)
    assert {p.name: p.read_bytes() for p in peft_dir.iterdir()} == kept
    assert sorted(p.name for p in adapters.iterdir()) == ["legal", "legal.onnx_adapter", "legal.onnx_adapter.json"]
