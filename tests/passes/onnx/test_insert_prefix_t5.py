"""ONNX insert_prefix on T5 files against PEFT 0.21's SEQ_2_SEQ_LM prefix-tuning (dynamo with SDPA or eager attention,
the opset-23 ``Attention`` op, TorchScript).

PEFT's prefix reaches T5 only through the decoder's self-attention cache: the T prefix keys sit at positions 0..T-1
and the decoder's queries at T..T+n-1, so T5's relative position bias (computed by the first decoder layer, shared
by all) gives prefix key t the bucket of ``t - T - i`` while the real keys keep theirs
(tests/passes/fx/test_insert_prefix_t5.py). The ONNX pass copies the file's own bucketing nodes onto those positions.
Checked here: outputs with and without padding, one step's prefix gradients, the PEFT directory save_adapter
writes, the served export (``lora-fx export --adapters``), a subset of the decoder layers against the FX front end,
and the refusals (a T5 encoder alone, which PEFT never prefixes).
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from contextlib import redirect_stdout

import numpy as np
import onnxruntime as ort
import pytest
import torch

import lora_fx
from lora_fx.errors import UnsupportedError
from lora_fx.passes.onnx.find_sites import find_sites
from lora_fx.passes.onnx.insert_prefix import insert_prefix, prefix_metadata, seq2seq_roles
from lora_fx.runtime.onnx_torch import OnnxModule
from tests.models import max_rel
from tests.passes.fx.test_insert_prefix_t5 import SHAPES, T, t5, t5_inputs
from tests.passes.onnx.prefix_grads import assert_peft_prefix_gradients

# Each export of the tiny T5 takes ~10 s on 2 cores.
pytestmark = pytest.mark.slow

DECODER = [f"model.decoder.block.{i}.layer.0.SelfAttention" for i in range(2)]
CROSS = [f"model.decoder.block.{i}.layer.1.EncDecAttention" for i in range(2)]
# name: (attention implementation, exporter, opset, whether the file takes decoder_attention_mask)
FILES = {"sdpa": ("sdpa", "dynamo", 18, True), "eager": ("eager", "dynamo", 18, False),
         "attention_op": ("sdpa", "dynamo", 23, False), "torchscript": ("eager", "torchscript", 17, True)}
NAMES = ["input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"]


class _Logits(torch.nn.Module):
    """T5ForConditionalGeneration returning its logits alone: its cache object is no exportable output."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                          decoder_attention_mask=decoder_attention_mask, use_cache=False).logits


def _batch(size: int, seq: int, dec: int, seed: int = 0, decoder_mask: bool = True) -> dict[str, torch.Tensor]:
    """t5_inputs (the last row's encoder input right-padded by 2) with, if asked, a decoder mask padding the last
    row's last 2 decoder tokens (when there are more than 2)."""
    x = t5_inputs(size, seq, dec, seed=seed)
    if decoder_mask:
        mask = torch.ones(size, dec, dtype=torch.long)
        if dec > 2:
            mask[-1, dec - 2:] = 0
        x["decoder_attention_mask"] = mask
    return x


def _export(path, name: str) -> None:
    attn, exporter, opset, decoder_mask = FILES[name]
    names = NAMES if decoder_mask else NAMES[:3]
    x = _batch(2, 8, 5, decoder_mask=decoder_mask)
    model = _Logits(t5(attn=attn))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            b, s, d = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("dec")
            dims = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}, "decoder_input_ids": {0: b, 1: d},
                    "decoder_attention_mask": {0: b, 1: d}}
            torch.onnx.export(model, (), str(path), kwargs={k: x[k] for k in names}, dynamo=True, opset_version=opset,
                              input_names=names, output_names=["logits"], dynamic_shapes={k: dims[k] for k in names},
                              verbose=False)
        else:
            torch.onnx.export(model, tuple(x[k] for k in names), str(path), dynamo=False, opset_version=opset,
                              input_names=names, output_names=["logits"],
                              dynamic_axes={k: {0: "batch", 1: f"{k}_len"} for k in names})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t5")
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = tmp / f"t5-{name}.onnx"
            _export(cache[name], name)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    """PEFT's SEQ_2_SEQ_LM prefix-tuning of the tiny T5 (random prompt embeddings), saved, and the model."""
    import peft

    directory = tmp_path_factory.mktemp("peft") / "adapter"
    torch.manual_seed(3)
    cfg = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=T)
    pm = peft.get_peft_model(t5(), cfg).eval()
    pm.save_pretrained(directory)
    return directory, pm


