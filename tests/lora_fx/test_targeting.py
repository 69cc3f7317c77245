"""Target selection against PEFT itself: the set of modules PEFT wraps, and r / scaling per module."""

from __future__ import annotations

import pytest

import lora_fx
from lora_fx.errors import ConfigError, TargetNotFoundError
from tests.models import peft_lora_modules, peft_wrap

# (model, PEFT LoraConfig keywords): every selection feature, on the models whose names exercise it.
CASES = [
    ("bert", dict(target_modules=["query", "value"])),
    ("bert", dict(target_modules=["encoder.layer.1.attention.self.query", "dense"])),
    ("bert", dict(target_modules=["attention.self.key"])),
    ("bert", dict(target_modules=r".*layer\.[01]\.attention\.self\.(query|key)")),
    ("bert", dict(target_modules=r".*dense")),
    ("bert", dict(target_modules="all-linear")),
    ("bert", dict(target_modules=["query", "value", "dense"], exclude_modules=["output.dense"])),
    ("bert", dict(target_modules="all-linear", exclude_modules=r".*intermediate.*")),
    ("bert", dict(target_modules=["query", "value"], layers_to_transform=1)),
    ("bert", dict(target_modules=["query", "value"], layers_to_transform=[0], layers_pattern="layer")),
    ("bert", dict(target_modules=["query", "encoder.layer.0.attention.self.value"], layers_to_transform=[1])),
    ("bert", dict(target_modules=None)),
    ("gpt2", dict(target_modules="all-linear")),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], layers_to_transform=[1], layers_pattern="h")),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], exclude_modules=["transformer.h.0.attn.c_attn"])),
    ("gpt2", dict(target_modules=None)),
    ("llama", dict(target_modules="all-linear")),
    ("llama", dict(target_modules="all-linear", exclude_modules=["mlp.down_proj", "o_proj"])),
    ("llama", dict(target_modules=["q_proj", "k_proj", "v_proj"], layers_to_transform=0, layers_pattern=["layers"])),
    ("llama", dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[0, 1])),
    ("llama", dict(target_modules=r"model\.layers\.1\..*_proj")),
    ("llama", dict(target_modules=None)),
    ("minilm", dict(target_modules=["query", "value"], layers_to_transform=[0, 5])),
    ("minilm", dict(target_modules="all-linear", exclude_modules=r".*pooler.*")),
]

PATTERN_CASES = [
    ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                  rank_pattern={"value": 2, r"layer\.1\.attention\.self\.query": 6},
                  alpha_pattern={"dense": 3, "query": 12})),
    ("llama", dict(r=2, lora_alpha=4, target_modules="all-linear",
                   rank_pattern={"mlp.*": 8, r"model\.layers\.0\.self_attn\.q_proj": 1},
                   alpha_pattern={"v_proj": 32})),
    ("gpt2", dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 2},
                  alpha_pattern={r"h\.1\.attn\.c_attn": 2})),
    ("llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])),
]


def _ids(cases):
    return [f"{m}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"[:90] for m, kw in cases]


def _ours(zoo, name, kwargs):
    gm = zoo.gm(name)
    sites = lora_fx.find_sites(gm)
    model_type = zoo.model(name).config.model_type
    return lora_fx.select_targets(sites, lora_fx.LoraConfig(**kwargs), model_type=model_type)


@pytest.mark.parametrize("name,kwargs", CASES, ids=_ids(CASES))
def test_selection_equals_peft(zoo, name, kwargs):
    ours = {t.site.name for t in _ours(zoo, name, kwargs)}
    theirs = set(peft_lora_modules(peft_wrap(zoo.model(name), r=2, **kwargs)))
    assert ours == theirs
    assert ours  # every case selects something, so equality is not vacuous


def test_all_linear_leaves_out_the_output_layer(zoo):
    for name in ("gpt2", "llama"):
        names = {t.site.name for t in _ours(zoo, name, dict(target_modules="all-linear"))}
        assert "lm_head" not in names
        assert "lm_head" in {s.name for s in lora_fx.find_sites(zoo.gm(name))}


