"""insert_prefix: PEFT's prefix-tuning adapters give PEFT's outputs through our rewritten graphs.

The reference is PEFT 0.21 itself (its prefixes live in the transformers KV cache, which also moves
the real tokens to positions T..T+n-1); the adapters are PEFT's own random ``prompt_embeddings``,
loaded through PEFT's file format, so layout, ordering and positions are all under test.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import lora_fx
from lora_fx.errors import AdapterError, ConfigError, TargetNotFoundError, UnsupportedError
from lora_fx.passes.fx import insert_prefix as insert_prefix_mod
from lora_fx.passes.fx.capture import meta
from lora_fx.passes.fx.fold_prefix import fold_prefix
from tests.models import build, inputs, max_rel, run
from tests.shared_exports import captured

T = 5
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION", "minilm": "FEATURE_EXTRACTION",
        "gptj": "CAUSAL_LM", "opt": "CAUSAL_LM", "roberta": "FEATURE_EXTRACTION"}
# Sizes other than the capture example (2, 8), with right padding in the last row.
SHAPES = [(2, 8, 0), (3, 11, 4), (1, 5, 0), (4, 13, 6)]


def _peft(model: torch.nn.Module, name: str, **kwargs) -> torch.nn.Module:
    import peft

    cfg = peft.PrefixTuningConfig(task_type=TASK[name], num_virtual_tokens=kwargs.pop("num_virtual_tokens", T), **kwargs)
    return peft.get_peft_model(copy.deepcopy(model), cfg).eval()


def _model(name: str, attn: str) -> torch.nn.Module:
    m = build(name)
    if attn != "sdpa":
        m.set_attn_implementation(attn)
    return m


def _assert_parity(gm, pm, base, shapes=SHAPES):
    for batch, seq, pad in shapes:
        b = inputs(batch, seq, pad=pad, seed=batch + seq)
        ours, theirs = run(gm, b), run(pm, b)
        assert ours.shape == theirs.shape
        # Padded positions are garbage in both; compare the real tokens (all of them when pad=0).
        keep = b["attention_mask"].bool()
        assert max_rel(ours[keep], theirs[keep]) <= 1e-5, (batch, seq, pad)
        # The prefixes really change the output, so the comparison above can fail.
        assert max_rel(ours[keep], run(base, b)[keep]) > 1e-2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_peft_adapter_loads_and_gives_peft_outputs(tmp_path, name, attn):
    base = _model(name, attn)
    pm = _peft(base, name)
    pm.save_pretrained(tmp_path)
    gm = captured(name, attn)
    lora_fx.load_adapter(gm, tmp_path)
    rec = meta(gm)["prefix"]
    assert rec["num_virtual_tokens"] == T and len(rec["sites"]) == 2
    if name == "llama":  # grouped-query: prefixes are sized by the 2 key/value heads, not the 4 query heads
        assert {s["kv_heads"] for s in rec["sites"].values()} == {2}
        assert gm.get_submodule("model.layers.0.self_attn").prefix_key.shape == (2, T, 8)
    _assert_parity(gm, pm, base)


def test_a_prefix_adapter_for_another_model_leaves_a_bare_capture_unchanged(tmp_path):
    """Embeddings sized for GPT-2 onto a Llama capture: refused before any prefix slot is inserted."""
    from safetensors.torch import load_file

    from lora_fx.errors import AdapterError

    _peft(_model("gpt2", "sdpa"), "gpt2").save_pretrained(tmp_path)
    assert "prompt_embeddings" in load_file(str(tmp_path / "adapter_model.safetensors"))
    gm = captured("llama")
    code = gm.code
    with pytest.raises(AdapterError, match="was the adapter trained on another model"):
        lora_fx.load_adapter(gm, tmp_path)
    assert gm.code == code and not meta(gm).get("prefix")
    assert not [n for n, _ in gm.named_parameters() if "prefix" in n]


@pytest.mark.parametrize("name", ["gptj", "opt", "roberta"])
def test_positions_from_a_table_or_a_running_count_move_by_t(tmp_path, name):
    """GPT-J gathers rotary sin/cos rows from a table; OPT (from the mask) and RoBERTa (from the tokens)
    number positions with a cumsum. Under PEFT all of them start at T; without the offset parity fails."""
    base = build(name)
    pm = _peft(base, name)
    pm.save_pretrained(tmp_path)
    gm = captured(name)
    lora_fx.load_adapter(gm, tmp_path)
    _assert_parity(gm, pm, base, SHAPES[:3])


@pytest.mark.slow
def test_minilm_parity(tmp_path):
    base = build("minilm")
    pm = _peft(base, "minilm", num_virtual_tokens=3)
    pm.save_pretrained(tmp_path)
    gm = captured("minilm")
    lora_fx.load_adapter(gm, tmp_path)
    _assert_parity(gm, pm, base, SHAPES[:2])


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_positions_must_move_by_t(tmp_path, name, monkeypatch):
    """Without the position offset the rewrite is not PEFT's: the offset is what makes parity hold."""
    base = build(name)
    pm = _peft(base, name)
    pm.save_pretrained(tmp_path)
    gm = captured(name)
    monkeypatch.setattr(insert_prefix_mod, "offset_positions", lambda graph, t, keep=(): [])
    lora_fx.load_adapter(gm, tmp_path)
    b = inputs(2, 8)
    assert max_rel(run(gm, b), run(pm, b)) > 1e-3


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_saved_adapter_loads_in_peft(tmp_path, name):
    import peft

    base = build(name)
    gm = lora_fx.apply(captured(name), lora_fx.PrefixConfig(num_virtual_tokens=4))
    lora_fx.save_adapter(gm, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "PREFIX_TUNING" and "target_modules" not in data
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    _assert_parity(gm, pm, base, SHAPES[:2])


def test_projection_matches_peft_then_folds_and_saves(tmp_path):
    import peft

    base = build("gpt2")
    pm = _peft(base, "gpt2", prefix_projection=True, encoder_hidden_size=24)
    pm.train()  # PEFT runs its prefix encoder outside inference mode; no dropout in it
    base_copy = pm.get_base_model()
    base_copy.eval()
    gm = lora_fx.apply(captured("gpt2"),
                       lora_fx.PrefixConfig(num_virtual_tokens=T, prefix_projection=True, encoder_hidden_size=24))
    ours_enc, theirs_enc = gm.get_submodule("prefix_encoder"), pm.prompt_encoder["default"]
    ours_enc.load_state_dict(theirs_enc.state_dict())
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable == {"prefix_encoder.embedding.weight"} | {f"prefix_encoder.transform.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    _assert_parity(gm, pm, base, SHAPES[:2])
    # Folding replaces the MLP by its output: same numbers, raw prefixes as trainable parameters.
    b = inputs(3, 11, pad=4)
    before = run(gm, b)
    result = fold_prefix(gm)
    assert result.modified and not hasattr(gm, "prefix_encoder")
    assert "prefix_encoder" not in gm.code
    assert max_rel(run(gm, b), before) <= 1e-6
    assert gm.get_submodule("transformer.h.1.attn").prefix_value.shape == (4, T, 8)
    lora_fx.save_adapter(gm, tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert max_rel(run(reloaded, b)[b["attention_mask"].bool()], before[b["attention_mask"].bool()]) <= 1e-5


@pytest.mark.slow
def test_projection_saves_folded_without_folding_the_graph(tmp_path):
    gm = lora_fx.apply(captured("bert"), lora_fx.PrefixConfig(num_virtual_tokens=3, prefix_projection=True))
    lora_fx.save_adapter(gm, tmp_path)
    fresh = lora_fx.load_adapter(captured("bert"), tmp_path)
    b = inputs(3, 9, pad=2)
    keep = b["attention_mask"].bool()
    assert max_rel(run(fresh, b)[keep], run(gm, b)[keep]) <= 1e-5


@pytest.mark.slow
def test_training_moves_only_the_prefixes():
    gm = lora_fx.apply(captured("gpt2"), lora_fx.PrefixConfig(num_virtual_tokens=4))
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.attn.prefix_{w}" for i in (0, 1) for w in ("key", "value")}
    batch = inputs(4, 10)

    def loss_fn(out, b):
        logits = out["logits"] if not isinstance(out, torch.Tensor) else out
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b["input_ids"][:, 1:].reshape(-1))

    result = lora_fx.train(gm, [batch], loss_fn, steps=25, lr=0.2, progress=False)
    # A tiny random GPT-2 (weights ~N(0, 0.02)) sits near ln(96); the prefixes alone move it by ~0.1.
    assert result.final_loss < result.losses[0] - 0.05
    assert result.trainable_parameters == 2 * 2 * 4 * 4 * 8
    for n, p in gm.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (n in trainable), n


@pytest.mark.parametrize("value", [0, -3, True, 2.5])
def test_bad_num_virtual_tokens_is_a_config_error(value):
    with pytest.raises(ConfigError, match="num_virtual_tokens must be a positive integer"):
        lora_fx.PrefixConfig(num_virtual_tokens=value)


def test_model_without_attention_is_refused():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    gm = lora_fx.capture(mlp, (torch.randn(2, 8),))
    with pytest.raises(TargetNotFoundError, match="no attention site"):
        lora_fx.apply(gm, lora_fx.PrefixConfig(num_virtual_tokens=4))


def test_second_prefix_and_unknown_site_are_refused(zoo):
    gm = lora_fx.apply(zoo.gm("bert"), lora_fx.PrefixConfig(num_virtual_tokens=2))
    code = gm.code
    with pytest.raises(AdapterError, match="already has prefixes"):
        lora_fx.apply(gm, lora_fx.PrefixConfig(num_virtual_tokens=2))
    assert gm.code == code
    with pytest.raises(TargetNotFoundError, match="attention sites"):
        lora_fx.apply(zoo.gm("bert"), lora_fx.PrefixConfig(num_virtual_tokens=2, target_modules=["nothing"]))


def test_subset_of_sites_trains_but_cannot_be_saved_in_peft_format(zoo, tmp_path):
    gm = lora_fx.apply(zoo.gm("llama"), lora_fx.PrefixConfig(num_virtual_tokens=2, target_modules=r".*layers\.1\.self_attn"))
    assert list(meta(gm)["prefix"]["sites"]) == ["model.layers.1.self_attn"]
    with pytest.raises(AdapterError, match="every layer"):
        lora_fx.save_adapter(gm, tmp_path / "a")
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()


def test_config_round_trips_and_reads_peft_files(tmp_path):
    cfg = lora_fx.PrefixConfig(num_virtual_tokens=7, prefix_projection=True, encoder_hidden_size=16, target_modules=["attn"])
    assert lora_fx.PrefixConfig.from_json(cfg.to_json()) == cfg
    import peft

    peft.PrefixTuningConfig(num_virtual_tokens=9, token_dim=32, num_layers=2, num_attention_heads=4,
                            prefix_projection=True, encoder_hidden_size=64).save_pretrained(tmp_path)
    read = lora_fx.PrefixConfig.from_pretrained(tmp_path)
    assert (read.num_virtual_tokens, read.token_dim, read.num_layers, read.num_attention_heads, read.encoder_hidden_size) == (9, 32, 2, 4, 64)
    assert read.prefix_projection is True
    with pytest.raises(ConfigError, match="not prefix-tuning"):
        lora_fx.PrefixConfig.from_dict({"peft_type": "LORA", "num_virtual_tokens": 3})


# ---- hand-built attention forms: is_causal, grouped-query with enable_gqa ------------------------
class _Attn(torch.nn.Module):
    def __init__(self, heads=4, kv_heads=4, hd=8, causal=True, mask=False):
        super().__init__()
        self.heads, self.kv, self.hd, self.causal, self.use_mask = heads, kv_heads, hd, causal, mask
        self.q = torch.nn.Linear(16, heads * hd)
        self.k = torch.nn.Linear(16, kv_heads * hd)
        self.v = torch.nn.Linear(16, kv_heads * hd)

    def qkv(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.k(x).view(b, s, self.kv, self.hd).transpose(1, 2)
        v = self.v(x).view(b, s, self.kv, self.hd).transpose(1, 2)
        return q, k, v

    def forward(self, x, mask=None):
        q, k, v = self.qkv(x)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal, enable_gqa=self.kv != self.heads)
        return o.transpose(1, 2).flatten(2)


def _reference(mod: _Attn, x, pk, pv, causal_offset: bool, mask=None):
    """Prefix attention written out: cat in front of K and V, prefix columns always visible."""
    q, k, v = mod.qkv(x)
    rep = mod.heads // mod.kv
    k = torch.cat([pk.expand(x.shape[0], -1, -1, -1), k], 2).repeat_interleave(rep, 1)
    v = torch.cat([pv.expand(x.shape[0], -1, -1, -1), v], 2).repeat_interleave(rep, 1)
    s, n = x.shape[1], k.shape[2]
    if causal_offset:
        mask = torch.arange(n)[None, :] <= torch.arange(s)[:, None] + (n - s)
    elif mask is not None:
        mask = torch.cat([torch.ones(*mask.shape[:-1], n - s, dtype=torch.bool), mask], -1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o.transpose(1, 2).flatten(2)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_is_causal_becomes_a_mask_offset_by_t(kv_heads):
    torch.manual_seed(0)
    mod = _Attn(kv_heads=kv_heads).eval()
    gm = lora_fx.capture(mod, (torch.randn(2, 6, 16),))
    lora_fx.apply(gm, lora_fx.PrefixConfig(num_virtual_tokens=3))
    site = next(iter(meta(gm)["prefix"]["sites"]))
    prefix = gm.get_submodule(site) if site else gm
    assert prefix.prefix_key.shape == (kv_heads, 3, 8)
    for b, s in [(2, 6), (3, 9), (1, 2)]:
        x = torch.randn(b, s, 16)
        with torch.no_grad():
            ref = _reference(mod, x, prefix.prefix_key, prefix.prefix_value, causal_offset=True)
            assert max_rel(gm(x), ref) <= 1e-6
            assert max_rel(mod(x), ref) > 1e-2


def test_boolean_mask_gains_visible_columns():
    torch.manual_seed(0)
    mod = _Attn(causal=False).eval()
    mask = torch.rand(2, 1, 6, 6) > 0.3
    mask[..., 0] = True
    gm = lora_fx.capture(mod, (torch.randn(2, 6, 16), mask))
    lora_fx.apply(gm, lora_fx.PrefixConfig(num_virtual_tokens=4))
    site = next(iter(meta(gm)["prefix"]["sites"]))
    prefix = gm.get_submodule(site) if site else gm
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        ref = _reference(mod, x, prefix.prefix_key, prefix.prefix_value, causal_offset=False, mask=mask)
        assert max_rel(gm(x, mask), ref) <= 1e-6


def test_an_attention_module_run_by_several_layers_is_refused():
    """ALBERT runs one attention module per layer: prefixes, named by module path, cannot tell the layers apart."""

    class Shared(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = _Attn(causal=False)
            self.proj = torch.nn.Linear(32, 16)

        def forward(self, x):
            return self.attn(self.proj(self.attn(x)))

    gm = lora_fx.capture(Shared().eval(), (torch.randn(2, 6, 16),))
    code = gm.code
    with pytest.raises(UnsupportedError, match="attn runs 2 times per forward.*Use LoRA"):
        lora_fx.apply(gm, lora_fx.PrefixConfig(num_virtual_tokens=2))
    assert gm.code == code and not [n for n, _ in gm.named_parameters() if "prefix" in n]
