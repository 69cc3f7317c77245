"""nn.MultiheadAttention targeted as a whole, against PEFT's ``lora.MultiheadAttention``.

PEFT adapts ``in_proj_weight`` and wraps ``out_proj`` in a LoRA Linear, both with the attention module's
rank and alpha; its files key out_proj under ``<attn>.base_layer.out_proj``. lora_fx has an in_proj site
named after the attention module and an out_proj site ``<attn>.out_proj`` (``part_of`` the attention).

PEFT 0.21's forward adds out_proj's delta twice (``MultiheadAttention.merge`` writes ``W + dW`` and then
calls ``out_proj.merge``, which adds it again: see ``MultiheadAttention.merge`` in peft/tuners/lora/layer.py), so outputs are compared with the model PEFT's tensors
describe, ``W + s B A`` on both projections, and with PEFT's own forward where out_proj's B is zero.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import lora_fx
from lora_fx.adapters import WEIGHTS_NAME, peft_site_name
from lora_fx.errors import ConfigError, UnsupportedError
from lora_fx.passes.fx.capture import meta
from tests.models import max_rel, peft_lora_modules, peft_wrap

EMBED = 16


class _Block(torch.nn.Module):
    """Linears around a batch-first self-attention (``cross``: key/value other than the query)."""

    def __init__(self, cross: bool = False) -> None:
        super().__init__()
        self.cross = cross
        self.inp = torch.nn.Linear(8, EMBED)
        self.attn = torch.nn.MultiheadAttention(EMBED, 4, batch_first=True)
        self.fc = torch.nn.Linear(EMBED, 4)

    def forward(self, x):
        h = self.inp(x)
        kv = h * 2 if self.cross else h
        return self.fc(self.attn(h, kv, kv, need_weights=False)[0])


@pytest.fixture(scope="module")
def block() -> _Block:
    torch.manual_seed(0)
    return _Block().eval()


def _capture(model: torch.nn.Module) -> torch.fx.GraphModule:
    return lora_fx.capture(model, kwargs={"x": torch.randn(2, 5, 8)})


def _inputs():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(b, s, 8, generator=gen) for b, s in [(2, 5), (3, 7)]]


def _merged(model: torch.nn.Module, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> torch.nn.Module:
    """``model`` with ``W + scale * B A`` on the attention's in_proj ("attn") and out_proj ("attn.out_proj")."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for site, weight in (("attn", ref.attn.in_proj_weight), ("attn.out_proj", ref.attn.out_proj.weight)):
            a, b = pairs[site]
            weight += scale * b @ a
    return ref


def _ours(gm) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {site: (gm.get_submodule(site).lora_A.weight.detach(), gm.get_submodule(site).lora_B.weight.detach())
            for site in meta(gm)["lora_sites"]}


def _peft_pairs(pm) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's (A, B) per lora_fx site name."""
    names = {"attn": "attn", "attn.base_layer.out_proj": "attn.out_proj"}
    return {names[n]: (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach())
            for n, m in peft_lora_modules(pm).items()}


def _agrees_with_peft_forward(gm, pm, block) -> None:
    """PEFT's own forward, with its double-counted out_proj delta zeroed on both sides: in_proj and the keys match
    (and the adapters still matter, so the comparison can fail)."""
    pm.base_model.model.attn.base_layer.out_proj.lora_B["default"].weight.zero_()
    gm.get_submodule("attn.out_proj").lora_B.weight.zero_()
    for x in _inputs():
        assert max_rel(gm(x=x), pm(x)) <= 1e-5
        assert max_rel(pm(x), block(x)) > 1e-3


def test_targeting_the_attention_selects_in_proj_and_out_proj(block):
    gm = _capture(block)
    sites = lora_fx.find_sites(gm)
    assert {s.name: s.part_of for s in sites if s.kind.value == "linear"} == {
        "inp": None, "attn": None, "attn.out_proj": "attn", "fc": None}
    targets = lora_fx.select_targets(sites, lora_fx.LoraConfig(r=2, target_modules=["attn"]))
    assert [(t.site.name, t.part_of) for t in targets] == [("attn", None), ("attn.out_proj", "attn")]