@pytest.mark.parametrize("name,kwargs", PATTERN_CASES, ids=_ids(PATTERN_CASES))
def test_rank_and_scale_per_site_equal_peft(zoo, name, kwargs):
    ours = {t.site.name: (t.r, t.scale) for t in _ours(zoo, name, kwargs)}
    wrapped = peft_lora_modules(peft_wrap(zoo.model(name), **kwargs))
    theirs = {n: (m.r["default"], m.scaling["default"]) for n, m in wrapped.items()}
    assert set(ours) == set(theirs)
    for site, (r, scale) in ours.items():
        assert r == theirs[site][0], site
        assert scale == pytest.approx(theirs[site][1], rel=1e-12), site
    assert len({v for v in ours.values()}) > 1 or kwargs.get("use_rslora")


def test_unmatched_target_lists_sites_and_closest_matches(zoo):
    with pytest.raises(TargetNotFoundError) as info:
        _ours(zoo, "bert", dict(target_modules=["qurey", "valeu"]))
    msg = str(info.value)
    assert "closest to 'qurey': query" in msg
    assert "closest to 'valeu': value" in msg
    assert "encoder.layer.1.attention.self.key" in msg  # the available site names are listed
    assert "intermediate" in msg


def test_closest_matches_name_top_level_sites_once():
    # An ONNX graph's sites can be top-level names ("fc1"): each is its own suffix, suggested once.
    from lora_fx.sites import IRKind, Site, SiteKind

    sites = [Site(n, SiteKind.LINEAR, IRKind.ONNX, 16, 16) for n in ("fc1", "fc2", "head")]
    with pytest.raises(TargetNotFoundError) as info:
        lora_fx.select_targets(sites, lora_fx.LoraConfig(target_modules=["fc"]))
    line = next(l for l in str(info.value).splitlines() if l.startswith("closest to 'fc'"))
    close = line.split(": ", 1)[1].split(", ")
    assert sorted(close) == ["fc1", "fc2"]


def test_unmatched_regex_and_layers_are_refused(zoo):
    with pytest.raises(TargetNotFoundError, match="matches no linear site"):
        _ours(zoo, "llama", dict(target_modules=r".*attention"))
    with pytest.raises(TargetNotFoundError, match="layers_to_transform=7"):
        _ours(zoo, "llama", dict(target_modules=["q_proj"], layers_to_transform=7))


def test_rank_above_site_dimensions_warns_and_selects_as_peft(zoo):
    """PEFT adapts a site whose rank exceeds min(in, out) (all-linear with r=8 reaches a 2-label head): so do
    we, with a warning that names the site and the rank_pattern that fits it."""
    # tiny Llama: hidden 32, kv projections 32 -> 16 (2 kv heads of 8).
    kwargs = dict(r=17, target_modules=["k_proj"])
    with pytest.warns(UserWarning, match=r"min\(in_features, out_features\)=16 of site model.layers.0.self_attn.k_proj.*rank_pattern"):
        ours = {t.site.name: t.r for t in _ours(zoo, "llama", kwargs)}
    wrapped = peft_lora_modules(peft_wrap(zoo.model("llama"), **kwargs))
    assert ours == {n: m.r["default"] for n, m in wrapped.items()} and set(ours.values()) == {17}


def test_unknown_model_type_without_targets_is_refused(zoo):
    sites = lora_fx.find_sites(zoo.gm("bert"))
    with pytest.raises(ConfigError, match="no default targets for model type 'mystery'"):
        lora_fx.select_targets(sites, lora_fx.LoraConfig(), model_type="mystery")


# Targets naming a module that holds linear layers: PEFT stops with "Target module ... is not supported".
CONTAINER_CASES = [
    ("bert", dict(target_modules=r".*attention.*")),
    ("bert", dict(target_modules=["attention", "query"])),
    ("gpt2", dict(target_modules=r".*\.1\..*")),
    ("llama", dict(target_modules=["self_attn", "up_proj"])),
    ("llama", dict(target_modules=r".*")),
]


