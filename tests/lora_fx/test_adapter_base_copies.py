"""PEFT adapter folders that carry copies of base weights (save_embedding_layers: a targeted lm_head's
``lm_head.base_layer.weight``, an untargeted embedding's own name): a copy equal to the model's base weight loads (it
changes nothing, as in PEFT); one that differs is refused, lora_fx never changing base weights. Reference:
PeftModel.from_pretrained on tiny GPT-2, whose lm_head is tied to the token embedding."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_fx
from lora_fx.errors import AdapterError
from lora_fx.passes.fx.capture import meta
from tests.models import inputs, max_rel, peft_wrap, run

KEY = "base_model.model.lm_head.base_layer.weight"
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def lm_head_dir(zoo, tmp_path_factory):
    """A PEFT folder for GPT-2 adapting c_attn and the tied lm_head, as PEFT saves it (with the base lm_head)."""
    path = tmp_path_factory.mktemp("lm_head") / "peft"
    pm = peft_wrap(zoo.model("gpt2"), r=4, target_modules=["c_attn", "lm_head"], fan_in_fan_out=True, init_lora_weights=False)
    pm.save_pretrained(str(path))
    assert KEY in load_file(str(path / WEIGHTS))
    return pm, path


def _onnx_gpt2():
    from tests.exported import base_exported

    return lora_fx.load(base_exported("gpt2").model_path)


def _outputs(model, batch):
    if isinstance(model, torch.fx.GraphModule):
        return run(model, batch)
    from tests.exported import ort_run, save

    return torch.from_numpy(ort_run(save(model, "base-copies.onnx"), {k: v.numpy() for k, v in batch.items()}))


@pytest.mark.parametrize("kind", ["fx", "onnx"])
def test_a_targeted_lm_head_with_its_base_weight_loads_with_peft_outputs(zoo, lm_head_dir, kind):
    pm, path = lm_head_dir
    model = lora_fx.load_adapter(zoo.gm("gpt2") if kind == "fx" else _onnx_gpt2(), path)
    for batch in (inputs(2, 8, pad=3), inputs(1, 6, seed=4)):
        ours = _outputs(model, batch)
        assert max_rel(ours, run(pm, batch)) <= 1e-5
        assert max_rel(ours, run(zoo.model("gpt2"), batch)) > 1e-3


def test_a_half_precision_copy_of_the_base_weight_loads(zoo, lm_head_dir, tmp_path):
    """PEFT saves the copy in the dtype it trained in: rounding to float16 is no change of the weight."""
    pm, path = lm_head_dir
    tensors = load_file(str(path / WEIGHTS))
    tensors[KEY] = tensors[KEY].half()
    (tmp_path / "half").mkdir()
    save_file(tensors, str(tmp_path / "half" / WEIGHTS))
    (tmp_path / "half" / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    gm = lora_fx.load_adapter(zoo.gm("gpt2"), tmp_path / "half")
    batch = inputs(2, 8)
    assert max_rel(run(gm, batch), run(pm, batch)) <= 1e-5


def _changed(path, tmp_path, change):
    tensors = load_file(str(path / WEIGHTS))
    tensors[KEY] = change(tensors[KEY].clone())
    out = tmp_path / "changed"
    out.mkdir()
    save_file(tensors, str(out / WEIGHTS))
    (out / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    return out


def _bump(w, by):
    w[3, 5] += by
    return w


@pytest.mark.parametrize("kind", ["fx", "onnx"])
@pytest.mark.parametrize("change, message", [
    (lambda w: _bump(w, 0.01), r"differs from this model's lm_head\.weight \(max difference 0\.01\)"),
    (lambda w: _bump(w, 1e-4), r"differs from this model's lm_head\.weight \(max difference 0\.0001\)"),
    (lambda w: torch.cat([w, w[:4]]), r"has shape \(100, 32\), but this model's lm_head\.weight is \(96, 32\)"),
])
def test_a_copy_that_is_not_the_models_base_weight_is_refused(zoo, lm_head_dir, tmp_path, kind, change, message):
    _, path = lm_head_dir
    changed = _changed(path, tmp_path, change)
    model = zoo.gm("gpt2") if kind == "fx" else _onnx_gpt2()
    with pytest.raises(AdapterError, match=message) as info:
        lora_fx.load_adapter(model, changed)
    text = str(info.value)
    assert f"{KEY!r}" in text and "never changes base weights" in text and "load the base model with that weight" in text
    # Refused before anything changed.
    assert not (meta(model).get("lora_sites") if kind == "fx" else model.metadata_props.get("lora_fx.lora"))


def test_an_untargeted_embedding_saved_with_the_adapter_loads_when_it_is_the_base(zoo, tmp_path):
    """save_embedding_layers=True saves the input and output embeddings under their own names (tied in GPT-2)."""
    pm = peft_wrap(zoo.model("gpt2"), r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    pm.save_pretrained(str(tmp_path / "peft"), save_embedding_layers=True)
    saved = load_file(str(tmp_path / "peft" / WEIGHTS))
    assert {"base_model.model.transformer.wte.weight", "base_model.model.lm_head.weight"} <= set(saved)
    gm = lora_fx.load_adapter(zoo.gm("gpt2"), tmp_path / "peft")
    batch = inputs(2, 8, pad=2)
    assert max_rel(run(gm, batch), run(pm, batch)) <= 1e-5
    assert not meta(gm).get("modules_to_save", {}).get("modules")  # nothing trains in full


def test_a_tensor_of_no_module_is_refused_with_its_whole_key_quoted(zoo, lm_head_dir, tmp_path):
    _, path = lm_head_dir
    tensors = load_file(str(path / WEIGHTS))
    tensors["base_model.model.nowhere.weight"] = torch.zeros(2, 2)
    (tmp_path / "odd").mkdir()
    save_file(tensors, str(tmp_path / "odd" / WEIGHTS))
    (tmp_path / "odd" / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    with pytest.raises(AdapterError, match=r"adapter tensor 'base_model\.model\.nowhere\.weight' is neither a LoRA matrix"):
        lora_fx.load_adapter(zoo.gm("gpt2"), tmp_path / "odd")
