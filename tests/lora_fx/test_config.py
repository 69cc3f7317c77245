"""LoraConfig: PEFT's names and meanings, JSON round trip, PEFT's adapter_config.json both ways."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_fx
from lora_fx.config import InitLoraWeights, LoraConfig
from lora_fx.errors import ConfigError

names = st.sampled_from(["query", "value", "q_proj", "mlp.up_proj", "c_attn", "dense"])


@settings(max_examples=60, deadline=None)
@given(
    r=st.integers(1, 64),
    alpha=st.floats(0.5, 128, allow_nan=False),
    dropout=st.sampled_from([0.0, 0.05, 0.5]),
    targets=st.one_of(st.lists(names, min_size=1, max_size=3, unique=True), st.just("all-linear"), st.just(r".*\.(q|v)_proj")),
    exclude=st.one_of(st.none(), st.lists(names, min_size=1, max_size=2, unique=True), st.just(".*pooler.*")),
    layers=st.one_of(st.none(), st.integers(0, 5), st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True)),
    patterns=st.booleans(),
    init=st.sampled_from([True, False, "gaussian", InitLoraWeights.KAIMING]),
)
def test_json_round_trip(r, alpha, dropout, targets, exclude, layers, patterns, init):
    if isinstance(targets, str):
        layers = None  # a regex takes no layer restriction, as in PEFT
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, exclude_modules=exclude,
        layers_to_transform=layers, layers_pattern="layers" if layers is not None else None,
        rank_pattern={"q_proj": r + 1} if patterns else {}, alpha_pattern={"value": 2.0} if patterns else {},
        use_rslora=not patterns, init_lora_weights=init,
    )
    back = LoraConfig.from_json(cfg.to_json())
    assert back == cfg
    assert isinstance(back.init_lora_weights, InitLoraWeights)


def test_our_json_is_peft_config_json(tmp_path):
    import peft

    cfg = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 1],
                     layers_pattern="layers", rank_pattern={"v_proj": 2}, init_lora_weights="gaussian")
    cfg.save_pretrained(tmp_path)
    theirs = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert theirs.peft_type.value == "LORA"
    assert (theirs.r, theirs.lora_alpha, set(theirs.target_modules), theirs.layers_to_transform) == (4, 32, {"q_proj", "v_proj"}, [0, 1])
    assert (theirs.rank_pattern, theirs.init_lora_weights, theirs.use_rslora) == ({"v_proj": 2}, "gaussian", False)


@pytest.mark.parametrize("kwargs", [
    dict(r=16, lora_alpha=32, target_modules=["query", "value"], lora_dropout=0.1),
    dict(r=4, lora_alpha=8, target_modules=r".*\.(q|v)_proj", use_rslora=True, init_lora_weights=False),
    dict(r=2, target_modules=["c_attn"], exclude_modules=["h.0.attn.c_attn"], layers_to_transform=1,
         layers_pattern=["h"], init_lora_weights="gaussian"),
    dict(r=8, target_modules="all-linear", rank_pattern={"mlp": 2}, alpha_pattern={"q_proj": 3.0}),
])
def test_from_pretrained_reads_peft_written_configs(tmp_path, kwargs):
    import peft

    peft.LoraConfig(**kwargs).save_pretrained(str(tmp_path))
    ours = LoraConfig.from_pretrained(tmp_path)
    for key, value in kwargs.items():
        got = getattr(ours, key)
        if key == "init_lora_weights":
            got = got.to_peft()
        if key in ("target_modules", "exclude_modules") and isinstance(value, list):
            got, value = sorted(got), sorted(value)  # PEFT stores lists as sets
        if key == "layers_pattern" and isinstance(value, list):
            got = [got] if isinstance(got, str) else got
        assert got == value, key


@pytest.mark.parametrize("r", [0, -1, 1.5, True, "8"])
def test_bad_rank_is_refused(r):
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        LoraConfig(r=r, target_modules=["q"])


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank_pattern={"q": 0}), r"rank_pattern\['q'\] must be a positive integer"),
    (dict(rank_pattern={"q": True}), r"rank_pattern\['q'\] must be a positive integer"),  # as r=True is refused
    (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
    (dict(lora_dropout=-0.1), r"lora_dropout must be in \[0, 1\)"),
    (dict(layers_pattern="layers"), "layers_pattern only applies together with layers_to_transform"),
    (dict(target_modules=[]), "target_modules is an empty list"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa' is not supported"),
])
def test_bad_fields_are_refused(kwargs, message):
    kwargs.setdefault("target_modules", ["q"])
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_peft_options_lora_fx_does_not_implement_are_refused(tmp_path):
    import peft

    peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True).save_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match="use_dora=True is not supported by lora_fx"):
        LoraConfig.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="this is a PREFIX_TUNING adapter config, not LoRA"):
        LoraConfig.from_dict({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8})


def test_missing_or_broken_config_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="adapter_config.json not found"):
        LoraConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        LoraConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("[8, 16]")  # valid JSON, not a config
    with pytest.raises(ConfigError, match="does not hold a JSON object"):
        LoraConfig.from_pretrained(tmp_path)
    from lora_fx.config import PrefixConfig, QuantConfig

    for cls in (LoraConfig, PrefixConfig, QuantConfig):
        with pytest.raises(ConfigError, match="must be a JSON object of options, got a list"):
            cls.from_json("[8, 16]")


def test_scaling_is_peft_scaling():
    assert LoraConfig(r=16, lora_alpha=32, target_modules=["q"]).scaling(16, 32) == 2.0
    assert LoraConfig(r=16, lora_alpha=32, target_modules=["q"], use_rslora=True).scaling(16, 32) == 8.0


def test_to_dict_is_json_with_enums_as_peft_values():
    d = json.loads(LoraConfig(target_modules=["q"], init_lora_weights="gaussian").to_json())
    assert d["init_lora_weights"] == "gaussian" and d["peft_type"] == "LORA"
    assert lora_fx.InitLoraWeights.parse(False) is InitLoraWeights.RANDOM


@pytest.mark.parametrize("kwargs", [
    dict(target_modules=r".*\.q_proj", layers_to_transform=[0]),
    dict(target_modules="all-linear", layers_to_transform=1),
    dict(target_modules=r".*\.q_proj", layers_to_transform=[0], layers_pattern="layers"),
])
def test_string_targets_with_layers_are_refused_as_in_peft(kwargs):
    # A regex decides every name itself: PEFT refuses a layer restriction beside it, and lora_fx
    # used to drop it silently (adapting every layer) and save a config PEFT could not load.
    import peft

    with pytest.raises(ValueError, match="cannot be used when `target_modules` is a str"):
        peft.LoraConfig(**kwargs)
    with pytest.raises(ConfigError, match="cannot be used when target_modules is a string"):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(target_modules="*q_proj"), r"target_modules entry '\*q_proj' is not a valid regular expression"),
    (dict(exclude_modules="("), r"exclude_modules entry '\(' is not a valid regular expression"),
    (dict(rank_pattern={"*q": 2}), r"rank_pattern entry '\*q' is not a valid regular expression"),
    (dict(target_modules=["q_proj", 3]), "target_modules must be a string .* or a list of module names"),
    (dict(lora_alpha="16"), "lora_alpha must be a number"),
    (dict(alpha_pattern={"q": "x"}), r"alpha_pattern\['q'\] must be a number"),
    (dict(lora_dropout=None), r"lora_dropout must be in \[0, 1\), got None"),
])
def test_bad_patterns_and_numbers_name_the_field(kwargs, message):
    # Found before, they surfaced at apply as re.error / TypeError with no word of which field.
    kwargs.setdefault("target_modules", ["q_proj"])
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_peft_configs_own_to_dict_converts():
    # PEFT's to_dict() holds peft_type as the enum PeftType.LORA, whose str() is "PeftType.LORA".
    import peft

    from lora_fx.config import PrefixConfig

    ours = LoraConfig.from_dict(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).to_dict())
    assert (ours.r, ours.lora_alpha, ours.target_modules) == (4, 8, ["q_proj", "v_proj"])
    prefix = PrefixConfig.from_dict(peft.PrefixTuningConfig(num_virtual_tokens=6, task_type="CAUSAL_LM").to_dict())
    assert prefix.num_virtual_tokens == 6


@pytest.mark.parametrize("option", ["kasa_config", "monteclora_config", "use_bdlora"])
def test_peft_variants_that_change_the_adapters_output_are_refused(tmp_path, option):
    # KaSA, MonteCLoRA and BD-LoRA adapters are not plain LoRA: read as LoRA they compute other outputs.
    import peft
    from peft.tuners.lora import config as lora_config

    value = {"kasa_config": lora_config.KasaConfig, "monteclora_config": lora_config.MontecloraConfig,
             "use_bdlora": lora_config.BdLoraConfig}[option]()
    data = peft.LoraConfig(r=4, target_modules=["q_proj"]).to_dict()
    data[option] = dataclasses.asdict(value)
    with pytest.raises(ConfigError, match=f"PEFT option {option}=.* is not supported by lora_fx"):
        LoraConfig.from_dict(data)


def test_peft_task_type_enum_becomes_its_name():
    """PEFT's TaskType is a str enum whose str() is 'TaskType.SEQ_CLS' on Python 3.11: kept as given, the SEQ_CLS head
    rule missed it and the saved JSON depended on how the enum serialises."""
    import peft

    from lora_fx.config import PrefixConfig
    from lora_fx.sites import IRKind, Site, SiteKind
    from lora_fx.targeting import select_targets

    cfg = LoraConfig(task_type=peft.TaskType.SEQ_CLS, target_modules="all-linear")
    assert cfg.task_type == "SEQ_CLS" and type(cfg.task_type) is str
    assert json.loads(cfg.to_json())["task_type"] == "SEQ_CLS"
    assert PrefixConfig(task_type=peft.TaskType.CAUSAL_LM).task_type == "CAUSAL_LM"
    sites = [Site(name=n, kind=SiteKind.LINEAR, ir=IRKind.FX, in_features=16, out_features=16) for n in ("dense", "classifier")]
    assert [t.site.name for t in select_targets(sites, LoraConfig(task_type=peft.TaskType.SEQ_CLS, target_modules="all-linear"))] == ["dense"]


# ---- every PEFT field is known: accepted at PEFT's default, refused otherwise, unknown keys warned about --------------

def _peft_defaults(peft_cls) -> dict:
    """PEFT's own default for each field of its config class, read from the installed PEFT (the reference)."""
    out = {}
    for f in dataclasses.fields(peft_cls):
        out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out