def _session(model, path):
    lora_fx.save(model, path)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(sess, x, options=None):
    return torch.from_numpy(sess.run(None, {i.name: x[i.name].numpy() for i in sess.get_inputs()}, options)[0])


def _logits(model, x):
    with torch.no_grad():
        return model(**x).logits


@pytest.mark.parametrize("name", list(FILES))
def test_peft_adapter_gives_peft_outputs(exported, peft_adapter, name, tmp_path):
    """load_adapter of PEFT's adapter onto the plain file: the decoder's self-attention alone, both layers through
    one initializer pair (PEFT's block 0), ONNX Runtime giving PEFT's logits with and without padding."""
    directory, pm = peft_adapter
    base = t5(attn=FILES[name][0])
    model = lora_fx.load(exported(name))
    roles = seq2seq_roles(find_sites(model))
    assert [s.name for s in roles.decoder] == DECODER and [s.name for s in roles.cross] == CROSS
    lora_fx.load_adapter(model, directory)
    rec = prefix_metadata(model)
    assert list(rec["sites"]) == DECODER and [s["block"] for s in rec["sites"].values()] == [0, 0]
    assert len({s["key"] for s in rec["sites"].values()}) == 1
    sess = _session(model, tmp_path / "prefixed.onnx")
    for size, seq, dec in SHAPES:
        padded = _batch(size, seq, dec, seed=size, decoder_mask=FILES[name][3])
        unpadded = {k: torch.ones_like(v) if k.endswith("attention_mask") else v for k, v in padded.items()}
        for x in (padded, unpadded):
            theirs = _logits(pm, x)
            assert max_rel(_run(sess, x), theirs) <= 1e-5, (size, seq, dec)
            assert max_rel(_logits(base, x), theirs) > 1e-2


def test_no_positions_move_and_the_bias_is_computed_once(exported):
    """T5 has no absolute positions to move; its shared bias is widened once for both layers (one Gather more)."""
    model = lora_fx.load(exported("sdpa"))
    gathers = sum(n.op_type == "Gather" for n in model.graph)
    changed = insert_prefix(model, lora_fx.PrefixConfig(num_virtual_tokens=T)).changed
    assert changed == DECODER
    table = "model.decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    readers = [n for n in model.graph if n.op_type == "Gather" and n.inputs[0].name == table]
    assert len(readers) == 1 and sum(n.op_type == "Gather" for n in model.graph) == gathers


@pytest.mark.parametrize("name", ["sdpa", "eager"])
def test_prefix_keys_get_their_relative_position_bias(exported, peft_adapter, name, tmp_path, monkeypatch):
    """With the bias's prefix columns padded like a mask (0, visible) instead of computed, PEFT parity fails."""
    from lora_fx.passes.onnx import prefix_forms

    directory, pm = peft_adapter
    check, rewrite = prefix_forms.FORMS["decomposed"]
    monkeypatch.setitem(prefix_forms.FORMS, "decomposed", (lambda site, parts, graph: {}, rewrite))
    model = lora_fx.load_adapter(lora_fx.load(exported(name)), directory)
    x = _batch(2, 8, 5, decoder_mask=FILES[name][3])
    assert max_rel(_run(_session(model, tmp_path / "p.onnx"), x), _logits(pm, x)) > 1e-3


