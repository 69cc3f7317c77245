"""Prefix-tuning on encoder-decoder models other than T5 (BART, Marian, Pegasus, mBART) against PEFT 0.21.

PEFT's SEQ_2_SEQ_LM (``num_transformer_submodules=2``) puts the prefixes in the decoder's self-attention cache
only: transformers never hands the cache to the encoder, PEFT empties the cross-attention cache, decoder layer l
reads block 2l mod num_layers of ``prompt_embeddings``, only the decoder's learned or sinusoidal positions start
at T (``cache_length``), and PEFT prepends T ones to ``decoder_attention_mask``. lora_fx finds the roles from the
graph (cross-attention projects its keys from the encoder's output), not from module names.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lora_fx
from lora_fx.errors import UnsupportedError
from lora_fx.passes.fx import insert_prefix as insert_prefix_mod
from lora_fx.passes.fx.capture import meta
from lora_fx.passes.fx.fold_prefix import fold_prefix
from tests.models import VOCAB, max_rel
from tests.shared_exports import captured, captured_with

T = 3
SHAPES = [(2, 8, 5), (3, 11, 7), (1, 4, 9)]
FAMILIES = {
    "bart": ("BartConfig", "BartForConditionalGeneration"),
    "marian": ("MarianConfig", "MarianMTModel"),  # sinusoidal positions
    "pegasus": ("PegasusConfig", "PegasusForConditionalGeneration"),
    "mbart": ("MBartConfig", "MBartForConditionalGeneration"),
}
DECODER = [f"model.decoder.layers.{i}.self_attn" for i in range(2)]


def seq2seq(family: str = "bart", attn: str = "sdpa", encoder_layers: int = 2, decoder_layers: int = 2) -> torch.nn.Module:
    import transformers as tf

    cfg_cls, cls = FAMILIES[family]
    torch.manual_seed(0)
    cfg = getattr(tf, cfg_cls)(
        vocab_size=VOCAB, d_model=32, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    )
    model = getattr(tf, cls)(cfg).eval()
    model.set_attn_implementation(attn)
    return model


def batch(b: int, seq: int, dec: int, masks: str = "both", seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids; ``masks``: "both", "encoder" (attention_mask only), "decoder" or "none". The last row is padded."""
    gen = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(3, VOCAB, (b, seq), generator=gen),
           "decoder_input_ids": torch.randint(3, VOCAB, (b, dec), generator=gen)}
    if masks in ("both", "encoder"):
        mask = torch.ones(b, seq, dtype=torch.long)
        mask[-1, seq - 2:] = 0
        out["attention_mask"] = mask
    if masks in ("both", "decoder"):
        mask = torch.ones(b, dec, dtype=torch.long)
        mask[-1, 1] = 0  # a hole every later query must not see, prefix or not
        out["decoder_attention_mask"] = mask
    return out


def _captured(family: str = "bart", attn: str = "sdpa", masks: str = "both", encoder_layers: int = 2,
              decoder_layers: int = 2) -> torch.fx.GraphModule:
    """A fresh copy of the capture of ``seq2seq(...)`` at ``batch(2, 8, 5, masks)``: several tests start from the
    same one, captured once per process (tests/shared_exports.py)."""
    return captured_with(seq2seq, batch, 2, 8, 5, masks, build_args=(family, attn, encoder_layers, decoder_layers))


def _logits(model, b):
    with torch.no_grad():
        out = model(**b)
    return out["logits"] if isinstance(out, dict) or hasattr(out, "keys") else out[0]


def _peft(model, **kwargs):
    import peft

    cfg = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=T, **kwargs)
    return peft.get_peft_model(copy.deepcopy(model), cfg).eval()


def _assert_parity(gm, pm, base, masks="both"):
    for b, seq, dec in SHAPES:
        x = batch(b, seq, dec, masks, seed=b)
        ours, theirs = _logits(gm, x), _logits(pm, x)
        assert max_rel(ours, theirs) <= 1e-5, (b, seq, dec)
        assert max_rel(_logits(base, x), theirs) > 1e-2


@pytest.mark.parametrize("masks", ["both", "none", pytest.param("encoder", marks=pytest.mark.slow),
                                   pytest.param("decoder", marks=pytest.mark.slow)])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_peft_bart_adapter_gives_peft_outputs(tmp_path, attn, masks):
    base = seq2seq("bart", attn)
    pm = _peft(base)
    pm.save_pretrained(tmp_path)
    gm = _captured("bart", attn, masks)
    lora_fx.load_adapter(gm, tmp_path)
    rec = meta(gm)["prefix"]
    # The decoder's self-attention only: neither the encoder nor the cross-attention (encoder_attn).
    assert list(rec["sites"]) == DECODER
    assert [s["block"] for s in rec["sites"].values()] == [0, 0]
    _assert_parity(gm, pm, base, masks)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["marian", "pegasus", "mbart"])
def test_other_families_match_peft(tmp_path, family):
    base = seq2seq(family)
    pm = _peft(base)
    pm.save_pretrained(tmp_path)
    gm = _captured(family)
    lora_fx.load_adapter(gm, tmp_path)
    assert list(meta(gm)["prefix"]["sites"]) == DECODER
    _assert_parity(gm, pm, base)


