"""find_sites: every linear module of the source model is a site with its shapes; attention per layer."""

from __future__ import annotations

import pytest
import torch

import lora_fx
from lora_fx.sites import SiteKind
from tests.models import ALL, build, inputs

ATTENTION = {  # model: (layers, heads, kv heads, head dim)
    "minilm": (6, 12, 12, 32),
    "bert": (2, 4, 4, 8),
    "gpt2": (2, 4, 4, 8),
    "llama": (2, 4, 2, 8),
}


def _linear_modules(model: torch.nn.Module) -> dict[str, tuple[int, int, bool]]:
    """The source model's linear layers: name -> (in, out, weight stored [in, out])."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            out[name] = (m.in_features, m.out_features, False)
        elif isinstance(m, Conv1D):
            out[name] = (m.weight.shape[0], m.weight.shape[1], True)
    return out


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "minilm" else n for n in ALL])
def test_linear_sites_are_the_models_linear_layers(zoo, name):
    sites = [s for s in lora_fx.find_sites(zoo.gm(name)) if s.kind is SiteKind.LINEAR]
    expected = _linear_modules(zoo.model(name))
    assert [s.name for s in sites] == list(expected)  # graph order is module order for these models
    for s in sites:
        assert (s.in_features, s.out_features, s.fan_in_fan_out) == expected[s.name], s.name
        assert s.handle is not None and s.dtype == "float32"
        assert s.is_output_layer == (s.name == "lm_head")
    if name == "gpt2":
        assert {s.op for s in sites} == {"aten.addmm", "aten.linear"}  # Conv1D and the tied lm_head


@pytest.mark.parametrize("name", ALL)
def test_attention_sites_have_head_shapes(zoo, name):
    layers, heads, kv, hd = ATTENTION[name]
    sites = [s for s in lora_fx.find_sites(zoo.gm(name)) if s.kind is SiteKind.ATTENTION]
    assert len(sites) == layers
    for s in sites:
        assert (s.num_heads, s.kv_heads, s.head_dim, s.op) == (heads, kv, hd, "sdpa"), s.name


@pytest.mark.slow
def test_eager_attention_is_found():
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    gm = lora_fx.capture(tf.LlamaForCausalLM(cfg).eval(), kwargs=inputs(2, 8))
    att = [s for s in lora_fx.find_sites(gm) if s.kind is SiteKind.ATTENTION]
    assert [s.name for s in att] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    # Eager Llama repeats K/V to all 4 heads before the matmul; the site still reports the model's 2.
    assert {(s.op, s.num_heads, s.kv_heads, s.head_dim) for s in att} == {("eager", 4, 2, 8)}


def test_eager_bert_attention_is_found():
    import transformers as tf

    cfg = tf.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, attn_implementation="eager")
    gm = lora_fx.capture(tf.BertModel(cfg).eval(), kwargs=inputs(2, 8))
    att = [s for s in lora_fx.find_sites(gm) if s.kind is SiteKind.ATTENTION]
    assert [(s.name, s.op, s.num_heads, s.kv_heads, s.head_dim) for s in att] == [
        (f"encoder.layer.{i}.attention.self", "eager", 4, 4, 8) for i in (0, 1)
    ]


def test_a_parameter_free_matmul_is_not_a_site():
    class Mixer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 4)
            self.mix = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x, y):
            return self.proj(x @ y.transpose(-1, -2) @ x) + (x @ self.mix).sum()

    gm = lora_fx.capture(Mixer(), args=(torch.randn(2, 8), torch.randn(2, 8)))
    sites = lora_fx.find_sites(gm)
    # proj (aten.linear) and mix (a matmul on a parameter, weight [in, out]); x @ yT @ x has no weight.
    assert [(s.name, s.in_features, s.out_features, s.fan_in_fan_out) for s in sites] == [
        ("proj", 8, 4, False), ("mix", 8, 8, True),
    ]


def test_site_dict_has_the_public_fields(zoo):
    d = lora_fx.find_sites(zoo.gm("llama"))[0].to_dict()
    assert {"name", "kind", "in_features", "out_features", "op", "dtype", "fan_in_fan_out"} <= set(d)
    assert d["kind"] == "linear" and d["name"] == "model.layers.0.self_attn.q_proj"


def test_find_sites_refuses_other_objects():
    with pytest.raises(lora_fx.ConfigError, match="takes a GraphModule"):
        lora_fx.find_sites(build("bert"))


class _TorchAttention(torch.nn.Module):
    """nn.MultiheadAttention calls F.linear on its own in_proj_weight and on its out_proj child's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


def test_a_linear_called_by_its_parent_is_named_after_its_own_module():
    gm = lora_fx.capture(_TorchAttention().eval(), (torch.randn(2, 5, 16),))
    sites = [s for s in lora_fx.find_sites(gm) if s.kind is SiteKind.LINEAR]
    # out_proj is a module path (as PEFT names it), not a second site called "attn" with another shape.
    assert [(s.name, s.in_features, s.out_features) for s in sites] == [
        ("attn", 16, 48), ("attn.out_proj", 16, 16), ("fc", 16, 4),
    ]
    # PEFT adapts out_proj as part of the attention module it targets as a whole.
    assert [s.part_of for s in sites] == [None, "attn", None]


def test_module_tree_holds_modules_the_graph_never_runs(zoo):
    from lora_fx.passes.fx.capture import meta
    from lora_fx.passes.fx.find_sites import module_tree

    gm = zoo.gm("gpt2")
    tree = module_tree(gm)
    # GPT-2's sdpa path takes attn_dropout's p and never calls the module: PEFT matches it all the same.
    assert tree["transformer.h.0.attn.attn_dropout"][0] == "torch.nn.modules.dropout.Dropout"
    assert "torch.nn.modules.linear.Linear" in tree["lm_head"]
    assert tree["transformer.h.0.attn.c_attn"] == ("transformers.pytorch_utils.Conv1D",)
    # A GraphModule lora_fx did not capture: the modules its nodes ran in.
    del meta(gm)["modules"]
    fallback = module_tree(gm)
    assert fallback["transformer.ln_f"] == ("torch.nn.modules.normalization.LayerNorm",)
    assert "transformer.h.0.attn.attn_dropout" not in fallback and "" not in fallback


def test_a_matmul_on_a_transposed_weight_is_a_linear_site(zoo):
    """Falcon's FalconLinear computes x @ W.T (+ b) instead of F.linear: still a site, W [out, in]."""
    sites = [s for s in lora_fx.find_sites(zoo.gm("falcon")) if s.kind is SiteKind.LINEAR]
    expected = _linear_modules(zoo.model("falcon"))
    assert [s.name for s in sites] == list(expected)
    for s in sites:
        assert (s.in_features, s.out_features, s.fan_in_fan_out) == expected[s.name], s.name
    assert {s.op for s in sites} == {"aten.matmul", "aten.linear"}  # FalconLinear and the tied lm_head