def _peft_lora_fields() -> list[str]:
    import peft

    # peft_type names the config class: from_dict reads it, the constructor has no use for it (PEFT overwrites it).
    return sorted(set(_peft_defaults(peft.LoraConfig)) - {"peft_type"})


@pytest.mark.parametrize("peft_cls_name,ours", [("LoraConfig", LoraConfig), ("PrefixTuningConfig", lora_fx.PrefixConfig)])
def test_every_field_of_the_installed_peft_config_is_known(peft_cls_name, ours):
    # Fails when a PEFT release adds a field lora_fx has not decided about: it would be dropped as unknown, and
    # a field like velora_config or ensure_weight_tying changes what an imported adapter means.
    import peft

    theirs = set(_peft_defaults(getattr(peft, peft_cls_name))) - {"peft_type"}
    assert sorted(theirs - {f.name for f in dataclasses.fields(ours)}) == []


@pytest.mark.parametrize("name", _peft_lora_fields())
def test_constructor_takes_every_peft_field_at_peft_default(name):
    import peft

    default = _peft_defaults(peft.LoraConfig)[name]
    cfg = LoraConfig(**{name: default})
    assert cfg == LoraConfig()
    assert cfg.to_dict() == LoraConfig().to_dict()


def test_peft_style_call_works_verbatim():
    import peft

    kwargs = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    cfg = LoraConfig(**kwargs)
    assert cfg == LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, task_type="CAUSAL_LM")
    assert (cfg.bias, cfg.use_dora) == (peft.LoraConfig(**kwargs).bias, peft.LoraConfig(**kwargs).use_dora)
    assert "bias" not in repr(cfg)  # PEFT's unimplemented fields always hold the default: repr shows lora_fx's own


