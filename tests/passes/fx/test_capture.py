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


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).eval()


def test_positional_inputs_are_bound_to_forwards_names_so_the_graph_trains_and_exports(tmp_path):
    """capture(net, (x,)) used to give a graph that took x positionally only: train (batches by keyword) failed with
    torch's "kwarg keyword mismatch" and export_onnx with an opaque error. The positional example is bound to
    forward()'s name (nn.Sequential: ``input``); the graph trains and exports as the kwargs capture does, and is
    still called as the model was (gm(x))."""
    import copy

    from tests.exported import ort_run

    x, y = torch.randn(2, 5, 16), torch.randn(2, 5, 4)
    net = _mlp()
    config = lora_fx.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)
    graphs = {}
    for how in ("args", "kwargs"):
        torch.manual_seed(1)
        gm = lora_fx.capture(copy.deepcopy(net), (x,)) if how == "args" else lora_fx.capture(copy.deepcopy(net), kwargs={"input": x})
        graphs[how] = lora_fx.apply(gm, config)
    by_args = graphs["args"]
    assert [n.target for n in by_args.graph.nodes if n.op == "placeholder"] == ["input"]
    x2 = torch.randn(3, 7, 16)
    assert torch.equal(by_args(x2), by_args(input=x2)) and torch.equal(by_args(x2), graphs["kwargs"](input=x2))
    assert torch.equal(copy.deepcopy(copy.deepcopy(by_args))(x2), by_args(x2))  # copies take x positionally too
    losses = {}
    for how, gm in graphs.items():
        result = lora_fx.train(gm, [{"input": x, "y": y}], lambda o, b: ((o - b["y"]) ** 2).mean(), steps=3, progress=False)
        losses[how] = result.losses
    assert losses["args"] == losses["kwargs"]  # the reference: the same model captured by keyword
    path = tmp_path / "m.onnx"
    lora_fx.export_onnx(by_args, str(path), kwargs={"input": x})
    with torch.no_grad():
        assert max_rel(torch.from_numpy(ort_run(path, {"input": x2.numpy()})), by_args(x2)) <= 1e-5


class _VarArgs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, *xs):
        return self.fc(sum(xs))


class _PositionalOnly(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x, /):
        return self.fc(x)


@pytest.mark.parametrize("model, match", [(_VarArgs(), r"forward\(\*xs\) takes \*xs, and 2 example input\(s\) went there"),
                                          (_PositionalOnly(), r"takes 'x' positional-only")])
def test_a_forward_whose_inputs_cannot_be_named_is_refused(model, match):
    with pytest.raises(CaptureError, match=match):
        lora_fx.capture(model, (torch.randn(2, 4), torch.randn(2, 4)) if isinstance(model, _VarArgs) else (torch.randn(2, 4),))


def test_example_inputs_that_do_not_fit_forward_are_named():
    with pytest.raises(CaptureError, match=r"do not fit Sequential.forward\(input\).*too many positional"):
        lora_fx.capture(_mlp(), (torch.randn(2, 16), torch.randn(2, 16)))


@pytest.mark.parametrize("args", [5, torch.randn(2, 16), {"input": torch.randn(2, 16)}, "x"])
def test_example_args_that_are_not_a_tuple_are_refused_with_the_fix(args):
    # A bare tensor used to be split into its rows (tuple(x)), each bound to its own parameter; a number raised
    # a bare "not iterable" TypeError.
    with pytest.raises(CaptureError, match=rf"args must be a tuple of example inputs, got {type(args).__name__}; "
                                           r"for a single tensor x pass args=\(x,\)"):
        lora_fx.capture(_mlp(), args=args)


@pytest.mark.parametrize("kwargs", [5, [("input", torch.randn(2, 16))], (torch.randn(2, 16),)])
def test_example_kwargs_that_are_not_a_dict_are_refused_with_the_fix(kwargs):
    with pytest.raises(CaptureError, match=rf"kwargs must be a dict of example inputs .*got {type(kwargs).__name__}"):
        lora_fx.capture(_mlp(), kwargs=kwargs)


def test_example_args_as_a_list_or_none_are_taken():
    x = torch.randn(2, 16)
    model = _mlp()
    for gm in (lora_fx.capture(model, [x]), lora_fx.capture(model, None, {"input": x})):
        torch.testing.assert_close(gm(input=x), model(x))
