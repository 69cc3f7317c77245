"""apply / find_sites: what they take, and the errors for what they do not."""

from __future__ import annotations

import pytest

import lora_fx
from lora_fx.errors import ConfigError
from lora_fx.passes.fx.capture import meta
from tests.models import max_rel, peft_lora_modules, peft_wrap, inputs, run


def test_a_peft_config_is_refused_with_the_conversion(zoo):
    # peft.LoraConfig and lora_fx.LoraConfig share a name: "takes a LoraConfig, got LoraConfig" said nothing.
    import peft

    gm = zoo.gm("llama")
    theirs = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match=r"got peft's LoraConfig; convert it with lora_fx.LoraConfig.from_dict\(config.to_dict\(\)\)"):
        lora_fx.apply(gm, theirs)
    with pytest.raises(ConfigError, match="lora_fx.PrefixConfig.from_dict"):
        lora_fx.apply(gm, peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    # Refused before any pass ran, quantization included.
    with pytest.raises(ConfigError, match="got peft's LoraConfig"):
        lora_fx.apply(gm, theirs, quant=lora_fx.QuantConfig())
    assert not meta(gm).get("quant") and not meta(gm).get("lora_sites")
    # The conversion the message names selects and computes what PEFT does.
    lora_fx.apply(gm, lora_fx.LoraConfig.from_dict(theirs.to_dict()))
    pm = peft_wrap(zoo.model("llama"), r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    assert set(meta(gm)["lora_sites"]) == set(peft_lora_modules(pm))
    b = inputs(2, 6)
    assert max_rel(run(gm, b), run(pm, b)) <= 1e-5


@pytest.mark.parametrize("front_end", ["fx", "onnx"])
def test_a_qlora_target_that_matches_nothing_is_refused_before_quantizing(zoo, front_end, tmp_path):
    """apply(..., quant=...) quantizes in place first; a typo in target_modules must not leave a quantized
    model without an adapter."""
    from lora_fx.errors import TargetNotFoundError

    if front_end == "fx":
        model = zoo.gm("llama")
    else:
        lora_fx.export_onnx(zoo.gm("llama"), tmp_path / "base.onnx", kwargs=inputs(2, 8))
        model = lora_fx.load(tmp_path / "base.onnx")
    before = [s.op for s in lora_fx.find_sites(model)]
    with pytest.raises(TargetNotFoundError, match="q_prjo"):
        lora_fx.apply(model, lora_fx.LoraConfig(r=2, target_modules=["q_prjo"]), quant=lora_fx.QuantConfig(dtype="int8"))
    assert [s.op for s in lora_fx.find_sites(model)] == before  # nothing quantized
    if front_end == "fx":
        assert not meta(model).get("quant")
    else:
        assert "DequantizeLinear" not in {n.op_type for n in model.graph}
