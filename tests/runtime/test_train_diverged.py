"""A run whose loss, gradients or update stop being finite ends with TrainingDivergedError at that step,
naming the step, the loss and the way out, with the adapters as a run stopped one step earlier left them;
numbers torch would train badly with (or fail on deep inside AdamW) are refused before anything moves."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import lora_fx
from lora_fx.errors import ConfigError, LoraFxError, TrainingDivergedError
from lora_fx.passes.fx.capture import meta
from lora_fx.runtime.train import cross_entropy_on
from tests.runtime import onnx_models as om
from tests.runtime.test_train import _counting_batches


def _adapters(gm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture()
def llama(zoo):
    config = lora_fx.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return lora_fx.apply(zoo.gm("llama"), config)


def test_an_lr_that_overflows_adamw_stops_at_step_1_and_moves_nothing(llama):
    # AdamW's first step size is 10 * lr, a float32 overflow above ~3.4e37: it used to end in torch's
    # "value cannot be converted to type float without overflow" traceback.
    loss_fn = cross_entropy_on("logits")
    start = _adapters(llama)
    reference = lora_fx.train(copy.deepcopy(llama), _counting_batches(2), loss_fn, steps=1, lr=1e-3, progress=False)
    with pytest.raises(TrainingDivergedError) as info:
        lora_fx.train(llama, _counting_batches(2), loss_fn, steps=3, lr=1e38, progress=False)
    err = info.value
    assert isinstance(err, LoraFxError) and isinstance(err, FloatingPointError)
    assert err.step == 1 and err.loss == reference.losses[0]  # the loss before any update
    assert "overflowed float32" in err.reason
    assert f"step 1 of 3 (loss {err.loss:.6g})" in str(err) and "Lower the learning rate (now 1e+38)" in str(err)
    assert _equal(_adapters(llama), start)
    assert meta(llama)["training"] is False  # back in eval mode


def test_a_run_that_blows_up_later_keeps_the_adapters_of_the_last_good_step(llama):
    # lr 1e20 moves the weights by about 1e20 in step 1; step 2's loss is NaN. The adapters must be those of
    # a run that stopped after step 1.
    loss_fn = cross_entropy_on("logits")
    one_step = copy.deepcopy(llama)
    lora_fx.train(one_step, _counting_batches(2), loss_fn, steps=1, lr=1e20, progress=False)
    with pytest.raises(TrainingDivergedError) as info:
        lora_fx.train(llama, _counting_batches(2), loss_fn, steps=5, lr=1e20, progress=False)
    assert info.value.step == 2, str(info.value)
    assert _equal(_adapters(llama), _adapters(one_step))
    assert all(bool(torch.isfinite(p).all()) for p in _adapters(llama).values())


def test_an_update_that_makes_weights_infinite_is_undone(llama):
    # AdamW first multiplies W by 1 - lr * weight_decay (here -3e38): a weight of 2 becomes -inf, with a
    # finite loss and finite gradients. The weights used to stay infinite for the next step to find.
    name = next(n for n in _adapters(llama) if "lora_A" in n)
    with torch.no_grad():
        llama.get_parameter(name).fill_(2.0)
    start = _adapters(llama)
    with pytest.raises(TrainingDivergedError, match="step 1 of 2") as info:
        lora_fx.train(llama, _counting_batches(1), cross_entropy_on("logits"), steps=2, lr=1e-3, weight_decay=3e41, progress=False)
    assert info.value.reason == "the update made adapter weights non-finite" and math.isfinite(info.value.loss)
    assert _equal(_adapters(llama), start)


def test_the_first_non_finite_loss_stops_the_run_before_its_update(llama):
    batches = _counting_batches(3)
    batches[1]["poison"] = True
    base = cross_entropy_on("logits")

    def loss_fn(out, batch):  # the data of step 2 give a NaN loss (as a NaN feature would)
        loss = base(out, batch)
        return loss * float("nan") if batch.get("poison") else loss

    one_step = copy.deepcopy(llama)
    lora_fx.train(one_step, batches, loss_fn, steps=1, lr=1e-2, progress=False)
    with pytest.raises(TrainingDivergedError) as info:
        lora_fx.train(llama, batches, loss_fn, steps=3, lr=1e-2, progress=False)
    assert info.value.step == 2 and math.isnan(info.value.loss) and "loss is not finite" in str(info.value)
    assert "check the data" in str(info.value)
    assert _equal(_adapters(llama), _adapters(one_step))


def test_an_onnx_model_keeps_its_initializers_when_training_diverges():
    model = om.mlp()
    before = {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items()}
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((8, 8)).astype(np.float32))
    batches = [{"x": x, "labels": (x[:, 0] > 0).long()}]
    with pytest.raises(TrainingDivergedError, match="step 1 of 4"):
        lora_fx.train(model, batches, cross_entropy_on("logits"), steps=4, lr=1e38, progress=False)
    after = {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=0.0), "lr must be a positive, finite number"), (dict(lr=-1e-3), "lr must be a positive, finite number"),
    (dict(lr=float("nan")), "lr must be a positive"), (dict(lr=float("inf")), "lr must be a positive"),
    (dict(lr="1e-3"), "lr must be a number"),
    (dict(weight_decay=float("inf")), "weight_decay must be a finite number"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(max_grad_norm=0.0), "max_grad_norm must be above 0"), (dict(max_grad_norm=-1.0), "max_grad_norm must be above 0"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm must be above 0"),
    (dict(warmup_steps=-1), "warmup_steps must be an integer of at least 0"),
    (dict(steps=0), "steps must be at least 1"), (dict(steps=2.5), "steps must be at least 1"),
    (dict(seed=2**64), r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
])
def test_numbers_torch_would_misuse_are_refused_before_any_step(llama, kwargs, match):
    start = _adapters(llama)
    calls = []
    kwargs = {"steps": 2, **kwargs}
    with pytest.raises(ConfigError, match=match):
        lora_fx.train(llama, _counting_batches(1), lambda o, b: calls.append(1) or cross_entropy_on("logits")(o, b),
                      progress=False, **kwargs)
    assert not calls and _equal(_adapters(llama), start)


def test_an_infinite_clip_norm_and_numpy_numbers_are_accepted(llama):
    # inf: no clipping, the norms still recorded; numpy scalars are numbers like any other.
    result = lora_fx.train(llama, _counting_batches(1), cross_entropy_on("logits"), steps=np.int64(2), lr=np.float32(1e-3),
                           max_grad_norm=float("inf"), progress=False)
    assert result.steps == 2 and all(math.isfinite(n) for n in result.grad_norms)


def test_resuming_with_another_lr_is_refused_instead_of_running_the_old_one(tmp_path):
    """The checkpoint's optimizer state carries the run's own lr: a resume asked to use a lower one (the way
    out of a divergence) used to run the old lr again, silently."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((8, 8)).astype(np.float32))
    batches = [{"x": x, "labels": (x[:, 0] > 0).long()}]
    loss = cross_entropy_on("logits")
    ckpt = tmp_path / "ckpt"
    full = lora_fx.train(om.mlp(), batches, loss, steps=4, lr=1e-2, progress=False)
    lora_fx.train(om.mlp(), batches, loss, steps=2, lr=1e-2, progress=False, checkpoint_dir=str(ckpt), checkpoint_every=2)
    for kwargs, name in ((dict(lr=1e-3), "lr"), (dict(lr=1e-2, weight_decay=0.1), "weight_decay")):
        model = om.mlp()
        before = {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items()}
        with pytest.raises(ConfigError, match=rf"continues a run with {name}=.*pass {name}="):
            lora_fx.train(model, batches, loss, steps=4, progress=False, checkpoint_dir=str(ckpt), resume=True, **kwargs)
        assert all(np.array_equal(v.const_value.numpy(), before[k]) for k, v in model.graph.initializers.items())
    # The same values resume the same curve.
    resumed = lora_fx.train(om.mlp(), batches, loss, steps=4, lr=1e-2, progress=False, checkpoint_dir=str(ckpt), resume=True)
    assert resumed.losses == full.losses