@pytest.mark.parametrize("kwargs", [
    dict(target_modules=["attn"], rank_pattern={"attn": 3}, alpha_pattern={"attn": 12}),
    # PEFT gives out_proj the attention module's rank: a pattern on out_proj itself does not reach it.
    dict(target_modules=["attn"], rank_pattern={"out_proj": 3}),
    # PEFT wraps out_proj with the attention module even where exclude_modules names it.
    dict(target_modules=["attn", "fc"], exclude_modules=["out_proj"]),
    dict(target_modules=["out_proj"]),
], ids=["rank-alpha-of-attn", "out_proj-pattern", "out_proj-excluded", "out_proj-alone"])
def test_selection_rank_and_scale_equal_peft(block, kwargs):
    gm = _capture(block)
    config = lora_fx.LoraConfig(r=2, lora_alpha=4, **kwargs)
    ours = {peft_site_name(t.site.name, t.part_of): (t.r, t.scale) for t in lora_fx.select_targets(lora_fx.find_sites(gm), config)}
    wrapped = peft_lora_modules(peft_wrap(block, r=2, lora_alpha=4, **kwargs))
    assert ours == {n: (m.r["default"], pytest.approx(m.scaling["default"], rel=1e-12)) for n, m in wrapped.items()}


def test_peft_adapter_loads_with_the_outputs_its_tensors_describe(block, tmp_path):
    torch.manual_seed(2)
    pm = peft_wrap(block, r=2, lora_alpha=4, target_modules=["attn"], init_lora_weights=False)
    pm.save_pretrained(tmp_path)
    gm = lora_fx.load_adapter(_capture(block), tmp_path)
    assert {site: rec.get("part_of") for site, rec in meta(gm)["lora_sites"].items()} == {"attn": None, "attn.out_proj": "attn"}
    ref = _merged(block, _peft_pairs(pm), 2.0)
    with torch.no_grad():
        for x in _inputs():
            assert max_rel(gm(x=x), ref(x)) <= 1e-5
            assert max_rel(gm(x=x), block(x)) > 1e-3  # the adapters matter, so the comparison can fail
        _agrees_with_peft_forward(gm, pm, block)