@pytest.mark.parametrize("name,kwargs", CONTAINER_CASES, ids=_ids(CONTAINER_CASES))
def test_targets_naming_a_module_of_linear_layers_are_refused_as_in_peft(zoo, name, kwargs):
    # lora_fx used to adapt the linear sites inside instead, and saved a config PEFT could not load.
    with pytest.raises(ValueError, match="is not supported"):
        peft_wrap(zoo.model(name), r=2, **kwargs)
    with pytest.raises(ConfigError, match="holding linear layers, not linear layers") as info:
        _ours(zoo, name, kwargs)
    assert "Name the linear layers inside" in str(info.value)


def test_excluded_or_other_layer_containers_are_not_refused(zoo):
    # PEFT checks exclusion and the layer index before the module type: these select as PEFT does.
    for kwargs in (dict(target_modules=["self_attn", "q_proj"], exclude_modules=["self_attn"]),
                   dict(target_modules=["layers.1.self_attn", "q_proj"], layers_to_transform=[0])):
        ours = {t.site.name for t in _ours(zoo, "llama", kwargs)}
        assert ours == set(peft_lora_modules(peft_wrap(zoo.model("llama"), r=2, **kwargs))) != set()


def test_a_string_target_that_is_a_name_says_it_is_a_regex(zoo):
    # PEFT's rule: a string must match the whole name; "q_proj" matches no "model.layers.0.self_attn.q_proj".
    with pytest.raises(TargetNotFoundError, match=r"a string is a regular expression .* pass a list: target_modules=\['q_proj'\]"):
        _ours(zoo, "llama", dict(target_modules="q_proj"))


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_all_linear_on_a_classifier_equals_peft_on_both_front_ends(task_type, tmp_path):
    """PEFT's all-linear leaves out get_output_embeddings() (none here) and, for task_type SEQ_CLS only, the
    head named score/classifier. The ONNX file of the same model must select the same sites: its classifier
    reaches a graph output like an lm_head does, but projects onto no vocabulary."""
    import torch
    import transformers as tf

    from tests.models import VOCAB, inputs

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    model = tf.BertForSequenceClassification(cfg).eval()
    kwargs = dict(target_modules="all-linear", task_type=task_type)
    theirs = set(peft_lora_modules(peft_wrap(model, r=2, **kwargs)))
    example = inputs(2, 8)
    gm = lora_fx.capture(model, kwargs=example)
    config = lora_fx.LoraConfig(**kwargs)
    ours_fx = {t.site.name for t in lora_fx.select_targets(lora_fx.find_sites(gm), config)}
    lora_fx.export_onnx(gm, tmp_path / "cls.onnx", kwargs=example)
    ours_onnx = {t.site.name for t in lora_fx.select_targets(lora_fx.find_sites(lora_fx.load(tmp_path / "cls.onnx")), config)}
    assert ours_fx == ours_onnx == theirs
    assert ("classifier" in theirs) == (task_type is None)


# Targets naming modules that are no linear layer, alone or beside linear ones (target_modules, exclude_modules,
# layers_to_transform): PEFT stops at the first it cannot adapt, even where other matches are linear layers.
MODULE_CASES = [
    ("gpt2", ["ln_f"], None, None),
    ("gpt2", ["attn.attn_dropout"], None, None),  # never run by the sdpa path: in the module tree, not the graph
    ("gpt2", ["c_attn", "ln_f"], None, None),
    ("gpt2", ["c_attn", "ln_f"], ["ln_f"], None),
    ("gpt2", ["c_fc", "act"], None, None),
    ("gpt2", r".*\.ln_\d", None, None),
    ("gpt2", ["c_attn", "ln_1"], None, [0]),
    ("gpt2", ["c_attn", "transformer.h.1.ln_1"], None, [0]),  # an exact name skips the layer restriction
    ("bert", ["LayerNorm"], None, None),
    ("bert", ["query", "dropout"], None, None),
    ("bert", ["query", "value", "dropout"], r".*dropout", None),
    ("llama", ["input_layernorm"], None, None),
    ("llama", ["act_fn"], None, None),
    ("llama", ["q_proj", "v_proj", "act_fn"], ["act_fn"], None),
    ("llama", ["q_proj", "rotary_emb"], None, None),
]


