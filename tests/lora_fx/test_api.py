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
