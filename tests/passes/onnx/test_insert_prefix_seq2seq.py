"""ONNX insert_prefix on an exported encoder-decoder (BART) against PEFT 0.21's SEQ_2_SEQ_LM prefix-tuning.

PEFT prefixes only the decoder's self-attention (decoder layer l reads block 2l mod num_layers of
``prompt_embeddings``), moves only the decoder's learned positions and prepends T ones to
``decoder_attention_mask`` (tests/passes/fx/test_insert_prefix_seq2seq.py). The ONNX pass finds the roles
from the graph and does the same: the file (dynamo or TorchScript export) run by ONNX Runtime gives PEFT's logits.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

import lora_fx
from lora_fx.errors import UnsupportedError
from lora_fx.passes.onnx import insert_prefix as insert_prefix_mod
from lora_fx.passes.onnx.find_sites import find_sites
from lora_fx.passes.onnx.insert_prefix import encoder_decoder_roles, prefix_metadata, seq2seq_roles
from tests.models import max_rel
from tests.passes.fx.test_insert_prefix_seq2seq import DECODER, SHAPES, batch, seq2seq

T = 3
HEADS, HEAD_DIM = 4, 8
# The exported BART fixtures take over 10 s to build on 2 cores.
pytestmark = pytest.mark.slow


def _export(path, masks, family="bart"):
    """A tiny BART (or ``family``) exported as the project's tests export models: dynamo, opset 18, dynamic batch and
    lengths; ``masks="encoder"`` leaves decoder_attention_mask out of the file's inputs."""
    model = seq2seq(family)
    model.config.use_cache = False
    kwargs = batch(2, 8, 5, masks)
    b, s, d = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("dec")
    dims = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s},
            "decoder_input_ids": {0: b, 1: d}, "decoder_attention_mask": {0: b, 1: d}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), str(path), kwargs=kwargs, dynamo=True, opset_version=18, input_names=list(kwargs),
                          output_names=["logits"], dynamic_shapes={k: dims[k] for k in kwargs}, verbose=False)
    return path


@pytest.fixture(scope="module")
def bart_onnx(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("bart") / "bart.onnx", "both")


@pytest.fixture(scope="module")
def bart_onnx_no_decoder_mask(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("bart_enc") / "bart.onnx", "encoder")


def _peft(base):
    import peft

    cfg = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=T)
    return peft.get_peft_model(copy.deepcopy(base), cfg).eval()


def _peft_block(pm, block):
    """PEFT's key/value prefixes of one block of prompt_embeddings as [heads, T, head_dim], read from PEFT's
    documented layout (rows 2b, 2b+1 of the [T, num_layers*2, heads, head_dim] view)."""
    emb = pm.prompt_encoder["default"].embedding.weight.detach()
    view = emb.reshape(T, -1, HEADS, HEAD_DIM)
    return view[:, 2 * block].permute(1, 0, 2).numpy(), view[:, 2 * block + 1].permute(1, 0, 2).numpy()


def _set_prefixes(model, pm):
    """Write PEFT's prefix values into the file's prefix initializers, each site from its recorded block."""
    import onnx_ir as ir

    rec = prefix_metadata(model)
    for site in rec["sites"].values():
        for which, array in zip(("key", "value"), _peft_block(pm, site["block"])):
            value = model.graph.initializers[site[which]]
            value.const_value = ir.Tensor(np.ascontiguousarray(array, dtype=np.float32), name=site[which])


