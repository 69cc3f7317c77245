"""ONNX insert_prefix on T5: refused, naming the site, where the FX front end matches PEFT.

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
