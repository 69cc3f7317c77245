"""Prefix-tuning on Bloom (ALiBi attention with merged heads) against PEFT 0.21 with the installed transformers.

Bloom computes attention on ``[batch * heads, ...]`` tensors: ``baddbmm(alibi, q, kᵀ)`` → view ``[B, H, q, k]``
→ + mask → softmax → view back → ``bmm(·, v)``, and has no SDPA form (``set_attn_implementation("sdpa")`` leaves
it eager). PEFT puts the prefixes in a plain cache and prepends T ones to the attention mask, so ALiBi, built
from ``cumsum(mask) - 1``, gives prefix key t the bias ``slope * t`` and real key j ``slope * (T + cumsum_j - 1)``
(without a mask: ``slope * arange(T + n)``). The adapters are PEFT's own, through PEFT's files.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import lora_fx
from lora_fx.passes.fx import insert_prefix as insert_prefix_mod
from lora_fx.passes.fx.capture import meta
from lora_fx.passes.fx.fold_prefix import fold_prefix
from lora_fx.sites import SiteKind
from tests.models import VOCAB, inputs, max_rel, run
from tests.shared_exports import captured_from

T = 5
SITES = ["transformer.h.0.self_attention", "transformer.h.1.self_attention"]
# (batch, seq, padded positions in the last row, left padding?)
SHAPES = [(2, 8, 0, False), (3, 11, 4, False), (1, 5, 0, False), (4, 13, 6, False), (3, 9, 3, True)]


def bloom() -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    return tf.BloomForCausalLM(tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)).eval()


def batch(size: int, seq: int, pad: int = 0, left: bool = False) -> dict[str, torch.Tensor]:
    b = inputs(size, seq, pad=pad, seed=size + seq)
    if left:
        b["attention_mask"][-1] = b["attention_mask"][-1].flip(0)
    return b


def _peft(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    import peft

    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T, **kwargs)
    return peft.get_peft_model(copy.deepcopy(model), cfg).eval()


def _assert_parity(gm, pm, base, shapes=SHAPES, mask=True):
    for size, seq, pad, left in shapes:
        b = batch(size, seq, pad, left)
        if not mask:
            del b["attention_mask"]
        ours, theirs = run(gm, b), run(pm, b)
        assert ours.shape == theirs.shape
        # Padded positions are garbage in both; compare the real tokens.
        keep = b["attention_mask"].bool() if mask else torch.ones(ours.shape[:2], dtype=torch.bool)
        assert max_rel(ours[keep], theirs[keep]) <= 1e-5, (size, seq, pad, left)
        assert max_rel(run(base, b)[keep], theirs[keep]) > 1e-2


def test_bloom_attention_is_found_with_its_heads():
    gm = captured_from(bloom)
    sites = [s for s in lora_fx.find_sites(gm) if s.kind is SiteKind.ATTENTION]
    assert [s.name for s in sites] == SITES
    assert {(s.op, s.num_heads, s.kv_heads, s.head_dim) for s in sites} == {("eager_bmm", 4, 4, 8)}


def test_multihead_attention_is_no_prefix_site():
    """nn.MultiheadAttention's own bmm-softmax-bmm (3-D, no [B, H, q, k] view) is not taken for Bloom's form."""

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    gm = lora_fx.capture(Block().eval(), (torch.randn(2, 6, 16),))
    assert any(n.target is torch.ops.aten.bmm.default for n in gm.graph.nodes)
    assert not [s for s in lora_fx.find_sites(gm) if s.kind is SiteKind.ATTENTION]


def test_peft_adapter_gives_peft_outputs(tmp_path):
    base = bloom()
    pm = _peft(base)
    pm.save_pretrained(tmp_path)
    gm = captured_from(bloom)
    lora_fx.load_adapter(gm, tmp_path)
    rec = meta(gm)["prefix"]
    assert list(rec["sites"]) == SITES and {(s["kv_heads"], s["head_dim"]) for s in rec["sites"].values()} == {(4, 8)}
    _assert_parity(gm, pm, base)


def test_without_a_mask_alibi_counts_over_t_plus_n(tmp_path):
    base = bloom()
    pm = _peft(base)
    pm.save_pretrained(tmp_path)
    gm = captured_from(bloom, ("input_ids",))
    lora_fx.load_adapter(gm, tmp_path)
    _assert_parity(gm, pm, base, [s for s in SHAPES if not s[2]], mask=False)


def test_alibi_must_number_the_prefix_keys(tmp_path, monkeypatch):
    """ALiBi widened with zeros for the prefix keys (their bias left out, real keys not moved by T) is not PEFT's."""
    base = bloom()
    pm = _peft(base)
    pm.save_pretrained(tmp_path)
    gm = captured_from(bloom)

    def zeros(graph, bias, t, site):
        with graph.inserting_before(bias.next):
            return insert_prefix_mod._call(graph, bias, torch.ops.aten.constant_pad_nd.default, bias, [t, 0], 0.0)

    monkeypatch.setattr(insert_prefix_mod, "_widened_key_bias", zeros)
    lora_fx.load_adapter(gm, tmp_path)
    b = batch(3, 11, 4)
    keep = b["attention_mask"].bool()
    assert max_rel(run(gm, b)[keep], run(pm, b)[keep]) > 1e-3