# A value PEFT would act on for each PEFT field lora_fx does not implement.
NON_DEFAULTS = {
    "bias": ["all", "lora_only"],
    "use_dora": [True],
    "lora_bias": [True],
    "layer_replication": [[[0, 1]]],
    "use_qalora": [True],
    "target_parameters": [["mlp.experts.gate_up_proj"]],
    "trainable_token_indices": [[0, 1]],
    "alora_invocation_tokens": [[5, 6]],
    "arrow_config": [{"top_k": 3}],
    "megatron_config": [{"tensor_model_parallel_size": 2}],
    "loftq_config": [{"loftq_bits": 4}],
    "eva_config": [{"rho": 2.0}],
    "corda_config": [{"cache_file": "c.pt"}],
    "lora_ga_config": [{"bsz": 4}],
    "kasa_config": [{"kasa_rank": 4}],
    "monteclora_config": [{"monteclora_n": 8}],
    "use_bdlora": [{"nblocks": 2}],
    "velora_config": [{"rank": 2}],
    "ensure_weight_tying": [True],
}


@pytest.mark.parametrize("name,value", [("qalora_group_size", 32), ("megatron_core", "my.megatron")])
def test_settings_of_a_refused_feature_are_plain_lora_without_it(name, value):
    import peft

    # PEFT reads them only with use_qalora / megatron_config, which lora_fx refuses: alone they are plain LoRA.
    assert LoraConfig.from_dict({**peft.LoraConfig(r=4, target_modules=["q_proj"]).to_dict(), name: value}) == LoraConfig(
        r=4, target_modules=["q_proj"])


