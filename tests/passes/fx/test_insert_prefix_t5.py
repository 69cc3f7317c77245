"""Prefix-tuning on T5 against PEFT 0.21 with the installed transformers.

PEFT reaches T5 only as SEQ_2_SEQ_LM (``T5ForConditionalGeneration``): its prefixes live in the
decoder's self-attention cache, so they get T5's relative position bias for keys at 0..T-1 seen from
queries at T+i; the encoder (transformers drops the cache there) and the cross-attention (PEFT empties
that cache) get none, and decoder layer l reads block 2l mod num_layers of ``prompt_embeddings``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lora_fx
from lora_fx.errors import AdapterError, UnsupportedError
from lora_fx.passes.fx import insert_prefix as insert_prefix_mod
from lora_fx.passes.fx.capture import meta
from tests.models import VOCAB, max_rel
from tests.shared_exports import captured, captured_with

T = 3
SHAPES = [(2, 8, 5), (3, 11, 7), (1, 4, 9)]


def t5(cls: str = "T5ForConditionalGeneration", layers: int = 2, attn: str = "sdpa") -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_decoder_layers=layers,
                      num_heads=4, decoder_start_token_id=0, pad_token_id=0)
    model = getattr(tf, cls)(cfg).eval()
    model.set_attn_implementation(attn)
    return model


def t5_inputs(batch: int, seq: int, dec: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.randint(1, VOCAB, (batch, dec), generator=gen)}


def _captured(layers: int = 2, attn: str = "sdpa") -> torch.fx.GraphModule:
    """A fresh copy of the capture of ``t5(layers=layers, attn=attn)`` at ``t5_inputs(2, 8, 5)``: several tests start
    from the same one, captured once per process (tests/shared_exports.py)."""
    return captured_with(t5, t5_inputs, 2, 8, 5, build_args=("T5ForConditionalGeneration", layers, attn))


def _logits(model, b):
    out = model(**b)
    return out["logits"] if isinstance(out, dict) or hasattr(out, "keys") else out[0]


def _peft(model, **kwargs):
    import peft

    cfg = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=T, **kwargs)
    return peft.get_peft_model(copy.deepcopy(model), cfg).eval()


def _assert_parity(gm, pm, base):
    for batch, seq, dec in SHAPES:
        b = t5_inputs(batch, seq, dec, seed=batch)
        ours, theirs = _logits(gm, b), _logits(pm, b)
        assert max_rel(ours, theirs) <= 1e-5, (batch, seq, dec)
        assert max_rel(_logits(base, b), theirs) > 1e-2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layers", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_peft_seq2seq_adapter_gives_peft_outputs(tmp_path, attn, layers):
    base = t5(layers=layers, attn=attn)
    pm = _peft(base)
    pm.save_pretrained(tmp_path)
    gm = _captured(layers, attn)
    lora_fx.load_adapter(gm, tmp_path)
    rec = meta(gm)["prefix"]
    # Only the decoder's self-attention: not the encoder, not the cross-attention.
    assert list(rec["sites"]) == [f"decoder.block.{i}.layer.0.SelfAttention" for i in range(layers)]
    assert [s["block"] for s in rec["sites"].values()] == [(2 * i) % layers for i in range(layers)]
    _assert_parity(gm, pm, base)


def test_prefix_keys_get_their_relative_position_bias(tmp_path, monkeypatch):
    """With the prefix columns of T5's position bias left at 0 (lora_fx before), PEFT parity fails."""
    base = t5()
    pm = _peft(base)
    pm.save_pretrained(tmp_path)
    gm = _captured()
    real = insert_prefix_mod._prefix_bias

    def zero_bias(graph, anchor, rb, t, like):
        return insert_prefix_mod._call(graph, anchor, torch.ops.aten.mul.Tensor, real(graph, anchor, rb, t, like), 0.0)

    monkeypatch.setattr(insert_prefix_mod, "_prefix_bias", zero_bias)
    lora_fx.load_adapter(gm, tmp_path)
    b = t5_inputs(2, 8, 5)
    assert max_rel(_logits(gm, b), _logits(pm, b)) > 1e-3


