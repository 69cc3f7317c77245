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


@pytest.mark.parametrize("name, batch, seq", [("bert", 1, 8), ("llama", 2, 1), ("gpt2", 1, 1)])
def test_an_example_of_batch_or_sequence_one_still_gives_dynamic_dims(name, batch, seq):
    """torch.export fixes a dim whose example size is 1; the capture must still take every batch and sequence."""
    model = build(name)
    gm = lora_fx.capture(model, kwargs=inputs(batch, seq))
    for b, s, pad in [(batch, seq, 0), (3, 9, 2), (1, 1, 0), (4, 1, 0), (1, 6, 0)]:
        x = inputs(b, s, pad=pad, seed=s)
        assert max_rel(run(gm, x), run(model, x)) <= 1e-6, (b, s)


def test_a_dim_that_really_is_one_stays_fixed_and_the_batch_dynamic():
    class Gray(torch.nn.Module):  # one input channel: dim 1 cannot be widened
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    model = Gray().eval()
    gm = lora_fx.capture(model, (torch.randn(1, 1, 8, 8),))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert max_rel(gm(x), model(x)) <= 1e-6


def test_an_unregistered_output_class_gets_a_way_out():
    import dataclasses

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return Out(self.fc(x))

    with pytest.raises(CaptureError, match="return a tuple, a dict or a transformers ModelOutput"):
        lora_fx.capture(M(), (torch.randn(2, 4),))


def test_encoder_decoder_with_its_own_decoder_config_captures_without_cache():
    """T5's decoder stack holds a copy of the config: use_cache must be settled there too, and restored."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    model = tf.T5ForConditionalGeneration(cfg).eval()

    def batch(b: int, s: int, pad: int = 0) -> dict:
        x = inputs(b, s, pad=pad, seed=s)
        x["decoder_input_ids"] = inputs(b, s - 2, seed=s + 1)["input_ids"]
        return x

    gm = lora_fx.capture(model, kwargs=batch(2, 8))
    assert model.config.use_cache is True and model.decoder.config.use_cache is True
    for b, s, pad in [(2, 8, 0), (3, 11, 4), (1, 5, 0)]:
        x = batch(b, s, pad)
        assert max_rel(run(gm, x), run(model, x)) <= 1e-6