def test_every_unimplemented_field_has_a_refusal_case():
    unimplemented = {f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("peft") == "unimplemented"}
    assert unimplemented == set(NON_DEFAULTS)


@pytest.mark.parametrize("name,value", [(n, v) for n, vs in NON_DEFAULTS.items() for v in vs])
def test_unimplemented_peft_fields_are_refused_by_constructor_and_from_dict(name, value):
    import peft

    message = f"PEFT option {name}=.* is not supported by lora_fx; only .* is"
    with pytest.raises(ConfigError, match=message):
        LoraConfig(target_modules=["q_proj"], **{name: value})
    data = {**peft.LoraConfig(r=4, target_modules=["q_proj"]).to_dict(), name: value}
    with pytest.raises(ConfigError, match=message):
        LoraConfig.from_dict(data)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(task_type="CAUSAL_LM"),
    dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, bias="none", task_type="CAUSAL_LM"),
    dict(target_modules="all-linear", use_rslora=True, init_lora_weights="gaussian", exclude_modules=["lm_head"]),
    dict(r=2, target_modules=["c_attn"], layers_to_transform=[0], layers_pattern="h", fan_in_fan_out=True,
         rank_pattern={"c_attn": 4}, base_model_name_or_path="gpt2", revision="main"),
])
def test_peft_config_dicts_round_trip(tmp_path, kwargs):
    import warnings

    import peft

    theirs = peft.LoraConfig(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no key of PEFT's own config may count as unknown
        ours = LoraConfig.from_dict(theirs.to_dict())
        assert LoraConfig.from_json(ours.to_json()) == ours
        assert LoraConfig.from_json(ours.to_json()).to_json() == ours.to_json()  # exact, nothing grows
    expected = json.loads(json.dumps(theirs.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    expected["inference_mode"] = True  # as PeftModel.save_pretrained writes it
    expected["peft_type"] = "LORA"
    got = json.loads(ours.to_json())
    if isinstance(got["target_modules"], list):
        got["target_modules"] = sorted(got["target_modules"])
    assert got == expected  # the same keys and values as PEFT's adapter_config.json
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT warns about keys it does not know: there must be none
        back = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert back.to_dict() == {**theirs.to_dict(), "inference_mode": True}


@pytest.mark.parametrize("key,nearest", [("use_magic", None), ("lora_alpah", "lora_alpha"), ("target_module", "target_modules")])
def test_unknown_keys_are_warned_about_and_ignored_as_peft_does(tmp_path, key, nearest):
    import peft

    data = {**peft.LoraConfig(r=4, target_modules=["q_proj"]).to_dict(), key: 7}
    # PEFT itself (from_pretrained -> from_peft_type) warns about a key it does not know and drops it.
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "peft_type": "LORA", "target_modules": ["q_proj"]}))
    with pytest.warns(UserWarning, match=rf"Unexpected keyword arguments \['{key}'\]"):
        peft.LoraConfig.from_pretrained(str(tmp_path))
    near = nearest or ".+"
    with pytest.warns(UserWarning, match=rf"'{key}' is not a field of PEFT's LoraConfig .* nearest known field is '{near}'"):
        ours = LoraConfig.from_dict(data)
    assert ours == LoraConfig(r=4, target_modules=["q_proj"])
    with pytest.warns(UserWarning, match=rf"'{key}' is not a field of PEFT's LoraConfig"):
        LoraConfig.from_pretrained(tmp_path)


