"""capture: torch.export of real models, dynamic batch/sequence, the caller's signature, clear errors."""

from __future__ import annotations

import pytest
import torch

import lora_fx
from lora_fx.errors import CaptureError
from lora_fx.passes.fx.capture import meta
from tests.models import ALL, build, inputs, max_rel, run


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "minilm" else n for n in ALL])
def test_captured_graph_equals_eager_at_other_sizes(zoo, name):
    gm = zoo.gm(name)
    for batch, seq, pad in [(2, 8, 0), (1, 3, 0), (5, 17, 6), (3, 31, 1)]:
        b = inputs(batch, seq, pad=pad, seed=seq)
        assert max_rel(run(gm, b), run(zoo.model(name), b)) <= 1e-6


def test_meta_records_model_type_and_output_layer(zoo):
    assert meta(zoo.gm("gpt2"))["output_layer"] == "lm_head"
    assert meta(zoo.gm("llama"))["model_type"] == "llama"
    assert meta(zoo.gm("bert"))["output_layer"] is None
    assert meta(zoo.gm("bert"))["training"] is False


def test_capture_keeps_the_model_as_it_was():
    model = build("gpt2").train()
    assert model.config.use_cache is True
    gm = lora_fx.capture(model, kwargs=inputs(2, 8))
    assert model.training and model.config.use_cache is True
    # The caller's own keywords, without use_cache; the result is a plain output, no cache.
    out = gm(**inputs(2, 8))
    assert "past_key_values" not in out or out["past_key_values"] is None


def test_positional_inputs_are_dynamic_too():
    model = build("bert")
    b = inputs(2, 8)
    gm = lora_fx.capture(model, args=(b["input_ids"], b["attention_mask"]))
    b2 = inputs(3, 12, pad=4)
    ours = gm(b2["input_ids"], b2["attention_mask"])
    assert max_rel(ours[0], run(model, b2)) <= 1e-6


def test_static_capture_is_fixed_to_the_example_shape():
    model = build("bert")
    gm = lora_fx.capture(model, kwargs=inputs(2, 8), dynamic=False)
    assert max_rel(run(gm, inputs(2, 8, pad=3)), run(model, inputs(2, 8, pad=3))) <= 1e-6
    with pytest.raises(Exception):
        gm(**inputs(3, 9))


class DataDependent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.proj(x)
        if h.sum() > 0:  # Python control flow on a tensor value: torch.export cannot trace it
            return h * 2
        return h


def test_data_dependent_control_flow_gets_a_capture_error():
    with pytest.raises(CaptureError) as info:
        lora_fx.capture(DataDependent(), args=(torch.randn(2, 8),))
    err = info.value
    msg = str(err)
    assert msg.startswith("torch.export could not capture DataDependent")
    assert "data-dependent" in msg.lower() and "torch.cond" in msg
    # The reason and the user's own source line, not torch's debugging advice or a deep traceback.
    assert "test_capture.py" in msg and "if h.sum() > 0:" in msg
    assert "TORCHDYNAMO" not in msg and "TORCH_LOGS" not in msg
    assert len(msg.splitlines()) <= 8
    assert err.__cause__ is None and err.__suppress_context__


def test_non_module_is_refused():
    with pytest.raises(CaptureError, match="expects a torch.nn.Module, got function"):
        lora_fx.capture(lambda x: x, args=(torch.randn(2),))


def test_wrong_example_inputs_get_a_capture_error():
    with pytest.raises(CaptureError, match="could not capture BertModel"):
        lora_fx.capture(build("bert"), kwargs={"no_such_input": torch.ones(2, 3)})
