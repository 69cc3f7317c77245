"""export_onnx of a prefix-tuned encoder-decoder GraphModule (BART, T5).

The decoder layers that read one block of PEFT's SEQ_2_SEQ_LM embeddings share one parameter, which
torch.onnx writes as one initializer: the file's record names it for every such site, it becomes one
ONNX Runtime slot, and the written .onnx_adapter and PEFT directory load back (into ORT, PEFT, a fresh
capture, and the exported file's slots).
"""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch

import lora_fx
from lora_fx.errors import UnsupportedError
from lora_fx.export import export_onnx
from lora_fx.passes.onnx.insert_prefix import prefix_metadata
from tests.models import max_rel
from tests.passes.fx.test_insert_prefix_seq2seq import DECODER, batch, seq2seq
from tests.passes.fx.test_insert_prefix_t5 import t5, t5_inputs

T = 3


def _logits(model, b):
    with torch.no_grad():
        out = model(**b)
    return out["logits"] if isinstance(out, dict) or hasattr(out, "keys") else out[0]


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feeds(sess, b):
    names = {i.name for i in sess.get_inputs()}
    return {k: v.numpy() for k, v in b.items() if k in names}


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bart", "t5"])
def test_shared_prefixes_export_as_one_slot_and_load_back(tmp_path, family):
    import peft

    if family == "bart":
        base, kwargs, b, sites = seq2seq("bart"), batch(2, 8, 5), batch(3, 11, 7, seed=3), DECODER
    else:
        base, kwargs, b = t5(), t5_inputs(2, 8, 5), t5_inputs(3, 11, 7, seed=3)
        sites = [f"decoder.block.{i}.layer.0.SelfAttention" for i in range(2)]
    gm = lora_fx.apply(lora_fx.capture(base, kwargs=kwargs), lora_fx.PrefixConfig(num_virtual_tokens=T))
    with pytest.raises(UnsupportedError, match="cannot be folded"):
        export_onnx(gm, tmp_path / "merged.onnx", kwargs=kwargs, mode="merged")
    assert not (tmp_path / "merged.onnx").exists()
    result = export_onnx(gm, tmp_path / "p.onnx", kwargs=kwargs, mode="adapters")
    assert result.sites == sites
    sess = _session(result.model_path)
    # Both decoder layers read block 0: one parameter, one initializer, one slot; the record names it for both.
    slots = {i.name: i.shape for i in sess.get_overridable_initializers()}
    assert len(slots) == 2, slots
    record = prefix_metadata(lora_fx.load(result.model_path))
    assert list(record["sites"]) == sites and record["num_transformer_submodules"] == 2
    assert {record["sites"][s]["key"] for s in sites} == {n for n in slots if n.endswith("prefix_key")}
    ref = _logits(gm, b).numpy()
    default = sess.run(None, _feeds(sess, b))[0]
    assert _rel(default, ref) <= 1e-4
    # The .onnx_adapter through ONNX Runtime's adapter API gives the same; zeroed prefixes do not.
    adapter = ort.LoraAdapter()
    adapter.Load(str(result.adapter_paths[0]))
    opts = ort.RunOptions()
    opts.add_active_adapter(adapter)
    assert np.abs(sess.run(None, _feeds(sess, b), opts)[0] - default).max() <= 1e-6
    zero = {name: np.zeros(shape, np.float32) for name, shape in slots.items()}
    assert _rel(sess.run(None, {**_feeds(sess, b), **zero})[0], default) > 1e-3
    # The PEFT directory: PEFT and a fresh capture compute what the exported file computes.
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), result.peft_dirs[0]).eval()
    assert _rel(_logits(pm, b).numpy(), default) <= 1e-4
    fresh = lora_fx.load_adapter(lora_fx.capture(base, kwargs=kwargs), result.peft_dirs[0])
    assert max_rel(_logits(fresh, b), _logits(pm, b)) <= 1e-5
    # The exported file saves a PEFT directory of its own, and takes another PEFT adapter into its slots.
    onnx_model = lora_fx.load(result.model_path)
    lora_fx.save_adapter(onnx_model, tmp_path / "from_onnx")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "from_onnx").eval()
    assert max_rel(_logits(again, b), _logits(pm, b)) <= 1e-5
    other = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=T)).eval()
    other.save_pretrained(tmp_path / "other")
    lora_fx.load_adapter(onnx_model, tmp_path / "other")
    lora_fx.save(onnx_model, tmp_path / "other.onnx")
    swapped = _session(tmp_path / "other.onnx")
    assert _rel(swapped.run(None, _feeds(swapped, b))[0], _logits(other, b).numpy()) <= 1e-4