@pytest.mark.parametrize("name,target,exclude,layers", MODULE_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}"[:80] for c in MODULE_CASES])
def test_targets_naming_a_module_that_is_no_linear_layer_follow_peft(zoo, name, target, exclude, layers):
    """lora_fx refuses where get_peft_model raises, and selects what PEFT wraps where it accepts."""
    from lora_fx.passes.fx.capture import meta

    import re

    kwargs = dict(target_modules=target, exclude_modules=exclude, layers_to_transform=layers)
    try:
        theirs = set(peft_lora_modules(peft_wrap(zoo.model(name), r=2, **kwargs)))
    except ValueError as exc:
        refused = re.match(r"Target module (\w+)\(.* is not supported", str(exc), re.S)
        assert refused, str(exc)
        theirs = None
    gm = zoo.gm(name)
    code = gm.code
    if theirs is None:
        # lora_fx used to skip such a module silently and save an adapter_config.json PEFT refuses to load.
        with pytest.raises(ConfigError, match=r"not (a )?linear layers?: .*the linear layers you can target: ") as info:
            lora_fx.apply(gm, lora_fx.LoraConfig(r=2, **kwargs))
        assert gm.code == code and not meta(gm).get("lora_sites")
        # The module PEFT stops at is among those named, with its type.
        assert f"({refused.group(1)})" in str(info.value)
        assert "is not supported" in str(info.value) and "exclude_modules" in str(info.value)
    else:
        lora_fx.apply(gm, lora_fx.LoraConfig(r=2, **kwargs))
        assert set(meta(gm)["lora_sites"]) == theirs != set()


def test_refusal_names_the_module_its_type_and_the_linear_sites(zoo):
    with pytest.raises(ConfigError) as info:
        lora_fx.apply(zoo.gm("gpt2"), lora_fx.LoraConfig(r=2, target_modules=["c_attn", "ln_f"]))
    msg = str(info.value)
    assert "matches transformer.ln_f (LayerNorm), not a linear layer" in msg
    assert "the linear layers you can target: c_attn, c_fc, c_proj, lm_head (sites: transformer.h.0.attn.c_attn" in msg
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp.act_fn \(SiLUActivation\), model.layers.1.mlp.act_fn \(SiLUActivation\), not linear layers"):
        lora_fx.apply(zoo.gm("llama"), lora_fx.LoraConfig(r=2, target_modules=["act_fn"]))


@pytest.mark.parametrize("name,target", [("gpt2", ["wte"]), ("gpt2", ["wte", "c_attn"]), ("bert", ["word_embeddings", "query"])])
def test_embeddings_peft_adapts_are_refused_by_name(zoo, name, target):
    """PEFT adapts nn.Embedding (and Conv); lora_fx adapts linear layers only: refused even beside linear targets,
    where lora_fx used to adapt the linear ones alone and save a config PEFT reads as adapting the embedding too."""
    from peft.tuners.lora import Embedding

    wrapped = peft_wrap(zoo.model(name), r=2, target_modules=target)
    assert any(isinstance(m, Embedding) for m in wrapped.modules())
    with pytest.raises(TargetNotFoundError, match=r"\(Embedding\): an embedding, which PEFT adapts but lora_fx does not"):
        lora_fx.apply(zoo.gm(name), lora_fx.LoraConfig(r=2, target_modules=target))


def test_without_a_module_tree_only_sites_are_matched(zoo):
    """Without a module tree (a hand-built ONNX graph) select_targets matches sites only, as before."""
    sites = lora_fx.find_sites(zoo.gm("gpt2"))
    targets = lora_fx.select_targets(sites, lora_fx.LoraConfig(r=2, target_modules=["c_attn", "ln_f"]))
    assert {t.site.name for t in targets} == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}


# The same cases on ONNX exports of the same models, both exporters. Left out: BERT's ["query", "dropout"], which
# PEFT refuses but no ONNX export shows (eval-mode exports keep no Dropout node, so the file cannot tell).
ONNX_MODULE_CASES = [c for c in MODULE_CASES if c[:2] != ("bert", ["query", "dropout"])] + [
    ("bert", ["embeddings", "query"], None, None),  # BertEmbeddings: lookups and a norm, no layer PEFT adapts
    ("bert", ["dense"], r".*pooler.*", None),  # a suffix matching linear sites only is selected as before
]