def test_prefix_config_takes_peft_file_fields():
    import warnings

    import peft

    from lora_fx.config import PrefixConfig

    cfg = PrefixConfig(num_virtual_tokens=4, task_type="CAUSAL_LM", inference_mode=False, revision=None)
    assert cfg == PrefixConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    theirs = peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM", revision="v1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = PrefixConfig.from_dict(theirs.to_dict())
    assert set(ours.to_dict()) == set(theirs.to_dict()) and ours.to_dict()["revision"] == "v1"
    assert PrefixConfig.from_json(ours.to_json()).to_json() == ours.to_json()
    with pytest.warns(UserWarning, match="'num_virtual_token' is not a field of PEFT's PrefixTuningConfig .* 'num_virtual_tokens'"):
        PrefixConfig.from_dict({**theirs.to_dict(), "num_virtual_token": 8})


def test_quant_options_a_dtype_has_no_use_for_are_refused_not_ignored():
    """int8 has one scale per output channel: a block size (or pad=False) would be ignored, and so would symmetric=False
    for nf4/int8 and a double_quant_block_size without double_quant. Each is refused with the way out."""
    from lora_fx.config import QuantConfig, QuantDType

    with pytest.raises(ConfigError, match=r"block_size applies to nf4 and int4 blocks only, not to int8.*"
                                          r"one scale per output channel.*drop block_size=32 or use dtype='nf4' or 'int4'"):
        QuantConfig(dtype="int8", block_size=32)
    with pytest.raises(ConfigError, match=r"block_size applies to nf4 and int4 blocks only, not to int8"):
        QuantConfig.from_dict({"dtype": "int8", "block_size": 128})
    with pytest.raises(ConfigError, match=r"pad applies to nf4 and int4 blocks only, not to int8.*drop pad=False"):
        QuantConfig(dtype="int8", pad=False)
    for dtype in ("nf4", "int8"):
        with pytest.raises(ConfigError, match=rf"symmetric=False \(zero points\) applies to int4 only, not to {dtype}.*use dtype='int4'"):
            QuantConfig(dtype=dtype, symmetric=False)
    for dtype in ("nf4", "int4", "int8"):
        with pytest.raises(ConfigError, match=r"double_quant_block_size applies with double_quant only.*add double_quant=True"):
            QuantConfig(dtype=dtype, double_quant_block_size=16)
    # The options where they apply, and every default, still hold.
    assert QuantConfig(dtype="int4", block_size=32, symmetric=False, pad=False).symmetric is False
    assert QuantConfig(dtype="nf4", block_size=32, double_quant=True, double_quant_block_size=16, pad=False).pad is False
    assert QuantConfig(dtype="int8").dtype is QuantDType.INT8


@pytest.mark.parametrize("cfg", [dict(dtype="int8"), dict(dtype="int4", block_size=32, symmetric=False),
                                 dict(dtype="nf4", double_quant=True, double_quant_block_size=16)])
def test_saved_quant_configs_load_again(cfg, tmp_path):
    """to_dict writes every field, int8's unused block_size=64 too: a saved config loads again, the same."""
    from lora_fx.config import QuantConfig

    saved = QuantConfig(**cfg)
    assert json.loads(saved.to_json())["block_size"] == cfg.get("block_size", 64)
    (tmp_path / "quant.json").write_text(saved.to_json())
    assert QuantConfig.from_json((tmp_path / "quant.json").read_text()) == saved
    assert QuantConfig.from_dict(saved.to_dict()) == saved
