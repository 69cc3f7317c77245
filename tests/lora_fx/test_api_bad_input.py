"""The public entry points on hostile input: a PEFT adapter folder whose tensors are NaN or integers, a config whose
alpha is not finite, and lora_fx.load / save on what is no path. Each is refused by name before the model changes."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_fx
from lora_fx.errors import AdapterError, ConfigError
from lora_fx.passes.fx.capture import meta
from tests.models import inputs, run


def _saved_adapter(zoo, tmp_path):
    gm = lora_fx.apply(zoo.gm("bert"), lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    folder = lora_fx.save_adapter(gm, tmp_path / "adapter")
    return folder, load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("fault,match", [
    ("nan", r"holds 64 NaN or inf values of 64; it was saved from a diverged training run"),
    ("inf", r"holds 1 NaN or inf values of 64"),
    ("int", r"is torch.int32, but LoRA matrices are floating point"),
])
@pytest.mark.parametrize("onto", ["bare", "applied"])
def test_an_adapter_with_nan_or_integer_tensors_is_refused_before_loading(zoo, tmp_path, fault, match, onto):
    # Loaded silently before: NaN made every output of the adapted sites NaN; integers were cast to float.
    folder, tensors = _saved_adapter(zoo, tmp_path)
    key = "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"
    if fault == "nan":
        tensors[key] = torch.full_like(tensors[key], math.nan)
    elif fault == "inf":
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = math.inf
    else:
        tensors = {k: (v * 100).to(torch.int32) for k, v in tensors.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    gm = zoo.gm("bert")
    if onto == "applied":
        lora_fx.apply(gm, lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    before = run(gm, inputs(2, 8))
    with pytest.raises(AdapterError, match=match) as info:
        lora_fx.load_adapter(gm, folder)
    assert "adapter_model.safetensors" in str(info.value)
    assert bool(meta(gm).get("lora_sites")) == (onto == "applied")  # a bare model was left unrewritten
    torch.testing.assert_close(run(gm, inputs(2, 8)), before, rtol=0, atol=0)


def test_a_finite_adapter_still_loads_with_peft_outputs(zoo, tmp_path):
    # The reference for the refusals above: the same folder, untouched, gives PEFT's outputs.
    folder, tensors = _saved_adapter(zoo, tmp_path)
    tensors = {k: torch.randn_like(v) * 0.1 for k, v in tensors.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    gm = lora_fx.load_adapter(zoo.gm("bert"), folder)
    import copy

    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(zoo.model("bert")), str(folder)).eval()
    with torch.no_grad():
        want = pm(**inputs(2, 8)).last_hidden_state
    torch.testing.assert_close(run(gm, inputs(2, 8)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field", ["lora_alpha", "alpha_pattern"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_alpha_is_refused(field, value):
    # Accepted before: the site's scale alpha / r was NaN or inf, and every output of the site with it
    # (lora-fx rewrite --lora-alpha nan wrote such a model and exited 0).
    kw = {"lora_alpha": value} if field == "lora_alpha" else {"alpha_pattern": {"query": value}}
    with pytest.raises(ConfigError, match="must be a finite number"):
        lora_fx.LoraConfig(r=2, target_modules=["query"], **kw)


@pytest.mark.parametrize("field", ["lora_alpha", "alpha_pattern"])
def test_a_zero_alpha_is_refused(field):
    # Accepted before: a no-op adapter that trained anyway, and the ONNX form (scale kept in B) exported B / 0 to PEFT.
    kw = {"lora_alpha": 0} if field == "lora_alpha" else {"alpha_pattern": {"query": 0.0}}
    with pytest.raises(ConfigError, match="the scale alpha / r would be 0"):
        lora_fx.LoraConfig(r=2, target_modules=["query"], **kw)


def test_an_adapter_config_with_alpha_nan_is_refused(zoo, tmp_path):
    folder, _ = _saved_adapter(zoo, tmp_path)
    config = folder / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 4', '"lora_alpha": NaN'))
    assert "NaN" in config.read_text()
    with pytest.raises(ConfigError, match="lora_alpha must be a finite number"):
        lora_fx.load_adapter(zoo.gm("bert"), folder)


@pytest.mark.parametrize("where", ["a_file", "under_a_file"])
def test_save_adapter_onto_a_file_is_refused_naming_the_way_out(zoo, tmp_path, where):
    # FileExistsError / NotADirectoryError from mkdir, naming no way out.
    gm = lora_fx.apply(zoo.gm("bert"), lora_fx.LoraConfig(r=2, target_modules=["query"]))
    (tmp_path / "a_file").write_text("keep")
    target = tmp_path / "a_file" if where == "a_file" else tmp_path / "a_file" / "adapter"
    with pytest.raises(ConfigError, match="a_file is a file, not a folder; choose another output path"):
        lora_fx.save_adapter(gm, target)
    assert (tmp_path / "a_file").read_text() == "keep"


def test_load_and_save_refuse_what_they_cannot_use(tmp_path):
    import onnx_ir as ir

    from tests.runtime.onnx_models import mlp

    ir.save(mlp(lora=False), str(tmp_path / "m.onnx"))
    with pytest.raises(lora_fx.ModelLoadError, match="path of an .onnx file"):
        lora_fx.load(None)
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="is a directory; give the output a file name"):
        lora_fx.save(lora_fx.load(tmp_path / "m.onnx"), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("form", ["onnx_ir", "proto"])
def test_export_onnx_of_an_onnx_model_names_the_route_and_the_route_works(tmp_path, monkeypatch, capsys, form):
    # Before: "export_onnx takes a GraphModule ..., got Model", with no word of how an ONNX model (lora_fx.load +
    # lora_fx.apply) is merged or given adapter slots. The test follows the route the message names, as written.
    import re
    import shlex

    import onnx_ir as ir

    from lora_fx.cli import main
    from tests.exported import lora_onnx, ort_run, rel
    from tests.onnx_corpus import corpus

    lora = lora_onnx("gemm-mlp")
    model = lora if form == "onnx_ir" else ir.to_proto(lora)
    with pytest.raises(ConfigError, match=r"is an ONNX model already") as info:
        lora_fx.export_onnx(model, tmp_path / "x.onnx", mode="merged")
    assert not (tmp_path / "x.onnx").exists()
    message = str(info.value)
    save_call = re.search(r"Save it \(((lora_fx|onnx)\.save)\(model, '([^']+)'\)\)", message)
    assert save_call and save_call.group(1) == ("lora_fx.save" if form == "onnx_ir" else "onnx.save")
    commands = re.findall(r"`(lora-fx export [^`]+)`", message)
    assert [c.split()[-1] for c in commands] == ["--merge", "--adapters"]

    monkeypatch.chdir(tmp_path)
    if form == "onnx_ir":
        lora_fx.save(model, save_call.group(3))
    else:
        import onnx

        onnx.save(model, save_call.group(3))
    feeds = corpus().get("gemm-mlp").feeds()
    want = ort_run(save_call.group(3), feeds)
    for command in commands:
        args = shlex.split(command)
        assert args[0] == "lora-fx" and main(args[1:]) == 0
    capsys.readouterr()
    merged, served = (args[args.index("-o") + 1] for args in map(shlex.split, commands))
    assert rel(ort_run(merged, feeds), want) <= 1e-5  # the adapters merged into the weights
    assert not [n for n in ir.load(merged).graph.initializers if ".lora_" in n]
    adapter = tmp_path / f"{served.removesuffix('.onnx')}.adapters" / "default.onnx_adapter"
    assert rel(ort_run(served, feeds, adapter=adapter), want) <= 1e-5  # slots serving the exported adapter
