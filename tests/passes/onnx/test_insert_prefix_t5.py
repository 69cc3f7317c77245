"""ONNX insert_prefix on T5 (encoder alone, or encoder-decoder): refused, naming the site, where the FX front end matches PEFT.

PEFT's prefix reaches T5 only through the decoder's self-attention cache, where the prefix keys get
T5's relative position bias (tests/passes/fx/test_insert_prefix_t5.py). The ONNX pass does not rebuild
the bucketed bias over T more keys, so it refuses a site whose scores carry one instead of padding the
bias with zeros (which matched no PEFT output)."""

from __future__ import annotations

import warnings

import pytest
import torch

import lora_fx
from lora_fx.errors import UnsupportedError
from lora_fx.passes.onnx.insert_prefix import prefix_metadata
from tests.passes.fx.test_insert_prefix_t5 import t5, t5_inputs


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_t5_encoder_export_is_refused_naming_the_site(tmp_path, attn):
    model = t5("T5EncoderModel", attn=attn)
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
    with pytest.raises(UnsupportedError, match=r"encoder\.block\.0\.layer\.0\.SelfAttention .*relative position bias"):
        lora_fx.apply(onnx_model, lora_fx.PrefixConfig(num_virtual_tokens=3))
    assert not prefix_metadata(onnx_model)
    assert not [n for n in onnx_model.graph.initializers if "prefix" in n]


class _Logits(torch.nn.Module):
    """T5ForConditionalGeneration returning its logits alone: its cache object is no exportable output."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                          use_cache=False).logits


@pytest.mark.slow
def test_t5_encoder_decoder_export_is_refused_at_its_decoder(tmp_path):
    """The roles are found (BART-family files take prefixes: test_insert_prefix_seq2seq.py), and the decoder's
    self-attention, the only site PEFT prefixes, is refused for its relative position bias, naming the FX route."""
    from lora_fx.passes.onnx.find_sites import find_sites
    from lora_fx.passes.onnx.insert_prefix import seq2seq_roles

    kwargs = t5_inputs(2, 8, 5)
    path = tmp_path / "t5.onnx"
    b, s, d = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("dec")
    dims = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}, "decoder_input_ids": {0: b, 1: d}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(t5()), (), str(path), kwargs=kwargs, dynamo=True, opset_version=18, input_names=list(kwargs),
                          output_names=["logits"], dynamic_shapes={k: dims[k] for k in kwargs}, verbose=False)
    onnx_model = lora_fx.load(path)
    roles = seq2seq_roles(find_sites(onnx_model))
    assert [s.name for s in roles.decoder] == [f"model.decoder.block.{i}.layer.0.SelfAttention" for i in range(2)]
    assert [s.name for s in roles.cross] == [f"model.decoder.block.{i}.layer.1.EncDecAttention" for i in range(2)]
    before = set(onnx_model.graph.initializers)
    with pytest.raises(UnsupportedError, match=r"model\.decoder\.block\.0\.layer\.0\.SelfAttention .*relative position bias"
                                               r".*lora_fx\.export_onnx"):
        lora_fx.apply(onnx_model, lora_fx.PrefixConfig(num_virtual_tokens=3))
    assert not prefix_metadata(onnx_model) and set(onnx_model.graph.initializers) == before
