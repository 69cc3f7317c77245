"""lora_fx.train refuses what it cannot train with before the first update, naming the argument, the batch key or
what loss_fn returned and the way out (each of these used to end in a TypeError, AttributeError or autograd error
from deep inside torch, or in an error only after the last step); a resume past the asked steps trains nothing and
says so; a checkpoint of another model names the parameters that differ; checkpoint files get ordinary modes."""

from __future__ import annotations

import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import lora_fx
from lora_fx import files
from lora_fx.errors import ConfigError
from lora_fx.runtime.checkpoint import load_checkpoint, save_checkpoint
from lora_fx.runtime.train import cross_entropy_on
from tests.runtime import onnx_models as om
from tests.runtime.test_train import _counting_batches
from tests.runtime.test_train_onnx import _mlp_batches as _train_onnx_batches

LOSS = cross_entropy_on("logits")


@pytest.fixture()
def llama(zoo):
    config = lora_fx.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    return lora_fx.apply(zoo.gm("llama"), config)


def _adapters(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _onnx_adapters(model) -> dict[str, np.ndarray]:
    return {n: model.graph.initializers[n].const_value.numpy().copy() for n in ("fc1.lora_A.weight", "fc1.lora_B.weight")}


def _mlp_batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    return _train_onnx_batches(n)


_MLP = object()


def _refused(model, match: str, batches=_MLP, loss_fn=LOSS, **kwargs) -> None:
    """train refuses with ``match`` before any step completes."""
    ran: list[int] = []
    with pytest.raises(ConfigError, match=match):
        lora_fx.train(model, _mlp_batches() if batches is _MLP else batches, loss_fn, steps=2, progress=False,
                      on_step=lambda s, v: ran.append(s), **kwargs)
    assert ran == []


# ---- 1. the arguments themselves ---------------------------------------------------------------------------


@pytest.mark.parametrize("batches,loss_fn,match", [
    (None, LOSS, r"batches must be a list of batches .* got NoneType None"),
    (5, LOSS, r"batches must be a list of batches .* got int 5"),
    ("x", LOSS, r"batches must be a list of batches"),
    ({"x": torch.zeros(2, 8)}, LOSS, r"batches is a single batch \(a dict\); pass a list of batches, e.g. \[batch\]"),
    ([], LOSS, "batches is empty"),
    ("mlp", None, r"loss_fn must be a function loss_fn\(outputs, batch\) .* got NoneType None"),
    ("mlp", "logits", r"loss_fn must be a function .* got str 'logits'"),
])
def test_batches_and_loss_fn_that_are_no_such_thing_are_named(batches, loss_fn, match) -> None:
    model = om.mlp()
    before = _onnx_adapters(model)
    _refused(model, match, _mlp_batches() if batches == "mlp" else batches, loss_fn)
    assert all(np.array_equal(v, before[k]) for k, v in _onnx_adapters(model).items())


def test_a_batch_that_is_no_dict_and_iterables_without_batches_are_named() -> None:
    _refused(om.mlp(), r"batch 1 is a tuple; each batch must be a dict", [(torch.zeros(2, 8), torch.zeros(2))])
    _refused(om.mlp(), "batches yielded no batch", iter([]))
    calls = []

    def no_epochs():
        # Called again for each epoch: an empty one used to be called forever (the loop hung).
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("called again and again")
        return []

    _refused(om.mlp(), r"batches\(\) returned no batches in epoch 1", no_epochs)
    _refused(om.mlp(), r"batches\(\) returned NoneType None in epoch 1", lambda: None)


def test_an_iterable_that_runs_out_warns_and_the_callable_form_trains_every_step() -> None:
    with pytest.warns(UserWarning, match="batches ran out after step 3 of 5"):
        short = lora_fx.train(om.mlp(), iter(_mlp_batches()), LOSS, steps=5, progress=False)
    assert short.steps == 3
    full = lora_fx.train(om.mlp(), lambda: iter(_mlp_batches()), LOSS, steps=5, progress=False)
    cycled = lora_fx.train(om.mlp(), _mlp_batches(), LOSS, steps=5, progress=False)
    assert full.losses == cycled.losses and full.losses[:3] == short.losses


# ---- 2. what loss_fn returns ---------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn,match", [
    (lambda out, b: "loss", r"loss_fn returned str 'loss' at step 1; loss_fn must return a scalar floating torch tensor"),
    (lambda out, b: 0.5, r"loss_fn returned float 0.5 at step 1"),
    (lambda out, b: out["logits"].pow(2).mean(-1), r"returned a tensor of shape \(16,\) at step 1.*reduce it to one number"),
    (lambda out, b: (out["logits"].argmax(-1) == b["labels"]).sum(), r"returned a tensor of dtype int64 at step 1.*integers"),
    (lambda out, b: LOSS(out, b).detach(), r"returned a tensor that does not depend on the model's outputs at step 1"),
    (lambda out, b: b["x"].pow(2).mean(), r"does not depend on the model's outputs"),
])
def test_a_loss_that_is_no_trainable_scalar_is_named(loss_fn, match) -> None:
    model = om.mlp()
    before = _onnx_adapters(model)
    _refused(model, match, loss_fn=loss_fn)
    assert all(np.array_equal(v, before[k]) for k, v in _onnx_adapters(model).items())