def test_saved_adapter_loads_in_peft_and_tied_layers_train_together(tmp_path):
    import peft

    base = t5()
    gm = lora_fx.apply(_captured(), lora_fx.PrefixConfig(num_virtual_tokens=T))
    # Two decoder layers read PEFT's block 0: one parameter, as PEFT trains it.
    a, b = (gm.get_submodule(f"decoder.block.{i}.layer.0.SelfAttention") for i in (0, 1))
    assert a.prefix_key is b.prefix_key and a.prefix_value is b.prefix_value
    lora_fx.save_adapter(gm, tmp_path)
    cfg = peft.PeftConfig.from_pretrained(tmp_path)
    assert cfg.num_transformer_submodules == 2 and cfg.task_type == "SEQ_2_SEQ_LM" and cfg.num_layers == 2
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    _assert_parity(gm, pm, base)
    # Untied prefixes cannot be written in PEFT's layout.
    with torch.no_grad():
        b.prefix_key = torch.nn.Parameter(b.prefix_key + 1)
    with pytest.raises(AdapterError, match="same block"):
        lora_fx.save_adapter(gm, tmp_path / "untied")


def test_projection_matches_peft_then_folds_tied(tmp_path):
    import peft

    from lora_fx.passes.fx.fold_prefix import fold_prefix

    base = t5()
    pm = _peft(base, prefix_projection=True, encoder_hidden_size=16)
    gm = lora_fx.apply(_captured(), lora_fx.PrefixConfig(num_virtual_tokens=T, prefix_projection=True, encoder_hidden_size=16))
    gm.get_submodule(insert_prefix_mod.ENCODER).load_state_dict(pm.prompt_encoder["default"].state_dict())
    _assert_parity(gm, pm, base)
    assert fold_prefix(gm).modified
    a, b = (gm.get_submodule(f"decoder.block.{i}.layer.0.SelfAttention") for i in (0, 1))
    assert a.prefix_key is b.prefix_key
    _assert_parity(gm, pm, base)
    lora_fx.save_adapter(gm, tmp_path)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    _assert_parity(gm, back, base)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_t5_encoder_is_refused(attn):
    """PEFT never prefixes T5's encoder (FEATURE_EXTRACTION on T5EncoderModel fails with a mask, and changes
    nothing without one): no PEFT behaviour to match, so lora_fx refuses instead of inventing one."""
    import peft

    base = t5("T5EncoderModel", attn=attn)
    b = t5_inputs(2, 8, 5)
    del b["decoder_input_ids"]
    pm = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=T))
    with pytest.raises(RuntimeError):
        pm(**b)
    assert max_rel(pm(input_ids=b["input_ids"])[0], base(input_ids=b["input_ids"])[0]) < 1e-5
    gm = lora_fx.capture(base, kwargs=b)
    code = gm.code
    with pytest.raises(UnsupportedError, match="never reaches a T5 encoder"):
        lora_fx.apply(gm, lora_fx.PrefixConfig(num_virtual_tokens=T))
    assert gm.code == code


def test_encoder_or_cross_attention_sites_are_refused_by_name():
    gm = _captured()
    for site in ("encoder.block.0.layer.0.SelfAttention", "decoder.block.0.layer.1.EncDecAttention"):
        with pytest.raises(UnsupportedError, match=f"{site} cannot take a prefix"):
            lora_fx.apply(gm, lora_fx.PrefixConfig(num_virtual_tokens=T, target_modules=[site]))
    assert not meta(gm).get("prefix")


def test_layout_of_the_adapter_must_match_the_model(tmp_path):
    lora_fx.PrefixConfig(num_virtual_tokens=T, num_transformer_submodules=2).save_pretrained(tmp_path)
    gm = captured("gpt2")  # the zoo's capture of build("gpt2") at inputs(2, 8), shared with the other modules
    with pytest.raises(AdapterError, match="num_transformer_submodules=2"):
        lora_fx.apply(gm, lora_fx.PrefixConfig.from_pretrained(tmp_path))