def _onnx_state(model) -> bytes:
    import onnx_ir as ir

    return ir.to_proto(model).SerializeToString()


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo18", "torchscript"])
@pytest.mark.parametrize("name,target,exclude,layers", ONNX_MODULE_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}"[:80] for c in ONNX_MODULE_CASES])
def test_onnx_targets_naming_a_module_that_is_no_linear_layer_follow_peft(zoo, exporter, name, target, exclude, layers):
    """On an ONNX export, lora_fx refuses where get_peft_model on the source model raises, and selects the sites PEFT
    wraps where it accepts. The ONNX front end used to skip such a module silently (["c_attn", "ln_f"] adapted c_attn)."""
    import re

    from lora_fx.passes.onnx.lora_layout import read_records
    from tests.onnx_corpus import corpus

    entry = corpus().get(f"{name}-{exporter}")
    eager = zoo.model(name)
    kwargs = dict(target_modules=target, exclude_modules=exclude, layers_to_transform=layers)
    try:
        theirs = set(peft_lora_modules(peft_wrap(eager, r=2, **kwargs)))
    except ValueError as exc:
        refused = re.match(r"Target module (\w+)\(.* is not supported", str(exc), re.S)
        assert refused, str(exc)
        theirs = None
    # A TorchScript export's names carry its wrapper's prefix ("model."): a full module name gains it too.
    modules = dict(eager.named_modules())
    if isinstance(target, list):
        kwargs["target_modules"] = [entry.prefix + t if t in modules else t for t in target]
    model = lora_fx.load(entry.path)
    before = _onnx_state(model)
    if theirs is None:
        with pytest.raises((ConfigError, TargetNotFoundError)) as info:
            lora_fx.apply(model, lora_fx.LoraConfig(r=2, **kwargs))
        assert _onnx_state(model) == before and not read_records(model)
        msg = str(info.value)
        if target == ["attn.attn_dropout"]:
            # GPT-2's sdpa path never runs attn_dropout: the file holds no trace of it, and no site matches.
            assert isinstance(info.value, TargetNotFoundError) and "matches no linear site" in msg
            return
        assert isinstance(info.value, ConfigError), msg
        assert re.search(r"not (a )?linear layers?: .*is not supported.*exclude_modules.*the linear layers you can target: ", msg, re.S)
        # The module is named with its class where the file records it (dynamo), else with what its nodes compute.
        assert (f"({refused.group(1)})" if exporter.startswith("dynamo") else "(no class recorded, computes ") in msg
    else:
        lora_fx.apply(model, lora_fx.LoraConfig(r=2, **kwargs))
        assert {site.removeprefix(entry.prefix) for site in read_records(model)} == theirs != set()


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo18", "torchscript"])
@pytest.mark.parametrize("name,target", [("gpt2", ["wte", "c_attn"]), ("bert", ["word_embeddings", "query"])])
def test_onnx_embeddings_peft_adapts_are_refused_by_name(zoo, exporter, name, target):
    """As on FX: PEFT adapts these nn.Embedding modules, lora_fx cannot, so the ONNX front end refuses rather than
    adapting the linear targets alone."""
    from peft.tuners.lora import Embedding

    from lora_fx.passes.onnx.lora_layout import read_records
    from tests.onnx_corpus import corpus

    assert any(isinstance(m, Embedding) for m in peft_wrap(zoo.model(name), r=2, target_modules=target).modules())
    model = lora_fx.load(corpus().get(f"{name}-{exporter}").path)
    kind = r"\(Embedding\): an embedding" if exporter.startswith("dynamo") else r"\(no class recorded, computes Gather \(an embedding lookup\)\): an embedding lookup"
    with pytest.raises(TargetNotFoundError, match=kind + ", which PEFT adapts but lora_fx does not"):
        lora_fx.apply(model, lora_fx.LoraConfig(r=2, target_modules=target))
    assert not read_records(model)


