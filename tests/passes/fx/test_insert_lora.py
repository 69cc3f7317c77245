"""insert_lora: the rewritten graph computes PEFT's LoRA exactly (same A and B), and nothing when B is zero."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import lora_fx
from lora_fx.errors import AdapterError
from lora_fx.passes.fx.capture import meta
from lora_fx.passes.fx.insert_lora import InsertLora
from lora_fx.targeting import select_targets
from tests.models import ALL, TINY, copy_ours_into_peft, inputs, max_rel, peft_wrap, run

DEFAULT_TARGETS = {"minilm": ["query", "value"], "bert": ["query", "value"], "gpt2": "all-linear", "llama": "all-linear",
                   "falcon": "all-linear"}
# Sizes other than the capture example (2, 8): the graph has dynamic batch and sequence dims.
SHAPES = [(2, 8, 0), (3, 11, 4), (1, 5, 0), (4, 16, 7)]


def _params(name: str) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n == "minilm" else n for n in name]


@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.parametrize("name", _params(ALL))
def test_zero_initialized_lora_changes_no_output(zoo, name, init):
    gm = lora_fx.apply(zoo.gm(name), lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init))
    assert meta(gm)["lora_sites"]
    for batch, seq, pad in SHAPES[:2]:
        b = inputs(batch, seq, pad=pad)
        assert max_rel(run(gm, b), run(zoo.model(name), b)) <= 1e-6


def _parity(zoo, name, **kwargs):
    kwargs.setdefault("target_modules", DEFAULT_TARGETS[name])
    kwargs.setdefault("r", 4)
    kwargs.setdefault("lora_alpha", 8)
    gm = lora_fx.apply(zoo.gm(name), lora_fx.LoraConfig(init_lora_weights=False, **kwargs))
    pm = peft_wrap(zoo.model(name), init_lora_weights=False, **kwargs)
    copy_ours_into_peft(gm, pm)
    for batch, seq, pad in SHAPES:
        b = inputs(batch, seq, pad=pad, seed=batch)
        ours, theirs = run(gm, b), run(pm, b)
        assert ours.shape == theirs.shape
        assert max_rel(ours, theirs) <= 1e-5, (batch, seq, pad)
        # The adapters really change the output, so the comparison above can fail.
        assert max_rel(ours, run(zoo.model(name), b)) > 1e-3
    return gm


@pytest.mark.parametrize("name", _params(ALL))
def test_random_adapters_equal_peft(zoo, name):
    _parity(zoo, name)


@pytest.mark.parametrize("name", TINY)
def test_rslora_equals_peft(zoo, name):
    gm = _parity(zoo, name, use_rslora=True, r=8, lora_alpha=16)
    assert {rec["scale"] for rec in meta(gm)["lora_sites"].values()} == {16 / math.sqrt(8)}


PATTERNS = {
    "bert": dict(target_modules=["query", "value", "dense"], rank_pattern={"value": 2, "dense": 8},
                 alpha_pattern={"query": 3, r"layer\.1\.output\.dense": 20}),
    "gpt2": dict(target_modules="all-linear", rank_pattern={"c_fc": 2}, alpha_pattern={r"h\.1\.attn\.c_attn": 2}),
    "llama": dict(target_modules="all-linear", rank_pattern={"mlp.*": 8}, alpha_pattern={"v_proj": 32}),
}


@pytest.mark.parametrize("name", TINY)
def test_rank_and_alpha_patterns_equal_peft(zoo, name):
    gm = _parity(zoo, name, **PATTERNS[name])
    assert len({rec["r"] for rec in meta(gm)["lora_sites"].values()}) > 1


@pytest.mark.parametrize("name", TINY)
def test_rslora_with_rank_and_alpha_patterns_equals_peft(zoo, name):
    """PEFT scales each site by its own alpha / sqrt(its own r) (it warns only for PiSSA-style inits)."""
    gm = _parity(zoo, name, use_rslora=True, **PATTERNS[name])
    scales = {(rec["r"], rec["alpha"], rec["scale"]) for rec in meta(gm)["lora_sites"].values()}
    assert len(scales) > 1 and all(scale == pytest.approx(alpha / math.sqrt(r)) for r, alpha, scale in scales)


def test_dropout_in_eval_mode_equals_peft(zoo):
    _parity(zoo, "llama", lora_dropout=0.3)


def test_parameters_are_registered_in_peft_layout(zoo):
    gm = lora_fx.apply(zoo.gm("gpt2"), lora_fx.LoraConfig(r=3, target_modules=["c_fc"], lora_alpha=6))
    named = dict(gm.named_parameters())
    # GPT-2's Conv1D stores [in, out]; the adapter is still A [r, in], B [out, r].
    assert named["transformer.h.0.mlp.c_fc.lora_A.weight"].shape == (3, 32)
    assert named["transformer.h.0.mlp.c_fc.lora_B.weight"].shape == (128, 3)
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.mlp.c_fc.lora_{w}.weight" for i in (0, 1) for w in "AB"}


def test_initialisation_follows_peft(zoo):
    gm = lora_fx.apply(zoo.gm("llama"), lora_fx.LoraConfig(r=8, target_modules=["q_proj"]))
    a = gm.get_submodule("model.layers.0.self_attn.q_proj").lora_A.weight
    b = gm.get_submodule("model.layers.0.self_attn.q_proj").lora_B.weight
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on fan_in=32
    assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound
    assert torch.count_nonzero(b) == 0
    gm = lora_fx.apply(zoo.gm("llama"), lora_fx.LoraConfig(r=8, target_modules="all-linear", init_lora_weights="gaussian"))
    a = torch.cat([gm.get_submodule(s).lora_A.weight.flatten() for s in meta(gm)["lora_sites"]])
    assert float(a.std()) == pytest.approx(1 / 8, rel=0.1)


def test_apply_twice_on_the_same_sites_is_refused(zoo):
    gm = lora_fx.apply(zoo.gm("bert"), lora_fx.LoraConfig(r=2, target_modules=["query"]))
    before = gm.code
    with pytest.raises(AdapterError, match="already has a LoRA adapter"):
        lora_fx.apply(gm, lora_fx.LoraConfig(r=2, target_modules=["query", "key"]))
    assert gm.code == before
    # Inserting directly (not through apply) is refused too, before anything changes.
    targets = select_targets(lora_fx.find_sites(zoo.gm("bert")), lora_fx.LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(AdapterError):
        InsertLora(targets)(gm)


def test_inserted_branches_are_not_sites(zoo):
    gm = zoo.gm("llama")
    before = [(s.name, s.kind) for s in lora_fx.find_sites(gm)]
    lora_fx.apply(gm, lora_fx.LoraConfig(r=2, target_modules="all-linear"))
    assert [(s.name, s.kind) for s in lora_fx.find_sites(gm)] == before


def test_pass_result_lists_adapted_sites(zoo):
    gm = zoo.gm("bert")
    targets = select_targets(lora_fx.find_sites(gm), lora_fx.LoraConfig(r=2, target_modules=["value"]))
    result = InsertLora(targets)(gm)
    assert result.modified and result.changed == [f"encoder.layer.{i}.attention.self.value" for i in (0, 1)]


def test_a_second_config_on_other_sites_is_refused(zoo, tmp_path):
    # Two LoraConfigs on one graph would make save_adapter write a config that does not fit its tensors.
    gm = lora_fx.apply(zoo.gm("llama"), lora_fx.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match="already has a LoRA adapter on 2 sites .*capture the model again"):
        lora_fx.apply(gm, lora_fx.LoraConfig(r=4, target_modules=["k_proj"]))
    assert set(meta(gm)["lora_sites"]) == {f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)}
    assert meta(gm)["adapters"]["default"].target_modules == ["q_proj"]


def test_tied_output_layer_equals_peft(zoo):
    # GPT-2's lm_head shares wte's weight; the exported graph has no lm_head module to hang LoRA on.
    _parity(zoo, "gpt2", target_modules=["c_attn", "lm_head"])


@pytest.mark.slow
def test_bf16_model_equals_peft():
    from tests.models import build

    model = build("llama").to(torch.bfloat16)
    gm = lora_fx.capture(model, kwargs=inputs(2, 8))
    lora_fx.apply(gm, lora_fx.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    pm = peft_wrap(model, r=4, target_modules="all-linear", init_lora_weights=False)
    copy_ours_into_peft(gm, pm)
    # Adapters stay fp32 on a bf16 base, the branch runs in fp32 and the sum returns to bf16, as in PEFT.
    assert {p.dtype for n, p in gm.named_parameters() if ".lora_" in n} == {torch.float32}
    b = inputs(3, 9, pad=2)
    ours, theirs = run(gm, b), run(pm, b)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert max_rel(ours.float(), theirs.float()) <= 1e-5



class _SelfAttention(torch.nn.Module):
    """nn.MultiheadAttention runs F.linear on its out_proj child's weight itself, not through the child."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_a_linear_called_by_its_parent_gets_its_own_adapter():
    torch.manual_seed(0)
    model = _SelfAttention().eval()
    gm = lora_fx.capture(model, (torch.randn(2, 5, 16),))
    lora_fx.apply(gm, lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=["out_proj"], init_lora_weights=False))
    assert list(meta(gm)["lora_sites"]) == ["attn.out_proj"]
    mod = gm.get_submodule("attn.out_proj")
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.attn.out_proj.weight += 2.0 * mod.lora_B.weight @ mod.lora_A.weight  # W + (alpha / r) B A
        for b, s in [(2, 5), (3, 7)]:
            x = torch.randn(b, s, 16)
            assert max_rel(gm(x), ref(x)) <= 1e-5
            assert max_rel(gm(x), model(x)) > 1e-3