def test_a_loss_that_is_no_trainable_scalar_is_named_on_a_torch_graph(llama) -> None:
    before = _adapters(llama)
    with pytest.raises(ConfigError, match=r"returned a tensor of shape \(8, 12\) at step 1"):
        lora_fx.train(llama, _counting_batches(1), lambda out, b: out["logits"].mean(-1), steps=2, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in _adapters(llama).items())


def test_training_inside_no_grad_trains_as_outside() -> None:
    # A caller's torch.no_grad() left the loss without a graph ("element 0 of tensors does not require grad").
    reference = lora_fx.train(om.mlp(), _mlp_batches(), LOSS, steps=3, progress=False)
    with torch.no_grad():
        inside = lora_fx.train(om.mlp(), _mlp_batches(), LOSS, steps=3, progress=False)
    assert inside.losses == reference.losses


# ---- 3. batches that do not fit the model ---------------------------------------------------------------


def _llama_batch(**change) -> dict[str, torch.Tensor]:
    batch = dict(_counting_batches(1)[0])
    for key, value in change.items():
        if value is None:
            batch.pop(key)
        else:
            batch[key] = value
    return batch


TAKES = r"the model takes input_ids \(int64, \(batch, seq\)\), attention_mask \(int64, \(batch, seq\)\)"


@pytest.mark.parametrize("change,match", [
    (dict(input_ids=None), rf"batch 1 lacks the model input\(s\) \['input_ids'\]; {TAKES}; the batch's keys \['labels'\] "),
    (dict(input_ids=None, input_id=torch.zeros(8, 12, dtype=torch.long)), r"the batch's keys \['labels', 'input_id'\] are none"),
    (dict(attention_mask=None), rf"lacks the model input\(s\) \['attention_mask'\]; {TAKES}"),
    (dict(input_ids=torch.zeros(8, 12)), r"batch 1: 'input_ids' is float32, but the model input 'input_ids' is int64: "
                                         r"convert it \(.to\(torch.int64\)\)"),
    (dict(input_ids=torch.zeros(1, 8, 12, dtype=torch.long)),
     r"batch 1: 'input_ids' has shape \(1, 8, 12\), but graph input 'input_ids' is \('batch', 'seq'\): give it the shape "
     r"\(batch, seq\)"),
    (dict(attention_mask=torch.ones(8, 10, dtype=torch.long)),
     r"batch 1: inputs 'input_ids' and 'attention_mask' differ along the graph's dim 'seq' \(12 vs 10\)"),
    (dict(input_ids=[[1, 2, 3]]), r"batch 1: 'input_ids' is list \[\[1, 2, 3\]\]; the model input 'input_ids' takes a tensor"),
])
def test_batches_that_do_not_fit_a_captured_graph_are_named(llama, change, match) -> None:
    before = _adapters(llama)
    with pytest.raises(ConfigError, match=match):
        lora_fx.train(llama, [_llama_batch(**change)], LOSS, steps=1, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in _adapters(llama).items())


def test_a_bad_batch_later_in_the_data_is_named_with_its_number(llama) -> None:
    good = _counting_batches(2)
    bad = dict(good[1], input_ids=good[1]["input_ids"].float())
    with pytest.raises(ConfigError, match="batch 2: 'input_ids' is float32"):
        lora_fx.train(llama, [good[0], bad], LOSS, steps=2, progress=False)


