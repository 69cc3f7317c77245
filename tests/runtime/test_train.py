"""lora_fx.train through rewritten graphs: the loss falls, only adapters move, the base stays bitwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lora_fx
from lora_fx.errors import ConfigError
from lora_fx.passes.fx.capture import meta
from lora_fx.runtime.train import cross_entropy_on
from tests.models import VOCAB


def _counting_batches(n: int = 4, batch: int = 8, seq: int = 12) -> list[dict[str, torch.Tensor]]:
    """Next-token task: each sequence counts upward modulo the vocabulary from a random start."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        start = torch.randint(0, VOCAB, (batch, 1), generator=gen)
        ids = (start + torch.arange(seq + 1)) % VOCAB
        out.append({"input_ids": ids[:, :-1], "attention_mask": torch.ones(batch, seq, dtype=torch.long), "labels": ids[:, 1:]})
    return out


def _base_state(gm):
    return {n: p.detach().clone() for n, p in gm.named_parameters() if ".lora_" not in n}


# The tiny models' frozen output layers give logits of about +-0.5 (init std 0.02), too flat to fit any
# task; an adapter on lm_head too (tied to the embeddings in GPT-2) lets the loss fall within 30 steps.
TRAIN_TARGETS = {"llama": ["q_proj", "v_proj", "up_proj", "down_proj", "lm_head"], "gpt2": ["c_attn", "c_fc", "lm_head"]}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_training_lowers_the_loss_and_moves_only_adapters(zoo, name):
    config = lora_fx.LoraConfig(r=8, lora_alpha=16, target_modules=TRAIN_TARGETS[name], lora_dropout=0.1)
    gm = lora_fx.apply(zoo.gm(name), config)
    base = _base_state(gm)
    adapters_before = {n: p.detach().clone() for n, p in gm.named_parameters() if ".lora_" in n}
    batches = _counting_batches()
    result = lora_fx.train(gm, batches, cross_entropy_on("logits"), steps=30, lr=3e-2, progress=False)

    assert result.steps == 30 and len(result.losses) == 30 and len(result.grad_norms) == 30
    first = sum(result.losses[:3]) / 3
    assert result.final_loss < 0.6 * first, result.losses
    assert result.trainable_parameters == sum(p.numel() for p in adapters_before.values())
    assert result.tokens_seen == 30 * 8 * 12

    for n, p in gm.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n  # bitwise
            assert not p.requires_grad and p.grad is None, n
    assert all(not torch.equal(gm.get_parameter(n), v) for n, v in adapters_before.items() if "lora_B" in n)
    assert meta(gm)["training"] is False  # back in eval mode: dropout off
    assert not any(n.args[2] for n in gm.graph.nodes if n.target is torch.ops.aten.dropout.default)


def test_gradients_reach_adapters_only(zoo):
    gm = lora_fx.apply(zoo.gm("bert"), lora_fx.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    out = gm(**{k: v for k, v in _counting_batches(1)[0].items() if k != "labels"})
    out[0].pow(2).mean().backward()
    grads = {n: p.grad for n, p in gm.named_parameters()}
    adapters = {n for n in grads if ".lora_" in n}
    assert len(adapters) == 8
    for n, g in grads.items():
        if n in adapters:
            assert g is not None and float(g.abs().sum()) > 0, n
        else:
            assert g is None, n


def test_seeded_runs_repeat_exactly(zoo):
    def once():
        gm = lora_fx.apply(zoo.gm("llama"), lora_fx.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.2))
        torch.manual_seed(123)  # the same A init for both runs; train's seed then fixes dropout
        with torch.no_grad():
            for site in meta(gm)["lora_sites"]:
                torch.nn.init.normal_(gm.get_submodule(site).lora_A.weight)
        return lora_fx.train(gm, _counting_batches(2), cross_entropy_on("logits"), steps=5, progress=False, seed=7).losses

    assert once() == once()


def test_bf16_autocast_trains(zoo):
    gm = lora_fx.apply(zoo.gm("llama"), lora_fx.LoraConfig(r=4, target_modules="all-linear"))
    result = lora_fx.train(gm, _counting_batches(2), cross_entropy_on("logits"), steps=4, lr=1e-2, bf16=True, progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert all(p.dtype == torch.float32 for p in gm.parameters())


def test_bad_arguments_are_refused(zoo):
    loss = cross_entropy_on("logits")
    gm = lora_fx.apply(zoo.gm("llama"), lora_fx.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="steps must be at least 1"):
        lora_fx.train(gm, _counting_batches(1), loss, steps=0, progress=False)
    with pytest.raises(ConfigError, match="batches is empty"):
        lora_fx.train(gm, [], loss, steps=1, progress=False)
    with pytest.raises(ConfigError, match="no adapter"):
        plain = zoo.gm("llama")
        for p in plain.parameters():
            p.requires_grad_(False)
        lora_fx.train(plain, _counting_batches(1), loss, steps=1, progress=False)


def test_a_graph_without_adapters_is_refused_and_the_users_model_kept(zoo):
    """``apply`` forgotten: the captured graph shares its parameters with the user's nn.Module, and training it
    would fine-tune all of them. Refused before any step, with the way out; the same graph with an adapter trains."""
    from tests.models import build, inputs

    model = build("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gm = lora_fx.capture(model, kwargs=inputs(2, 8))
    assert any(p1 is p2 for p1, p2 in zip(gm.parameters(), model.parameters()))  # what makes this matter
    ran = []
    with pytest.raises(ConfigError, match=r"no adapter \(no LoRA or prefix site, no modules_to_save\).*"
                                          r"Apply a LoraConfig or PrefixConfig first"):
        lora_fx.train(gm, _counting_batches(1), cross_entropy_on("logits"), steps=2, progress=False,
                      on_step=lambda s, v: ran.append(s))
    assert ran == []
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in gm.parameters())
    # With an adapter the same graph trains, and the user's base weights still stay as they were.
    gm = lora_fx.apply(gm, lora_fx.LoraConfig(r=2, target_modules=["q_proj"]))
    result = lora_fx.train(gm, _counting_batches(1), cross_entropy_on("logits"), steps=2, progress=False)
    assert result.steps == 2 and result.trainable_parameters < sum(p.numel() for p in before.values()) // 10
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_an_onnx_model_without_adapters_is_refused_the_same_way():
    """The ONNX route follows the same rule: a graph without adapter initializers trains nothing, with the way out."""
    from tests.runtime import onnx_models as om
    from tests.runtime.test_train_onnx import _mlp_batches

    model = om.mlp(lora=False)
    before = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    with pytest.raises(ConfigError, match=r"no adapter initializers to train; apply one first: lora_fx\.apply"):
        lora_fx.train(model, _mlp_batches(1), cross_entropy_on("logits"), steps=1, progress=False)
    assert all(np.array_equal(v.const_value.numpy(), before[n]) for n, v in model.graph.initializers.items())