def test_alibi_cumsum_is_no_position_to_move():
    """Bloom's cumsum of the mask feeds ALiBi only: PEFT moves no positions of Bloom, nor does the pass."""
    gm = captured_from(bloom)
    result = insert_prefix_mod.insert_prefix(gm, lora_fx.PrefixConfig(num_virtual_tokens=T))
    assert result.changed == SITES


@pytest.mark.parametrize("projection", [False, True])
def test_saved_adapter_loads_in_peft(tmp_path, projection):
    import peft

    base = bloom()
    gm = lora_fx.apply(captured_from(bloom),
                       lora_fx.PrefixConfig(num_virtual_tokens=T, prefix_projection=projection, encoder_hidden_size=24))
    if projection:
        # A trained encoder (its last layer starts at PEFT's init, not zero here): the prefixes are its output.
        with torch.no_grad():
            for p in gm.get_submodule(insert_prefix_mod.ENCODER).parameters():
                p.normal_()
    lora_fx.save_adapter(gm, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    _assert_parity(gm, pm, base, SHAPES[:2])


def test_projection_matches_peft_then_folds(tmp_path):
    base = bloom()
    pm = _peft(base, prefix_projection=True, encoder_hidden_size=24)
    pm.train()  # PEFT runs its prefix encoder outside inference mode; no dropout in it
    pm.get_base_model().eval()
    with torch.no_grad():  # a trained encoder: PEFT's init moves this tiny model's outputs by under 1%
        for p in pm.prompt_encoder["default"].parameters():
            p.normal_()
    gm = lora_fx.apply(captured_from(bloom),
                       lora_fx.PrefixConfig(num_virtual_tokens=T, prefix_projection=True, encoder_hidden_size=24))
    gm.get_submodule(insert_prefix_mod.ENCODER).load_state_dict(pm.prompt_encoder["default"].state_dict())
    _assert_parity(gm, pm, base, SHAPES[:2])
    b = batch(3, 11, 4)
    before = run(gm, b)
    assert fold_prefix(gm).modified and not hasattr(gm, insert_prefix_mod.ENCODER)
    assert max_rel(run(gm, b), before) <= 1e-6
    assert gm.get_submodule(SITES[1]).prefix_value.shape == (4, T, 8)
    _assert_parity(gm, pm, base, SHAPES[:2])


@pytest.mark.slow
def test_export_with_adapter_slots_runs_in_onnx_runtime(tmp_path):
    """The prefix-tuned Bloom exports with its prefixes as ORT adapter slots; swapping in another adapter's
    prefixes gives that adapter's torch outputs."""
    import onnxruntime as ort

    base = bloom()
    gm = lora_fx.apply(captured_from(bloom), lora_fx.PrefixConfig(num_virtual_tokens=T))
    result = lora_fx.export_onnx(gm, tmp_path / "bloom.onnx", kwargs=inputs(2, 8), mode="adapters")
    assert sorted(result.sites) == SITES
    sess = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    slots = {i.name for i in sess.get_overridable_initializers()}
    assert {f"{s}.prefix_{w}" for s in SITES for w in ("key", "value")} <= slots
    other = _peft(base)
    other.save_pretrained(tmp_path / "other")
    swapped = lora_fx.load_adapter(captured_from(bloom), tmp_path / "other")
    feeds_other = {f"{s}.prefix_{w}": getattr(swapped.get_submodule(s), f"prefix_{w}").detach().numpy()
                   for s in SITES for w in ("key", "value")}
    for size, seq, pad, left in SHAPES[1:]:
        b = batch(size, seq, pad, left)
        keep = b["attention_mask"].bool().numpy()
        feeds = {k: v.numpy() for k, v in b.items()}
        for model, extra in ((gm, {}), (swapped, feeds_other)):
            ours = sess.run(None, {**feeds, **extra})[0]
            ref = run(model, b).numpy()
            assert np.abs(ours[keep] - ref[keep]).max() / np.abs(ref[keep]).max() <= 1e-4, (size, seq, pad, left)
    # The exported PEFT directory is the same adapter.
    back = lora_fx.load_adapter(captured_from(bloom), result.peft_dirs[0])
    b = batch(3, 11, 4)
    assert max_rel(run(back, b), run(gm, b)) <= 1e-6


class _Merged(torch.nn.Module):
    """Attention on [B*H, ...] tensors as Bloom writes it, with no score bias or a bias from the hidden states."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.bias = bias
        self.q, self.k, self.v = (torch.nn.Linear(16, 32) for _ in range(3))

    def heads(self, t, b, s):
        return t.view(b, s, 4, 8).transpose(1, 2).reshape(b * 4, s, 8)

    def forward(self, x, pk=None, pv=None):
        b, s, _ = x.shape
        q, k, v = (self.heads(f(x), b, s) for f in (self.q, self.k, self.v))
        if pk is not None:  # the reference: prefixes [H, T, D] in front, batch-major as [B, H] merges
            k = torch.cat([pk.repeat(b, 1, 1), k], 1)
            v = torch.cat([pv.repeat(b, 1, 1), v], 1)
        if self.bias:
            bias = x.sum(-1).repeat_interleave(4, 0)[:, None, :]
            scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=8 ** -0.5)
        else:
            scores = torch.bmm(q, k.transpose(1, 2)) * 8 ** -0.5
        p = torch.softmax(scores.view(b, 4, s, -1), dim=-1).view(b * 4, s, -1)
        return torch.bmm(p, v).view(b, 4, s, 8).transpose(1, 2).reshape(b, s, 32)


def test_merged_heads_without_a_bias_take_prefixes_in_their_layout():
    torch.manual_seed(0)
    mod = _Merged(bias=False).eval()
    gm = lora_fx.capture(mod, (torch.randn(2, 6, 16),))
    lora_fx.apply(gm, lora_fx.PrefixConfig(num_virtual_tokens=3))
    site = next(iter(meta(gm)["prefix"]["sites"]))
    prefix = gm.get_submodule(site) if site else gm
    assert prefix.prefix_key.shape == (4, 3, 8)
    for b, s in [(2, 6), (3, 9)]:
        x = torch.randn(b, s, 16)
        with torch.no_grad():
            ref = mod(x, prefix.prefix_key, prefix.prefix_value)
            assert max_rel(gm(x), ref) <= 1e-6
            assert max_rel(mod(x), ref) > 1e-2


def test_a_key_bias_lora_fx_cannot_recompute_is_refused_before_any_change():
    gm = lora_fx.capture(_Merged(bias=True).eval(), (torch.randn(2, 6, 16),))
    code = gm.code
    with pytest.raises(lora_fx.errors.UnsupportedError, match="adds a bias over its keys .* use LoRA"):
        lora_fx.apply(gm, lora_fx.PrefixConfig(num_virtual_tokens=3))
    assert gm.code == code and not [n for n, _ in gm.named_parameters() if "prefix" in n]


def test_the_replaced_alibi_leaves_no_dead_nodes():
    """The widened ALiBi replaces the original in every layer; the original's nodes used to stay in the graph,
    computed each forward and read by nothing. What the capture left dead itself stays as it was."""

    def dead(gm):
        return {n.name for n in gm.graph.nodes if n.op == "call_function" and not n.users and not n.is_impure()}

    gm = captured_from(bloom)
    before, nodes = dead(gm), {n.name for n in gm.graph.nodes}
    insert_prefix_mod.insert_prefix(gm, lora_fx.PrefixConfig(num_virtual_tokens=T))
    assert dead(gm) == before
    erased = nodes - {n.name for n in gm.graph.nodes}
    assert erased and "attention_mask" not in erased  # the mask the widened copy starts from is still read
