"""ONNX insert_prefix on Bloom: refused, naming the site and the FX route, which matches PEFT.

Bloom's attention runs on ``[batch * heads, ...]`` MatMuls around a ``[batch, heads, q, k]`` Reshape and adds
ALiBi to its scores; PEFT's cache recomputes ALiBi for the T prefix keys (tests/passes/fx/
test_insert_prefix_bloom.py). The ONNX pass has no rule for that form, so it says so instead of reporting a
model without attention."""

from __future__ import annotations

import pytest

import lora_fx
from lora_fx.errors import UnsupportedError
from lora_fx.passes.onnx.insert_prefix import merged_heads_attention, prefix_metadata
from tests.models import inputs
from tests.passes.fx.test_insert_prefix_bloom import bloom

pytestmark = pytest.mark.slow  # the module's export of a tiny Bloom takes ~20 s

WAY_OUT = r"transformer\.h\.0\.self_attention .*heads merged.*ALiBi.*lora_fx\.export_onnx\(gm, path, kwargs=\.\.\., mode='adapters'\)"


@pytest.fixture(scope="module")
def bloom_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("bloom") / "bloom.onnx"
    lora_fx.export_onnx(lora_fx.capture(bloom(), kwargs=inputs(2, 8)), path, kwargs=inputs(2, 8))
    return path


def test_bloom_attention_is_refused_naming_the_site_and_the_fx_route(bloom_onnx):
    model = lora_fx.load(bloom_onnx)
    assert [(name, biased) for name, _, biased in merged_heads_attention(model)] == [
        ("transformer.h.0.self_attention", True), ("transformer.h.1.self_attention", True)]
    with pytest.raises(UnsupportedError, match=WAY_OUT):
        lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=3))
    assert not prefix_metadata(model)
    assert not [n for n in model.graph.initializers if "prefix" in n]


def test_a_peft_adapter_onto_bloom_onnx_is_refused_the_same_way(bloom_onnx, tmp_path):
    import copy

    import peft

    pm = peft.get_peft_model(copy.deepcopy(bloom()), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    pm.save_pretrained(tmp_path)
    model = lora_fx.load(bloom_onnx)
    with pytest.raises(UnsupportedError, match=WAY_OUT):
        lora_fx.load_adapter(model, tmp_path)
    assert not prefix_metadata(model)
