"""ONNX insert_prefix on an exported encoder-decoder (BART): refused, naming the sites, pointing to the FX route.

PEFT's SEQ_2_SEQ_LM prefixes only the decoder's self-attention and moves only the decoder's positions
(tests/passes/fx/test_insert_prefix_seq2seq.py). The ONNX pass used to prefix every attention site (encoder,
decoder, cross-attention) and move every position, which matches no PEFT output; it now refuses before
changing anything.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lora_fx
from lora_fx.errors import UnsupportedError
from lora_fx.passes.onnx.find_sites import find_sites
from lora_fx.passes.onnx.insert_prefix import encoder_decoder_roles, prefix_metadata
from tests.passes.fx.test_insert_prefix_seq2seq import batch, seq2seq

T = 3
# The exported BART fixture takes over 10 s to build on 2 cores.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bart_onnx(tmp_path_factory):
    """A tiny BART exported as the project's tests export models: dynamo, opset 18, dynamic batch and lengths."""
    model = seq2seq("bart")
    model.config.use_cache = False
    kwargs = batch(2, 8, 5)
    path = tmp_path_factory.mktemp("bart") / "bart.onnx"
    b, s, d = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("dec")
    dims = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s},
            "decoder_input_ids": {0: b, 1: d}, "decoder_attention_mask": {0: b, 1: d}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), str(path), kwargs=kwargs, dynamo=True, opset_version=18, input_names=list(kwargs),
                          output_names=["logits"], dynamic_shapes={k: dims[k] for k in kwargs}, verbose=False)
    return path


def test_roles_are_found_in_the_onnx_graph(bart_onnx):
    cross, encoder = encoder_decoder_roles(find_sites(lora_fx.load(bart_onnx)))
    assert [s.name for s in cross] == [f"model.decoder.layers.{i}.encoder_attn" for i in range(2)]
    assert [s.name for s in encoder] == [f"model.encoder.layers.{i}.self_attn" for i in range(2)]


def test_encoder_decoder_export_is_refused_naming_the_sites(bart_onnx):
    model = lora_fx.load(bart_onnx)
    before = set(model.graph.initializers)
    with pytest.raises(UnsupportedError, match=r"encoder-decoder \(cross-attention at model\.decoder\.layers\.0\.encoder_attn.*"
                                               r"model\.encoder\.layers\.0\.self_attn.*lora_fx\.capture.*export_onnx"):
        lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=T))
    # Decoder self-attention alone is refused too: the ONNX pass would still move the encoder's positions.
    with pytest.raises(UnsupportedError, match="encoder-decoder"):
        lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=T, target_modules=["model.decoder.layers.0.self_attn"]))
    assert not prefix_metadata(model) and set(model.graph.initializers) == before


def test_peft_adapters_are_refused_on_the_exported_file(bart_onnx, tmp_path):
    import copy

    import peft

    base = seq2seq("bart")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=T))
    pm.save_pretrained(tmp_path / "seq2seq")
    model = lora_fx.load(bart_onnx)
    with pytest.raises(UnsupportedError, match="no encoder-decoder prefix slots.*lora_fx.export_onnx"):
        lora_fx.load_adapter(model, tmp_path / "seq2seq")
    # A decoder-only layout adapter of the right size would otherwise be inserted at every site.
    lora_fx.PrefixConfig(num_virtual_tokens=T).save_pretrained(tmp_path / "flat")
    from safetensors.torch import save_file

    save_file({"prompt_embeddings": torch.zeros(T, 6 * 2 * 32)}, str(tmp_path / "flat" / "adapter_model.safetensors"))
    with pytest.raises(UnsupportedError, match="encoder-decoder"):
        lora_fx.load_adapter(model, tmp_path / "flat")
    assert not prefix_metadata(model)