def _session(model, path):
    lora_fx.save(model, path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(sess, x):
    return torch.from_numpy(sess.run(None, {i.name: x[i.name].numpy() for i in sess.get_inputs()})[0])


def _logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def _unpadded(x):
    return {k: torch.ones_like(v) if k.endswith("attention_mask") else v for k, v in x.items()}


def test_roles_are_found_in_the_onnx_graph(bart_onnx):
    sites = find_sites(lora_fx.load(bart_onnx))
    cross, encoder = encoder_decoder_roles(sites)
    assert [s.name for s in cross] == [f"model.decoder.layers.{i}.encoder_attn" for i in range(2)]
    assert [s.name for s in encoder] == [f"model.encoder.layers.{i}.self_attn" for i in range(2)]
    assert [s.name for s in seq2seq_roles(sites).decoder] == DECODER


@pytest.mark.parametrize("masks", ["both", "encoder"])
def test_bart_prefix_matches_peft(bart_onnx, bart_onnx_no_decoder_mask, tmp_path, masks):
    base = seq2seq("bart")
    pm = _peft(base)
    model = lora_fx.load(bart_onnx if masks == "both" else bart_onnx_no_decoder_mask)
    result = lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=T, task_type="SEQ_2_SEQ_LM"))
    assert result is model
    rec = prefix_metadata(model)
    # The decoder's self-attention only, both layers reading PEFT's block 0 through one initializer pair.
    assert list(rec["sites"]) == DECODER
    assert [s["block"] for s in rec["sites"].values()] == [0, 0]
    assert (rec["num_transformer_submodules"], rec["num_blocks"]) == (2, 2)
    assert len({s["key"] for s in rec["sites"].values()}) == 1
    assert not [n for n in model.graph.initializers if "prefix" in n and not n.startswith(DECODER[0])]
    _set_prefixes(model, pm)
    sess = _session(model, tmp_path / "prefixed.onnx")
    for b, s, d in SHAPES:
        padded = batch(b, s, d, masks, seed=b)
        for x in (padded, _unpadded(padded)):
            ours, theirs = _run(sess, x), _logits(pm, x)
            assert max_rel(ours, theirs) <= 1e-5, (b, s, d)
            assert max_rel(_logits(base, x), theirs) > 1e-2


@pytest.mark.parametrize("family", ["marian", "pegasus", "mbart"])  # sinusoidal (Marian, Pegasus) and learned positions
def test_other_families_match_peft(tmp_path, family):
    base = seq2seq(family)
    pm = _peft(base)
    model = lora_fx.load(_export(tmp_path / "m.onnx", "both", family))
    lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=T))
    assert list(prefix_metadata(model)["sites"]) == DECODER
    _set_prefixes(model, pm)
    sess = _session(model, tmp_path / "prefixed.onnx")
    for b, s, d in SHAPES:
        x = batch(b, s, d, seed=b)
        assert max_rel(_run(sess, x), _logits(pm, x)) <= 1e-5, (b, s, d)


def test_tied_sites_refuse_different_prefixes(bart_onnx):
    """Both decoder layers read PEFT's block 0 through one initializer: prefixes given apart must agree."""
    from lora_fx.errors import AdapterError
    from lora_fx.passes.onnx.insert_prefix import InsertPrefix, select_prefix_sites

    model = lora_fx.load(bart_onnx)
    config = lora_fx.PrefixConfig(num_virtual_tokens=T)
    sites = select_prefix_sites(find_sites(model), config)
    torch.manual_seed(0)
    prefixes = {s.name: (torch.randn(HEADS, T, HEAD_DIM), torch.randn(HEADS, T, HEAD_DIM)) for s in sites}
    with pytest.raises(AdapterError, match="same block 0"):
        InsertPrefix(config, sites, prefixes)(model)
    assert not prefix_metadata(model)
    prefixes[DECODER[1]] = prefixes[DECODER[0]]
    InsertPrefix(config, sites, prefixes)(model)
    init = model.graph.initializers[prefix_metadata(model)["sites"][DECODER[1]]["key"]]
    assert np.array_equal(init.const_value.numpy(), prefixes[DECODER[0]][0].numpy())


def test_encoder_positions_stay(bart_onnx, tmp_path, monkeypatch):
    """Moving the encoder's learned positions by T as well (a model-wide offset) breaks parity with PEFT."""
    base = seq2seq("bart")
    pm = _peft(base)
    real = insert_prefix_mod.offset_positions
    monkeypatch.setattr(insert_prefix_mod, "offset_positions", lambda graph, t, keep=frozenset(): real(graph, t))
    model = lora_fx.load(bart_onnx)
    lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=T))
    _set_prefixes(model, pm)
    x = batch(2, 8, 5)
    assert max_rel(_run(_session(model, tmp_path / "p.onnx"), x), _logits(pm, x)) > 1e-3


def test_encoder_or_cross_attention_sites_are_refused_by_name(bart_onnx):
    model = lora_fx.load(bart_onnx)
    before = set(model.graph.initializers)
    for site, role in (("model.encoder.layers.0.self_attn", "the encoder's self-attention"),
                       ("model.decoder.layers.1.encoder_attn", "a cross-attention")):
        with pytest.raises(UnsupportedError, match=f"{site} cannot take a prefix: it is {role}.*Select decoder self-attention"):
            lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=T, target_modules=[site]))
    assert not prefix_metadata(model) and set(model.graph.initializers) == before
    # A decoder-only layout (num_transformer_submodules=1) does not fit an encoder-decoder.
    with pytest.raises(Exception, match="num_transformer_submodules=1"):
        lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=T, num_transformer_submodules=1))
    assert not prefix_metadata(model) and set(model.graph.initializers) == before
    # A decoder self-attention subset is allowed.
    lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=T, target_modules=[DECODER[1]]))
    assert list(prefix_metadata(model)["sites"]) == [DECODER[1]]


