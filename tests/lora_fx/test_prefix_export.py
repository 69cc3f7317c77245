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