@pytest.mark.parametrize("name", ["sdpa", "torchscript"])
def test_one_step_has_peft_prefix_gradients(exported, peft_adapter, name):
    directory, pm = peft_adapter
    model = lora_fx.load_adapter(lora_fx.load(exported(name)), directory)
    module = OnnxModule(model)
    rec = prefix_metadata(model)
    key, value = rec["sites"][DECODER[0]]["key"], rec["sites"][DECODER[0]]["value"]
    # Both layers read one tensor: its gradient is their sum, as PEFT's block 0 sums it.
    assert sorted(module.trainable_names) == sorted([key, value])
    x = _batch(3, 9, 6, seed=1)
    assert_peft_prefix_gradients(model, module, pm, x, keep=x["decoder_attention_mask"].bool())


def test_saved_adapter_and_served_export_load_in_peft_and_onnx_runtime(exported, peft_adapter, tmp_path):
    """save_adapter of the prefixed file writes a directory PEFT loads as SEQ_2_SEQ_LM; ``lora-fx export --adapters``
    serves the file with one prefix slot pair, its .onnx_adapter and PEFT directory giving PEFT's outputs, and a second
    PEFT adapter switched in through ONNX Runtime's adapter API."""
    import peft

    from lora_fx.cli import main

    directory, pm = peft_adapter
    base = t5()
    model = lora_fx.load_adapter(lora_fx.load(exported("sdpa")), directory)
    lora_fx.save_adapter(model, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert back.peft_config["default"].task_type == "SEQ_2_SEQ_LM"
    x = _batch(3, 11, 7, seed=3)
    assert max_rel(_logits(back, x), _logits(pm, x)) <= 1e-6
    lora_fx.save(model, tmp_path / "prefixed.onnx")
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["export", str(tmp_path / "prefixed.onnx"), "-o", str(tmp_path / "served.onnx"), "--adapters", "--json"]) == 0
    summary = json.loads(out.getvalue())
    assert summary["mode"] == "adapters" and summary["sites"] == DECODER
    sess = ort.InferenceSession(summary["model"], providers=["CPUExecutionProvider"])
    assert len(sess.get_overridable_initializers()) == 2  # one key/value pair: both layers read block 0
    torch.manual_seed(11)
    other = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=T)).eval()
    other.save_pretrained(tmp_path / "other")
    lora_fx.save(lora_fx.load_adapter(lora_fx.load(exported("sdpa")), tmp_path / "other"), tmp_path / "other.onnx")
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["export", str(tmp_path / "other.onnx"), "-o", str(tmp_path / "other-served.onnx"), "--adapters",
                     "--name", "other", "--json"]) == 0
    other_adapter = json.loads(out.getvalue())["adapters"][0]
    assert max_rel(_run(sess, x), _logits(pm, x)) <= 1e-5
    for adapter, ref in ((summary["adapters"][0], pm), (other_adapter, other)):
        loaded = ort.LoraAdapter()
        loaded.Load(adapter)
        opts = ort.RunOptions()
        opts.add_active_adapter(loaded)
        assert max_rel(_run(sess, x, opts), _logits(ref, x)) <= 1e-5, adapter
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), summary["peft_dirs"][0]).eval()
    assert max_rel(_logits(served, x), _logits(pm, x)) <= 1e-6


def test_one_decoder_layer_matches_the_fx_front_end(exported, tmp_path):
    """Prefixing the second decoder layer alone (no PEFT layout does this): the first keeps the bias over its own keys,
    the second reads a widened copy, and the file computes what the FX front end computes with the same prefixes."""
    base = t5()
    x0 = _batch(2, 8, 5)
    config = lora_fx.PrefixConfig(num_virtual_tokens=T, target_modules=["decoder.block.1.layer.0.SelfAttention"])
    gm = lora_fx.apply(lora_fx.capture(base, kwargs=x0), config)
    attention = gm.get_submodule("decoder.block.1.layer.0.SelfAttention")
    torch.manual_seed(4)
    prefixes = (torch.randn_like(attention.prefix_key), torch.randn_like(attention.prefix_value))
    with torch.no_grad():
        attention.prefix_key.copy_(prefixes[0])
        attention.prefix_value.copy_(prefixes[1])
    from lora_fx.passes.onnx.insert_prefix import InsertPrefix, select_prefix_sites

    model = lora_fx.load(exported("sdpa"))
    sites = select_prefix_sites(find_sites(model), config)
    assert [s.name for s in sites] == DECODER[1:]
    InsertPrefix(config, sites, {DECODER[1]: prefixes})(model)
    sess = _session(model, tmp_path / "one.onnx")
    for size, seq, dec in SHAPES:
        x = _batch(size, seq, dec, seed=size)
        assert max_rel(_run(sess, x), _logits(gm, x)) <= 1e-5, (size, seq, dec)
        assert max_rel(_logits(base, x), _logits(gm, x)) > 1e-2


