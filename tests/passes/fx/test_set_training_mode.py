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