def test_saved_adapter_loads_in_peft(block, tmp_path):
    import peft

    torch.manual_seed(3)
    gm = lora_fx.apply(_capture(block), lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=["attn"], init_lora_weights=False))
    lora_fx.save_adapter(gm, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["attn"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(block), tmp_path).eval()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    assert sorted(saved) == sorted(peft.get_peft_model_state_dict(pm))  # no key PEFT lacks or adds
    ours, theirs = _ours(gm), _peft_pairs(pm)
    assert set(ours) == set(theirs)
    for site in ours:
        for mine, peft_t in zip(ours[site], theirs[site]):
            assert torch.equal(mine, peft_t), site
    ref = _merged(block, ours, 2.0)
    with torch.no_grad():
        for x in _inputs():
            assert max_rel(gm(x=x), ref(x)) <= 1e-5
        _agrees_with_peft_forward(gm, pm, block)


def test_all_linear_saves_the_attention_as_peft_wraps_it(block, tmp_path):
    """all-linear reaches both projections (lora_fx adapts in_proj, which is no nn.Linear, as before); the file
    names the attention module once, so PEFT rebuilds the same two adapters instead of a second out_proj one."""
    import peft

    torch.manual_seed(4)
    gm = lora_fx.apply(_capture(block), lora_fx.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    assert meta(gm)["lora_sites"]["attn.out_proj"]["part_of"] == "attn"
    lora_fx.save_adapter(gm, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["attn", "fc", "inp"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(block), tmp_path).eval()
    assert set(peft_lora_modules(pm)) == {"attn", "attn.base_layer.out_proj", "fc", "inp"}
    assert torch.equal(pm.base_model.model.attn.base_layer.out_proj.lora_A["default"].weight,
                       gm.get_submodule("attn.out_proj").lora_A.weight)


def test_attention_and_its_out_proj_together_are_refused(block):
    """PEFT gives out_proj a second adapter its forward never runs (and saves out_proj's base weights with it)."""
    gm = _capture(block)
    code = gm.code
    with pytest.raises(ConfigError, match=r"matches both attn \(nn.MultiheadAttention.*and attn.out_proj inside it"):
        lora_fx.apply(gm, lora_fx.LoraConfig(r=2, target_modules=["attn", "out_proj"]))
    assert gm.code == code and not meta(gm).get("lora_sites")


def test_cross_attention_is_refused_with_the_way_out():
    """With a query other than key and value, in_proj_weight is split before the matmuls: no in_proj site."""
    torch.manual_seed(0)
    model = _Block(cross=True).eval()
    gm = _capture(model)
    assert [s.name for s in lora_fx.find_sites(gm) if s.kind.value == "linear"] == ["inp", "attn.out_proj", "fc"]
    with pytest.raises(UnsupportedError, match=r"attn, an nn.MultiheadAttention .* in_proj is no site.*\['attn.out_proj'\]"):
        lora_fx.apply(gm, lora_fx.LoraConfig(r=2, target_modules=["attn"]))
    assert not meta(gm).get("lora_sites")
    lora_fx.apply(gm, lora_fx.LoraConfig(r=2, target_modules=["attn.out_proj"]))
    assert list(meta(gm)["lora_sites"]) == ["attn.out_proj"]


@pytest.mark.slow
def test_onnx_export_in_both_modes(block, tmp_path):
    import onnxruntime as ort
    import peft
    from safetensors.torch import load_file

    torch.manual_seed(5)
    gm = lora_fx.apply(_capture(block), lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=["attn"], init_lora_weights=False))
    x = _inputs()[1]
    with torch.no_grad():
        want = gm(x=x).numpy()
    assert max_rel(torch.from_numpy(want), block(x)) > 1e-3
    options = ort.SessionOptions()
    options.log_severity_level = 3
    merged = lora_fx.export_onnx(gm, tmp_path / "merged.onnx", kwargs={"x": x}, mode="merged")
    got = ort.InferenceSession(str(merged.model_path), options).run(None, {"x": x.numpy()})[0]
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5
    result = lora_fx.export_onnx(gm, tmp_path / "slots.onnx", kwargs={"x": x}, mode="adapters")
    session = ort.InferenceSession(str(result.model_path), options)
    adapter = ort.LoraAdapter()
    adapter.Load(str(result.adapter_paths[0]))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(adapter)
    got = session.run(None, {"x": x.numpy()}, run_options)[0]
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5
    # The PEFT directory written beside it keys out_proj as PEFT does and loads there.
    (peft_dir,) = result.peft_dirs
    assert json.loads((peft_dir / "adapter_config.json").read_text())["target_modules"] == ["attn"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(block), peft_dir).eval()
    assert sorted(load_file(str(peft_dir / WEIGHTS_NAME))) == sorted(peft.get_peft_model_state_dict(pm))
    ours, theirs = _ours(gm), _peft_pairs(pm)
    for site in ours:
        for mine, peft_t in zip(ours[site], theirs[site]):
            assert torch.allclose(mine, peft_t, rtol=1e-6, atol=1e-7), site


class _Unused(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(EMBED, EMBED)
        self.attn = torch.nn.MultiheadAttention(EMBED, 4, batch_first=True)

    def forward(self, x):
        return self.fc(x)


def test_an_attention_with_no_site_is_refused_by_name():
    """PEFT would wrap it; lora_fx finds neither projection in the graph, and says so instead of skipping it."""
    gm = lora_fx.capture(_Unused().eval(), kwargs={"x": torch.randn(2, 5, EMBED)})
    with pytest.raises(UnsupportedError, match=r"matches attn \(nn.MultiheadAttention\), but neither its in_proj nor its out_proj"):
        lora_fx.apply(gm, lora_fx.LoraConfig(r=2, target_modules=["attn", "fc"]))
    lora_fx.apply(gm, lora_fx.LoraConfig(r=2, target_modules=["attn", "fc"], exclude_modules=["attn"]))
    assert list(meta(gm)["lora_sites"]) == ["fc"]