def test_encoder_or_cross_attention_sites_are_refused_by_name(exported):
    model = lora_fx.load(exported("sdpa"))
    before = set(model.graph.initializers)
    for site, role in (("model.encoder.block.0.layer.0.SelfAttention", "the encoder's self-attention"),
                       (CROSS[1], "a cross-attention")):
        with pytest.raises(UnsupportedError, match=rf"{site} cannot take a prefix: it is {role}"):
            lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=T, target_modules=[site]))
    assert not prefix_metadata(model) and set(model.graph.initializers) == before


def test_t5_encoder_alone_is_refused_naming_the_site(tmp_path):
    """PEFT never prefixes a T5 encoder (tests/passes/fx/test_insert_prefix_t5.py): no behaviour to match, so the
    file of T5EncoderModel is refused before anything changes, naming the way out."""
    model = t5("T5EncoderModel")
    model.config.use_cache = False
    kwargs = t5_inputs(2, 8, 5)
    del kwargs["decoder_input_ids"]
    path = tmp_path / "t5.onnx"
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), str(path), kwargs=kwargs, dynamo=True, opset_version=18, input_names=list(kwargs),
                          dynamic_shapes={k: {0: batch, 1: seq} for k in kwargs}, verbose=False)
    onnx_model = lora_fx.load(path)
    before = set(onnx_model.graph.initializers)
    with pytest.raises(UnsupportedError, match=r"encoder\.block\.0\.layer\.0\.SelfAttention .*relative position bias.*"
                                               r"never prefixes a T5 encoder.*LoraConfig"):
        lora_fx.apply(onnx_model, lora_fx.PrefixConfig(num_virtual_tokens=T))
    assert not prefix_metadata(onnx_model) and set(onnx_model.graph.initializers) == before


def test_umt5_bias_of_every_layer_matches_peft(tmp_path):
    """UMT5 (transformers' T5 code with a relative position table in every layer, not shared): each layer's bias is
    widened from the one set of relative positions, and the file gives PEFT's logits."""
    import peft
    import transformers as tf

    from tests.models import VOCAB

    torch.manual_seed(0)
    cfg = tf.UMT5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                        decoder_start_token_id=0, pad_token_id=0)
    base = tf.UMT5ForConditionalGeneration(cfg).eval()
    names = NAMES[:3]
    x0 = _batch(2, 8, 5, decoder_mask=False)
    b, s, d = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("dec")
    dims = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}, "decoder_input_ids": {0: b, 1: d}}
    path = tmp_path / "umt5.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(base), (), str(path), kwargs={k: x0[k] for k in names}, dynamo=True, opset_version=18,
                          input_names=names, output_names=["logits"], dynamic_shapes=dims, verbose=False)
    torch.manual_seed(5)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=T)).eval()
    pm.save_pretrained(tmp_path / "peft")
    model = lora_fx.load(path)
    tables = [n for n in model.graph.initializers if n.endswith("SelfAttention.relative_attention_bias.weight") and ".decoder." in n]
    assert len(tables) == 2
    model = lora_fx.load_adapter(model, tmp_path / "peft")
    assert list(prefix_metadata(model)["sites"]) == DECODER
    sess = _session(model, tmp_path / "prefixed.onnx")
    for size, seq, dec in SHAPES:
        x = _batch(size, seq, dec, seed=size, decoder_mask=False)
        assert max_rel(_run(sess, x), _logits(pm, x)) <= 1e-5, (size, seq, dec)
        assert max_rel(_logits(base, x), _logits(pm, x)) > 1e-2