def test_peft_adapter_round_trips_through_the_prefixed_file(bart_onnx, tmp_path):
    """PEFT -> file: a SEQ_2_SEQ_LM adapter loads into the prefix slots apply made; file -> PEFT: save_adapter's
    directory loads in PEFT with the same outputs."""
    import peft

    base = seq2seq("bart")
    pm = _peft(base)
    pm.save_pretrained(tmp_path / "peft")
    model = lora_fx.apply(lora_fx.load(bart_onnx), lora_fx.PrefixConfig(num_virtual_tokens=T))
    lora_fx.load_adapter(model, tmp_path / "peft")
    x = batch(3, 11, 7, seed=3)
    assert max_rel(_run(_session(model, tmp_path / "p.onnx"), x), _logits(pm, x)) <= 1e-5
    lora_fx.save_adapter(model, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert back.peft_config["default"].task_type == "SEQ_2_SEQ_LM"
    assert max_rel(_logits(back, x), _logits(pm, x)) <= 1e-5


def test_peft_adapter_loads_onto_a_fresh_file(bart_onnx, tmp_path):
    """load_adapter of a SEQ_2_SEQ_LM adapter onto a file without prefixes inserts them as apply would (it used to
    be refused, pointing to the torch route); one of another size is refused before anything changes."""
    from safetensors.torch import load_file, save_file

    base = seq2seq("bart")
    pm = _peft(base)
    pm.save_pretrained(tmp_path / "peft")
    model = lora_fx.load(bart_onnx)
    lora_fx.load_adapter(model, tmp_path / "peft")
    x = batch(2, 9, 6, seed=4)
    assert max_rel(_run(_session(model, tmp_path / "p.onnx"), x), _logits(pm, x)) <= 1e-5
    bad = tmp_path / "bad"
    pm.save_pretrained(bad)
    weights = load_file(str(bad / "adapter_model.safetensors"))
    save_file({k: v[:, :-8].contiguous() for k, v in weights.items()}, str(bad / "adapter_model.safetensors"))
    fresh = lora_fx.load(bart_onnx)
    with pytest.raises(lora_fx.AdapterError, match=r"prompt_embeddings has shape \(3, 120\).*need \[T, 128\]"):
        lora_fx.load_adapter(fresh, bad)
    assert not prefix_metadata(fresh)


def test_decoder_only_adapter_is_refused_on_the_file(bart_onnx, tmp_path):
    """A decoder-only layout adapter of the right size would otherwise be inserted at every site."""
    from safetensors.torch import save_file

    model = lora_fx.load(bart_onnx)
    lora_fx.PrefixConfig(num_virtual_tokens=T).save_pretrained(tmp_path / "flat")
    save_file({"prompt_embeddings": torch.zeros(T, 6 * 2 * 32)}, str(tmp_path / "flat" / "adapter_model.safetensors"))
    with pytest.raises(UnsupportedError, match="encoder-decoder"):
        lora_fx.load_adapter(model, tmp_path / "flat")
    assert not prefix_metadata(model)


class _Logits(torch.nn.Module):
    """BartForConditionalGeneration returning its logits alone, for the TorchScript exporter (positional inputs)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.lm = model

    def forward(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                       decoder_attention_mask=decoder_attention_mask, use_cache=False).logits


def test_torchscript_export_matches_peft(tmp_path):
    base = seq2seq("bart", "eager")
    pm = _peft(base)
    names = ["input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"]
    x0 = batch(2, 8, 5)
    path = tmp_path / "bart_ts.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(base), tuple(x0[n] for n in names), str(path), dynamo=False, opset_version=17,
                          input_names=names, output_names=["logits"], dynamic_axes={n: {0: "batch", 1: f"{n}_len"} for n in names})
    model = lora_fx.apply(lora_fx.load(path), lora_fx.PrefixConfig(num_virtual_tokens=T))
    assert list(prefix_metadata(model)["sites"]) == [f"lm.{s}" for s in DECODER]
    _set_prefixes(model, pm)
    sess = _session(model, tmp_path / "prefixed.onnx")
    for b, s, d in SHAPES:
        padded = batch(b, s, d, seed=b)
        for x in (padded, _unpadded(padded)):
            assert max_rel(_run(sess, x), _logits(pm, x)) <= 1e-5, (b, s, d)