def test_int32_ids_and_extra_keys_train_a_captured_graph_as_int64_ids_do(zoo) -> None:
    # The check refuses another kind of dtype only: the graph computes the same with int32 ids, and keys that name
    # no input (labels, here also token_type_ids) reach loss_fn only.
    def run(batches):
        torch.manual_seed(0)
        gm = lora_fx.apply(zoo.gm("llama"), lora_fx.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        return lora_fx.train(gm, batches, LOSS, steps=2, progress=False).losses

    reference = run(_counting_batches(2))
    narrow = [dict(b, input_ids=b["input_ids"].int(), token_type_ids=torch.zeros_like(b["input_ids"]))
              for b in _counting_batches(2)]
    assert run(narrow) == reference


@pytest.mark.parametrize("x,match", [
    (torch.randn(1, 16, 8), r"batch 1: 'x' has shape \(1, 16, 8\), but graph input 'x' is \('batch', 8\): give it the "
                            r"shape \(batch, 8\)"),
    (torch.randn(16, 5), r"batch 1: 'x' has shape \(16, 5\), but graph input 'x' is \('batch', 8\)"),
    (torch.randn(8), r"batch 1: 'x' has shape \(8,\)"),
    (torch.randn(16, 8).double(), r"batch 1: 'x' is float64, but the graph input 'x' is float32: convert it "
                                  r"\(.to\(torch.float32\)\)"),
    (torch.ones(16, 8, dtype=torch.long), r"batch 1: 'x' is int64, but the graph input 'x' is float32"),
    (np.array([["a"] * 8] * 16), r"batch 1: 'x' holds <U1 values; the graph input 'x' takes numbers \(x \(float32, "
                                 r"\(batch, 8\)\)\)"),
])
def test_batches_that_do_not_fit_an_onnx_graph_are_named(x, match) -> None:
    # The first used to fail in runtime/onnx_ops/matmul.py: "mat1 and mat2 shapes cannot be multiplied".
    model = om.mlp()
    before = _onnx_adapters(model)
    _refused(model, match, [{"x": x, "labels": torch.zeros(16, dtype=torch.long)}])
    _refused(om.mlp(), r"batch 1 lacks the graph input\(s\) \['x'\]; the model takes x \(float32, \(batch, 8\)\); the "
                       r"batch's keys \['X', 'labels'\]", [{"X": x, "labels": torch.zeros(16, dtype=torch.long)}])
    assert all(np.array_equal(v, before[k]) for k, v in _onnx_adapters(model).items())


def test_numpy_batches_train_an_onnx_graph_as_tensors_do() -> None:
    as_numpy = [{k: v.numpy() for k, v in b.items()} for b in _mlp_batches()]
    reference = lora_fx.train(om.mlp(), _mlp_batches(), LOSS, steps=3, progress=False)
    # labels stay a tensor: the loss reads them; x is fed to the graph as a numpy array
    mixed = [{"x": n["x"], "labels": t["labels"]} for n, t in zip(as_numpy, _mlp_batches())]
    assert lora_fx.train(om.mlp(), mixed, LOSS, steps=3, progress=False).losses == reference.losses


# ---- 4. checkpoint_dir --------------------------------------------------------------------------------------


def test_a_checkpoint_dir_that_is_a_file_is_refused_before_the_first_step(tmp_path: Path) -> None:
    # It used to fail with FileExistsError after training, when the first checkpoint was written.
    (tmp_path / "ck").write_text("notes")
    _refused(om.mlp(), r"checkpoint_dir .*ck is a file; name a folder", checkpoint_dir=str(tmp_path / "ck"))
    _refused(om.mlp(), r"cannot write into .*is a file, not a folder", checkpoint_dir=str(tmp_path / "ck" / "sub"))
    assert (tmp_path / "ck").read_text() == "notes"
    _refused(om.mlp(), "resume=True needs checkpoint_dir", resume=True)
    _refused(om.mlp(), "checkpoint_every must be an integer of at least 0", checkpoint_dir=str(tmp_path / "d"),
             checkpoint_every=-1)


# ---- 5. resuming past the asked steps ---------------------------------------------------------------------


def test_resuming_a_checkpoint_past_the_asked_steps_trains_nothing_and_says_so(tmp_path: Path) -> None:
    ck = str(tmp_path / "ck")
    four_model = om.mlp()
    four = lora_fx.train(four_model, _mlp_batches(), LOSS, steps=4, progress=False, checkpoint_dir=ck)
    model, ran = om.mlp(), []
    with pytest.warns(UserWarning, match=r"checkpoint in .*ck is already at step 4, past the 2 steps asked for: nothing "
                                         r"was trained; the model holds the adapters of step 4"):
        result = lora_fx.train(model, _mlp_batches(), LOSS, steps=2, progress=False, checkpoint_dir=ck, resume=True,
                               on_step=lambda s, v: ran.append(s))
    assert ran == [] and result.steps_this_run == 0 and result.resumed_from_step == 4 and result.steps == 4
    assert result.losses == four.losses and result.to_dict()["steps_this_run"] == 0
    assert all(np.array_equal(v, _onnx_adapters(four_model)[k]) for k, v in _onnx_adapters(model).items())

    # Below the checkpoint's step: no warning, and the result counts this call's steps apart.
    six_ref = lora_fx.train(om.mlp(), _mlp_batches(), LOSS, steps=6, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        six = lora_fx.train(om.mlp(), _mlp_batches(), LOSS, steps=6, progress=False, checkpoint_dir=ck, resume=True)
    assert (six.steps, six.steps_this_run, six.resumed_from_step) == (6, 2, 4)
    assert six.losses == six_ref.losses


# ---- 6. a checkpoint of another model ---------------------------------------------------------------------


def test_a_checkpoint_of_other_adapters_names_the_parameters_that_differ(tmp_path: Path, zoo) -> None:
    ck = str(tmp_path / "ck")
    q = lora_fx.apply(zoo.gm("llama"), lora_fx.LoraConfig(r=2, target_modules=["q_proj"]))
    lora_fx.train(q, _counting_batches(1), LOSS, steps=1, progress=False, checkpoint_dir=ck)
    v = lora_fx.apply(zoo.gm("llama"), lora_fx.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ConfigError) as info:
        lora_fx.train(v, _counting_batches(1), LOSS, steps=2, progress=False, checkpoint_dir=ck, resume=True)
    msg = str(info.value)
    assert "(4 saved, 8 in this model): 4 of the model's are not in it (" in msg
    assert "model.layers.0.self_attn.v_proj.lora_A.weight" in msg and "and 1 more)" in msg
    assert "in it are not in the model" not in msg and "Resume with the model and config the run started with" in msg


def test_a_checkpoint_of_other_shapes_names_them_and_loads_nothing(tmp_path: Path) -> None:
    ck = str(tmp_path / "ck")
    lora_fx.train(om.mlp(hidden=16), _mlp_batches(), LOSS, steps=2, progress=False, checkpoint_dir=ck)
    wide = om.mlp(hidden=32)
    before = _onnx_adapters(wide)
    module = lora_fx.runtime.onnx_torch.trainable_module(wide)
    params = dict(module.named_parameters())  # as train names them
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3, weight_decay=0.0)  # the run's own values
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(ConfigError, match=r"1 differ in shape \(fc1_lora_B_weight \(2, 16\) saved, \(2, 32\) in the "
                                          r"model\)"):
        load_checkpoint(ck, params=params, optimizer=opt, scheduler=sched)
    # lora_A fits: it used to be copied in before lora_B was refused, leaving the model half-loaded
    assert torch.equal(module.tensor("fc1.lora_A.weight").detach(), torch.from_numpy(before["fc1.lora_A.weight"]))


def test_optimizer_state_follows_the_parameter_names_not_their_order(tmp_path: Path) -> None:
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(5))
    opt = torch.optim.AdamW([a, b], lr=1e-2)
    (a.sum() + 2 * b.sum()).backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(tmp_path, step=1, params={"a": a, "b": b}, optimizer=opt, scheduler=sched, losses=[1.0],
                    grad_norms=[], tokens=0)
    a2, b2 = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(5))
    opt2 = torch.optim.AdamW([b2, a2], lr=1e-2)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    load_checkpoint(tmp_path, params={"b": b2, "a": a2}, optimizer=opt2, scheduler=sched2)
    assert torch.equal(a2, a) and torch.equal(b2, b)
    assert torch.equal(opt2.state[a2]["exp_avg"], opt.state[a]["exp_avg"])
    assert torch.equal(opt2.state[b2]["exp_avg_sq"], opt.state[b]["exp_avg_sq"])


# ---- 7. file modes ------------------------------------------------------------------------------------------


def test_checkpoint_files_get_the_mode_open_would_give(tmp_path: Path) -> None:
    # safetensors writes an owner-only temporary file of its own and renames it onto ours: checkpoint.safetensors
    # came out 0600 beside a 0644 checkpoint.json.
    lora_fx.train(om.mlp(), _mlp_batches(), LOSS, steps=1, progress=False, checkpoint_dir=str(tmp_path))
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"checkpoint.safetensors": 0o666 & ~files._UMASK, "checkpoint.json": 0o666 & ~files._UMASK}