def test_encoder_positions_stay(tmp_path, monkeypatch):
    """Moving the encoder's learned positions by T as well (what a model-wide offset does) breaks parity."""
    base = seq2seq("bart")
    pm = _peft(base)
    pm.save_pretrained(tmp_path)
    gm = _captured()
    real = insert_prefix_mod.offset_positions
    monkeypatch.setattr(insert_prefix_mod, "offset_positions", lambda graph, t, keep=frozenset(): real(graph, t))
    lora_fx.load_adapter(gm, tmp_path)
    x = batch(2, 8, 5)
    assert max_rel(_logits(gm, x), _logits(pm, x)) > 1e-3


@pytest.mark.parametrize("projection", [False, True])
def test_saved_adapter_loads_in_peft(tmp_path, projection):
    """lora_fx -> PEFT: apply, (train), save; PEFT loads the directory and computes what the graph computes."""
    import peft

    base = seq2seq("bart")
    extra = {"prefix_projection": True, "encoder_hidden_size": 16} if projection else {}
    gm = lora_fx.apply(_captured(), lora_fx.PrefixConfig(num_virtual_tokens=T, **extra))
    a, b = (gm.get_submodule(s) for s in DECODER) if not projection else (None, None)
    if projection:
        pm = _peft(base, **extra)
        gm.get_submodule(insert_prefix_mod.ENCODER).load_state_dict(pm.prompt_encoder["default"].state_dict())
        _assert_parity(gm, pm, base)
        assert fold_prefix(gm).modified
        a, b = (gm.get_submodule(s) for s in DECODER)
    # Both decoder layers read PEFT's block 0: one parameter.
    assert a.prefix_key is b.prefix_key and a.prefix_value is b.prefix_value
    lora_fx.save_adapter(gm, tmp_path)
    cfg = peft.PeftConfig.from_pretrained(tmp_path)
    assert (cfg.task_type, cfg.num_transformer_submodules, cfg.num_layers) == ("SEQ_2_SEQ_LM", 2, 2)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    _assert_parity(gm, back, base)


def test_encoder_or_cross_attention_sites_are_refused_by_name():
    gm = _captured()
    code = gm.code
    for site, role in (("model.encoder.layers.0.self_attn", "the encoder's self-attention"),
                       ("model.decoder.layers.1.encoder_attn", "a cross-attention")):
        with pytest.raises(UnsupportedError, match=f"{site} cannot take a prefix: it is {role}"):
            lora_fx.apply(gm, lora_fx.PrefixConfig(num_virtual_tokens=T, target_modules=[site]))
    assert not meta(gm).get("prefix") and gm.code == code
    # A decoder self-attention subset is PEFT's layout minus some layers: allowed, it is not saved in PEFT's format.
    lora_fx.apply(gm, lora_fx.PrefixConfig(num_virtual_tokens=T, target_modules=[DECODER[1]]))
    assert list(meta(gm)["prefix"]["sites"]) == [DECODER[1]]


def test_roles_come_from_the_graph():
    from lora_fx.passes.fx.find_sites import find_sites

    gm = _captured("bart", "eager")
    roles = insert_prefix_mod.seq2seq_roles(find_sites(gm))
    assert [s.name for s in roles.encoder] == [f"model.encoder.layers.{i}.self_attn" for i in range(2)]
    assert [s.name for s in roles.decoder] == DECODER
    assert [s.name for s in roles.cross] == [f"model.decoder.layers.{i}.encoder_attn" for i in range(2)]


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_models_without_cross_attention_have_no_roles(name):
    from lora_fx.passes.fx.find_sites import find_sites

    gm = captured(name)  # the zoo's capture of build(name) at inputs(2, 8), shared with the other modules
    assert insert_prefix_mod.seq2seq_roles(find_sites(gm)) is None


@pytest.mark.slow
@pytest.mark.parametrize("projection", [False, True])
def test_fewer_decoder_than_encoder_layers_match_peft(tmp_path, projection):
    """PEFT sizes prompt_embeddings by the encoder (num_layers=3) and decoder layer l reads block 2l mod 3
    (distilbart-style 3 encoder / 2 decoder layers); both directions of the file round trip."""
    import peft

    base = seq2seq("bart", encoder_layers=3, decoder_layers=2)
    extra = {"prefix_projection": True, "encoder_hidden_size": 16} if projection else {}
    pm = _peft(base, **extra)
    gm = _captured(encoder_layers=3, decoder_layers=2)
    if projection:
        lora_fx.apply(gm, lora_fx.PrefixConfig(num_virtual_tokens=T, **extra))
        gm.get_submodule(insert_prefix_mod.ENCODER).load_state_dict(pm.prompt_encoder["default"].state_dict())
    else:
        pm.save_pretrained(tmp_path / "peft")
        lora_fx.load_adapter(gm, tmp_path / "peft")
    assert [s["block"] for s in meta(gm)["prefix"]["sites"].values()] == [0, 2]
    _assert_parity(gm, pm, base)
    lora_fx.save_adapter(gm, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert back.peft_config["default"].num_layers == 3
    _assert_parity(gm, back, base)


def test_more_decoder_than_encoder_layers_are_refused():
    """PEFT's cache then has no entry for decoder layer 2 and fails (IndexError): nothing to match."""
    gm = _captured(encoder_layers=2, decoder_layers=3)
    with pytest.raises(UnsupportedError, match="2 encoder and 3 decoder layers"):
        lora_fx.apply(gm, lora_fx.PrefixConfig(num_virtual_tokens=T))
    assert not meta(gm).get("prefix")
