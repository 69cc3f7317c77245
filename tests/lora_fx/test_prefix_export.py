"""export_onnx of a prefix-tuned GraphModule: ORT runs it with the prefixes as swappable slots."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import lora_fx
from lora_fx.errors import UnsupportedError
from lora_fx.passes.fx.capture import meta
from tests.models import build, inputs, max_rel, run


@pytest.mark.slow
def test_projected_prefixes_export_as_slots_with_adapter_files(tmp_path):
    from lora_fx.export import export_onnx

    gm = lora_fx.apply(lora_fx.capture(build("gpt2"), kwargs=inputs(2, 8)),
                       lora_fx.PrefixConfig(num_virtual_tokens=4, prefix_projection=True))
    with pytest.raises(UnsupportedError, match="cannot be folded"):
        export_onnx(gm, tmp_path / "merged.onnx", kwargs=inputs(2, 8), mode="merged")
    assert not (tmp_path / "merged.onnx").exists()
    result = export_onnx(gm, tmp_path / "p.onnx", kwargs=inputs(2, 8), mode="adapters")
    # The torch graph keeps its encoder (it may train on); the file holds the folded prefixes.
    assert meta(gm)["prefix"]["projection"] and hasattr(gm, "prefix_encoder")
    sess = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    # Graph inputs with initializers: ONNX Runtime lists them as overridable initializers.
    slots = {i.name: i.shape for i in sess.get_overridable_initializers()}
    assert set(slots) == {f"transformer.h.{i}.attn.prefix_{w}" for i in (0, 1) for w in ("key", "value")}
    b = inputs(3, 10, pad=3, seed=2)
    keep = b["attention_mask"].bool().numpy()
    feeds = {"input_ids": b["input_ids"].numpy(), "attention_mask": b["attention_mask"].numpy()}
    ref = run(gm, b).numpy()
    default = sess.run(None, feeds)[0]
    assert np.abs(default[keep] - ref[keep]).max() / np.abs(ref).max() <= 1e-5
    # The .onnx_adapter beside it swaps in through ONNX Runtime's adapter API; here: zeroed prefixes.
    adapter = ort.LoraAdapter()
    adapter.Load(str(result.adapter_paths[0]))
    opts = ort.RunOptions()
    opts.add_active_adapter(adapter)
    assert np.abs(sess.run(None, feeds, opts)[0] - default).max() <= 1e-6
    zero = {name: np.zeros(shape, np.float32) for name, shape in slots.items()}
    assert np.abs(sess.run(None, {**feeds, **zero})[0] - default).max() > 1e-4
    # The PEFT-format directory written with it reloads onto a fresh capture with the same outputs.
    fresh = lora_fx.load_adapter(lora_fx.capture(build("gpt2"), kwargs=inputs(2, 8)), result.peft_dirs[0])
    assert max_rel(run(fresh, b)[torch.from_numpy(keep)], torch.from_numpy(ref[keep])) <= 1e-5


def test_prefixes_on_some_layers_export_with_their_onnx_adapter_and_no_peft_directory(tmp_path):
    """export_onnx wrote the PEFT directory through save_adapter, which refuses prefixes on a subset of layers (PEFT's
    prefix-tuning has no per-layer targets), so the whole export failed though the model and its .onnx_adapter hold
    any subset. It now skips the PEFT directory with a warning saying why; save_adapter's refusal names the way out."""
    import warnings

    from lora_fx.errors import AdapterError
    from lora_fx.export import export_onnx

    gm = lora_fx.apply(lora_fx.capture(build("gpt2"), kwargs=inputs(2, 8)),
                       lora_fx.PrefixConfig(num_virtual_tokens=4, target_modules=["transformer.h.0.attn"]))
    with pytest.raises(AdapterError, match=r"no per-layer targets.*1 of the model's 2 attention layers.*transformer\.h\.1\.attn"
                                           r".*\.onnx_adapter export instead.*peft_dir=False"):
        lora_fx.save_adapter(gm, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    with pytest.warns(UserWarning, match=r"^no PEFT directory written: .*no per-layer targets.*peft_dir=False"):
        result = export_onnx(gm, tmp_path / "p.onnx", kwargs=inputs(2, 8), mode="adapters")
    assert result.peft_dirs == [] and result.sites == ["transformer.h.0.attn"]
    assert sorted(p.name for p in (tmp_path / "p.adapters").iterdir()) == ["default.onnx_adapter", "default.onnx_adapter.json"]
    # The file, by default and with the .onnx_adapter active, computes what the torch graph computes.
    sess = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    assert {i.name for i in sess.get_overridable_initializers()} == {f"transformer.h.0.attn.prefix_{w}" for w in ("key", "value")}
    b = inputs(3, 10, pad=3, seed=2)
    keep = b["attention_mask"].bool().numpy()
    feeds = {"input_ids": b["input_ids"].numpy(), "attention_mask": b["attention_mask"].numpy()}
    ref = run(gm, b).numpy()
    adapter = ort.LoraAdapter()
    adapter.Load(str(result.adapter_paths[0]))
    opts = ort.RunOptions()
    opts.add_active_adapter(adapter)
    zero = {name: np.zeros((4, 4, 8), np.float32) for name in ("transformer.h.0.attn.prefix_key", "transformer.h.0.attn.prefix_value")}
    for out in (sess.run(None, feeds)[0], sess.run(None, {**feeds, **zero}, opts)[0]):
        assert np.abs(out[keep] - ref[keep]).max() / np.abs(ref).max() <= 1e-5
    assert np.abs(sess.run(None, {**feeds, **zero})[0][keep] - ref[keep]).max() > 1e-4  # the checks above can fail
    # peft_dir=False asks for what is done: no warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(gm, tmp_path / "q.onnx", kwargs=inputs(2, 8), mode="adapters", peft_dir=False)
    assert not [w for w in caught if "PEFT" in str(w.message)]


def test_save_adapter_of_a_graph_with_prefixes_and_lora_says_both_are_there(tmp_path):
    """LoRA applied on top of prefix-tuning: save_adapter said the prefixes had "no PrefixConfig recorded" (the
    LoraConfig replaced it); it now says the graph holds both kinds, which no PEFT directory holds."""
    from lora_fx.errors import AdapterError

    from lora_fx.api import _apply_fx

    gm = lora_fx.apply(lora_fx.capture(build("gpt2"), kwargs=inputs(2, 8)), lora_fx.PrefixConfig(num_virtual_tokens=4))
    with pytest.raises(AdapterError, match="this model already holds prefix-tuning prefixes: LoRA on top of them"):
        lora_fx.apply(gm, lora_fx.LoraConfig(r=2, target_modules="all-linear"))
    _apply_fx(gm, lora_fx.LoraConfig(r=2, target_modules="all-linear"))  # as an earlier version allowed
    with pytest.raises(AdapterError, match="holds both prefix-tuning prefixes and LoRA adapters .*separate captures"):
        lora_fx.save_adapter(gm, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