class _TwoWeights(torch.nn.Module):
    """F.linear on two parameters of its own: two sites with one module path."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(8, 8))
        self.w2 = torch.nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return F.linear(torch.relu(F.linear(x, self.w1)), self.w2)


class _Holder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blk = _TwoWeights()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.blk(x))


def test_a_module_with_several_weights_of_its_own_is_refused():
    gm = lora_fx.capture(_Holder().eval(), (torch.randn(2, 8),))
    assert [s.name for s in lora_fx.find_sites(gm)] == ["blk", "blk", "fc"]
    code = gm.code
    # One (A, B) cannot serve two different weights: refused with the way out, before anything changes.
    with pytest.raises(AdapterError, match=r"reads several weights \(blk.w1, blk.w2\).*exclude_modules"):
        lora_fx.apply(gm, lora_fx.LoraConfig(r=2, target_modules=["blk", "fc"]))
    assert gm.code == code and not meta(gm).get("lora_sites")
    lora_fx.apply(gm, lora_fx.LoraConfig(r=2, target_modules=["fc"]))
    assert list(meta(gm)["lora_sites"]) == ["fc"]


def test_transposed_weight_matmul_equals_peft(zoo):
    """Falcon's x @ W.T + b sites: the branch joins the matmul's output, PEFT's numbers."""
    _parity(zoo, "falcon")
