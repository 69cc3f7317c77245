"""set_training_mode: dropout in the exported graph is on in training mode only."""

from __future__ import annotations

import torch

import lora_fx
from lora_fx.passes.fx.capture import meta
from lora_fx.passes.fx.set_training_mode import set_training_mode
from tests.models import copy_ours_into_peft, inputs, max_rel, peft_wrap, run


def _dropout_flags(gm):
    return [n.args[2] for n in gm.graph.nodes if n.target is torch.ops.aten.dropout.default]


def test_lora_dropout_is_stochastic_in_training_and_deterministic_in_eval(zoo):
    # Tiny Llama has no dropout of its own in the graph, so any randomness is LoRA dropout.
    plain = zoo.gm("llama")
    set_training_mode(plain, True)
    b = inputs(2, 8, pad=2)
    assert torch.equal(run(plain, b), run(plain, b))

    gm = lora_fx.apply(zoo.gm("llama"), lora_fx.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.5, init_lora_weights=False))
    pm = peft_wrap(zoo.model("llama"), r=4, target_modules="all-linear", lora_dropout=0.5, init_lora_weights=False)
    copy_ours_into_peft(gm, pm)
    eval_out = run(gm, b)
    assert torch.equal(eval_out, run(gm, b))
    assert max_rel(eval_out, run(pm, b)) <= 1e-5

    result = set_training_mode(gm, True)
    assert result.modified and meta(gm)["training"] is True
    assert set(_dropout_flags(gm)) == {True}
    first, second = run(gm, b), run(gm, b)
    assert max_rel(first, second) > 1e-3
    assert max_rel(first, eval_out) > 1e-3

    result = set_training_mode(gm, False)
    assert result.modified and meta(gm)["training"] is False
    assert torch.equal(run(gm, b), eval_out)
    assert not set_training_mode(gm, False).modified  # already in eval mode: nothing to change


def test_dropout_acts_on_the_adapter_branch_only(zoo):
    # With B = 0 the branch adds nothing however its input is dropped: training mode equals the base.
    gm = lora_fx.apply(zoo.gm("llama"), lora_fx.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.9))
    set_training_mode(gm, True)
    b = inputs(2, 8)
    assert max_rel(run(gm, b), run(zoo.model("llama"), b)) <= 1e-6


def test_model_dropout_follows_the_mode_too(zoo):
    # BERT's own hidden dropout (p=0.1) is in the graph as aten.dropout: training mode turns it on, as
    # model.train() would.
    gm = zoo.gm("bert")
    assert _dropout_flags(gm) and set(_dropout_flags(gm)) == {False}
    set_training_mode(gm, True)
    b = inputs(2, 8)
    assert max_rel(run(gm, b), run(gm, b)) > 1e-4
    set_training_mode(gm, False)
    assert max_rel(run(gm, b), run(zoo.model("bert"), b)) <= 1e-6


def test_gm_train_and_eval_switch_the_mode_as_set_training_mode_does(zoo):
    """PEFT users call model.eval() / model.train(): on the exported module torch raised a bare NotImplementedError.
    On what capture and apply return they switch dropout through set_training_mode (the reference), return the
    module, and gm.training reports the mode (False after capture, which traces in eval mode); copies keep them."""
    import copy

    config = lora_fx.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.5, init_lora_weights=False)
    captured = zoo.gm("llama")
    assert captured.training is False
    assert captured.eval() is captured and captured.training is False
    gm = lora_fx.apply(captured, config)
    reference = copy.deepcopy(gm)
    b = inputs(2, 8, pad=2)
    eval_out = run(gm, b)

    assert gm.train() is gm and gm.training is True and meta(gm)["training"] is True
    assert all(m.training for m in gm.modules())
    set_training_mode(reference, True)
    assert _dropout_flags(gm) == _dropout_flags(reference) and set(_dropout_flags(gm)) == {True}
    torch.manual_seed(3)
    first = run(gm, b)
    torch.manual_seed(3)
    assert torch.equal(first, run(reference, b))  # the same draws: the same graph as set_training_mode's
    assert max_rel(first, run(gm, b)) > 1e-3  # dropout active: calls differ

    assert gm.eval() is gm and gm.training is False and meta(gm)["training"] is False
    assert not any(m.training for m in gm.modules())
    assert torch.equal(run(gm, b), eval_out) and torch.equal(run(gm, b), run(gm, b))
    gm.train(True)
    gm.train(False)  # train(mode) as nn.Module takes it
    assert gm.training is False and set(_dropout_flags(gm)) == {False}

    copied = copy.deepcopy(gm)
    copied.train()
    assert copied.training is True and gm.training is False  # the copy's methods act on the copy


def test_gm_train_on_the_models_own_dropout(zoo):
    # BERT's hidden dropout (p=0.1) follows gm.train() / gm.eval() as model.train() / model.eval() would.
    gm = zoo.gm("bert")
    b = inputs(2, 8)
    eval_out = run(gm, b)
    gm.train()
    assert max_rel(run(gm, b), run(gm, b)) > 1e-4
    gm.eval()
    assert torch.equal(run(gm, b), eval_out)