def test_onnx_refusal_is_checked_before_quantizing(tmp_path):
    """With quant, apply selects before it quantizes: a refused target leaves the file's model as it was."""
    from lora_fx.config import QuantConfig
    from tests.onnx_corpus import corpus

    model = lora_fx.load(corpus().get("gpt2-dynamo18").path)
    before = _onnx_state(model)
    with pytest.raises(ConfigError, match=r"transformer.ln_f \(LayerNorm\), not a linear layer"):
        lora_fx.apply(model, lora_fx.LoraConfig(r=2, target_modules=["c_attn", "ln_f"]), quant=QuantConfig(dtype="int8"))
    assert _onnx_state(model) == before


# exclude_modules that excludes nothing: PEFT warns (once something is adapted), so a typo does not pass silently.
EXCLUDE_CASES = [
    ("bert", dict(target_modules=["query", "value"], exclude_modules=["quary"])),  # the typo: warns
    ("bert", dict(target_modules=["query", "value"], exclude_modules=r".*quary.*")),  # a regex matching nothing
    ("bert", dict(target_modules=["query", "value"], exclude_modules=["pooler.dense"])),  # no target, yet excluded
    ("bert", dict(target_modules=["query", "value"], exclude_modules=["attention"])),  # a module above the sites
    ("bert", dict(target_modules=["query", "value"], exclude_modules=["encoder.layer.0.attention.self.query"])),
    ("llama", dict(target_modules="all-linear", exclude_modules=["mlp.dwon_proj", "o_proj"])),  # one of two used
    ("llama", dict(target_modules="all-linear", exclude_modules=["mlp.dwon_proj", "o_prj"])),
]


def _set_sorted(message: str) -> str:
    """The message with a printed set's items sorted: PEFT prints its set in hash order, which varies by process."""
    import re

    return re.sub(r"\{([^{}]*)\}", lambda m: "{" + ", ".join(sorted(m.group(1).split(", "))) + "}", message)


def _peft_exclude_warnings(model, kwargs) -> list[str]:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_wrap(model, r=2, **kwargs)
    return [str(w.message) for w in caught if "exclude_modules" in str(w.message)]


@pytest.mark.parametrize("with_tree", [True, False], ids=["module-tree", "sites-only"])
@pytest.mark.parametrize("name,kwargs", EXCLUDE_CASES, ids=_ids(EXCLUDE_CASES))
def test_exclude_modules_that_excludes_nothing_warns_as_peft_does(zoo, name, kwargs, with_tree):
    import warnings

    from lora_fx.passes.fx.find_sites import module_tree

    theirs = _peft_exclude_warnings(zoo.model(name), kwargs)
    gm = zoo.gm(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        targets = lora_fx.select_targets(lora_fx.find_sites(gm), lora_fx.LoraConfig(**kwargs),
                                         modules=module_tree(gm) if with_tree else None)
    ours = [str(w.message) for w in caught if "exclude_modules" in str(w.message)]
    assert targets and len(ours) == len(theirs) <= 1, (ours, theirs)
    if theirs:  # PEFT's sentence, then the names close to the typo
        assert _set_sorted(ours[0]).startswith(_set_sorted(theirs[0])), (ours, theirs)
        if "quary" in str(kwargs["exclude_modules"]) and isinstance(kwargs["exclude_modules"], list):
            assert ours[0].endswith("Module names close to it: query"), ours


def test_an_unused_exclude_warns_on_the_command_line(tmp_path, capsys):
    import sys
    import warnings

    from lora_fx.cli import main
    from tests.onnx_corpus import corpus

    argv = ["rewrite", str(corpus().get("gemm-mlp").path), "-o", str(tmp_path / "o.onnx"), "--target-modules", "fc1",
            "--exclude-modules", "fc3"]
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # Python's own printing (pytest records warnings instead): format with formatwarning, write to stderr.
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(warnings.formatwarning(m, c, f, n, line))
        assert main(argv) == 0
    err = capsys.readouterr().err
    assert "lora-fx: warning: You have passed exclude_modules={'fc3'} but no modules were excluded." in err, err
