"""``lora-fx export --adapters`` writes the adapter files before the model: a failure leaves no model without its
adapters (and a failed model write no adapters), and a successful export leaves nothing temporary behind."""

from __future__ import annotations

import errno

import numpy as np
import onnx_ir as ir
import pytest

import lora_fx
from lora_fx.cli import main
from lora_fx.commands.export import export_file
from tests.exported import lora_onnx, ort_run, rel
from tests.onnx_corpus import corpus

ENTRY = "gemm-mlp"


def _files(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture()
def lora_file(tmp_path):
    path = tmp_path / "lora.onnx"
    lora_fx.save(lora_onnx(ENTRY), path)
    return path


@pytest.mark.parametrize("writer", ["lora_fx.onnx_adapter.write_onnx_adapter", "lora_fx.adapters.write_peft_dir"])
def test_a_failed_adapter_write_leaves_no_model(lora_file, tmp_path, monkeypatch, writer):
    before = _files(tmp_path)
    monkeypatch.setattr(writer, _disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_file(lora_file, tmp_path / "served.onnx", merge=False)
    assert _files(tmp_path) == before  # no served.onnx, no served.adapters/, nothing staged


def test_a_failed_model_write_leaves_no_adapters(lora_file, tmp_path, monkeypatch):
    before = _files(tmp_path)
    monkeypatch.setattr("lora_fx.export.save_model", _disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_file(lora_file, tmp_path / "served.onnx", merge=False)
    assert _files(tmp_path) == before


def test_the_cli_reports_a_refused_adapter_write_and_writes_nothing(lora_file, tmp_path, monkeypatch, capsys):
    from lora_fx.errors import AdapterError

    def refuse(*args, **kwargs):
        raise AdapterError("the adapter could not be written (test)")

    before = _files(tmp_path)
    monkeypatch.setattr("lora_fx.onnx_adapter.write_onnx_adapter", refuse)
    assert main(["export", str(lora_file), "-o", str(tmp_path / "served.onnx"), "--adapters"]) == 2
    assert "could not be written (test)" in capsys.readouterr().err
    assert _files(tmp_path) == before


def test_adapters_land_beside_the_model_and_replace_an_earlier_export(lora_file, tmp_path):
    """Written through the staging folder, the files are where the summary says, hold the model's adapter (ORT
    runs the served model with it as the LoRA model), and a second export into the same place replaces them, PEFT
    directory included."""
    from safetensors.numpy import load_file

    from lora_fx.onnx_adapter import read_onnx_adapter

    feeds = corpus().get(ENTRY).feeds()
    served = tmp_path / "served.onnx"
    first = export_file(lora_file, served, merge=False, name="task")
    assert _files(tmp_path / "served.adapters") == ["task", "task.onnx_adapter", "task.onnx_adapter.json",
                                                   "task/adapter_config.json", "task/adapter_model.safetensors"]
    assert first["adapters"] == [str(tmp_path / "served.adapters" / "task.onnx_adapter")]
    assert first["peft_dirs"] == [str(tmp_path / "served.adapters" / "task")]
    assert rel(ort_run(served, feeds, first["adapters"][0]), ort_run(lora_file, feeds)) <= 1e-5
    old_peft = load_file(str(tmp_path / "served.adapters" / "task" / "adapter_model.safetensors"))

    # Another adapter on the same base, exported over the first.
    other = lora_fx.load(lora_file)
    b = other.graph.initializers["fc1.lora_B.weight"]
    b.const_value = ir.tensor(b.const_value.numpy() + 0.5, name=b.name)
    lora_fx.save(other, tmp_path / "other.onnx")
    second = export_file(tmp_path / "other.onnx", served, merge=False, name="task")
    assert second["fingerprint"] == first["fingerprint"]
    assert _files(tmp_path / "served.adapters") == ["task", "task.onnx_adapter", "task.onnx_adapter.json",
                                                   "task/adapter_config.json", "task/adapter_model.safetensors"]
    adapter = read_onnx_adapter(second["adapters"][0])
    np.testing.assert_array_equal(adapter.tensors["fc1.lora_B.weight"], b.const_value.numpy())
    new_peft = load_file(str(tmp_path / "served.adapters" / "task" / "adapter_model.safetensors"))
    key = next(k for k in new_peft if k.endswith("fc1.lora_B.weight"))
    assert not np.array_equal(new_peft[key], old_peft[key])
    assert rel(ort_run(served, feeds, second["adapters"][0]), ort_run(tmp_path / "other.onnx", feeds)) <= 1e-5


@pytest.fixture(scope="module")
def prefix_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefix") / "p.onnx"
    model = lora_fx.apply(lora_fx.load(corpus().get("gpt2-dynamo18").path), lora_fx.PrefixConfig(num_virtual_tokens=4))
    return lora_fx.save(model, path)


@pytest.mark.parametrize("writer", ["lora_fx.onnx_adapter.write_onnx_adapter", "lora_fx.adapters.write_peft_dir"])
def test_a_failed_prefix_adapter_write_leaves_no_model(prefix_file, tmp_path, monkeypatch, writer):
    before = _files(tmp_path)
    monkeypatch.setattr(writer, _disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_file(prefix_file, tmp_path / "served.onnx", merge=False)
    assert _files(tmp_path) == before


def test_a_prefix_export_still_serves_its_prefixes(prefix_file, tmp_path):
    from lora_fx.onnx_adapter import read_onnx_adapter
    from lora_fx.passes.onnx.insert_prefix import prefix_metadata

    summary = export_file(prefix_file, tmp_path / "served.onnx", merge=False)
    assert _files(tmp_path / "served.adapters") == ["default", "default.onnx_adapter", "default.onnx_adapter.json",
                                                   "default/adapter_config.json", "default/adapter_model.safetensors"]
    model = lora_fx.load(prefix_file)
    adapter = read_onnx_adapter(summary["adapters"][0])
    for rec in prefix_metadata(model)["sites"].values():
        for w in ("key", "value"):
            np.testing.assert_array_equal(adapter.tensors[rec[w]], model.graph.initializers[rec[w]].const_value.numpy())
    ids = np.random.default_rng(0).integers(0, 50, (2, 6)).astype(np.int64)
    names = {v.name for v in model.graph.inputs}
    feeds = {k: v for k, v in {"input_ids": ids, "attention_mask": np.ones_like(ids)}.items() if k in names}
    assert rel(ort_run(tmp_path / "served.onnx", feeds, summary["adapters"][0]), ort_run(prefix_file, feeds)) <= 1e-5


@pytest.mark.slow
def test_a_prefix_export_with_a_trained_head_serves_the_base_head_by_default(tmp_path):
    """Prefixes with a head trained in full (SEQ_CLS): the PEFT directory, now written before the model, still gets
    the trained head and the model still gets the base head as its slots' default."""
    from safetensors.numpy import load_file

    from lora_fx.onnx_adapter import read_onnx_adapter
    from tests.lora_fx.test_onnx_modules_to_save import _bert, _export

    base_path = tmp_path / "bert.onnx"
    _export(_bert(), base_path, "dynamo")
    model = lora_fx.apply(lora_fx.load(base_path), lora_fx.PrefixConfig(num_virtual_tokens=4, task_type="SEQ_CLS"))
    base, trained = {}, {}
    for name in ("classifier.weight", "classifier.bias"):  # a training step's worth of change
        value = model.graph.initializers[name]
        base[name] = value.const_value.numpy().copy()
        trained[name] = base[name] + np.float32(0.5)
        value.const_value = ir.tensor(trained[name], name=name)
    tuned = lora_fx.save(model, tmp_path / "tuned.onnx")
    summary = export_file(tuned, tmp_path / "served.onnx", merge=False)

    served = lora_fx.load(summary["model"])
    adapter = read_onnx_adapter(summary["adapters"][0])
    peft_tensors = load_file(str(tmp_path / "served.adapters" / "default" / "adapter_model.safetensors"))
    for name in trained:
        np.testing.assert_array_equal(served.graph.initializers[name].const_value.numpy(), base[name])
        np.testing.assert_array_equal(adapter.tensors[name], trained[name])
        np.testing.assert_array_equal(next(v for k, v in peft_tensors.items() if k.endswith(name)), trained[name])
    ids = np.random.default_rng(0).integers(1, 50, (2, 8)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    want = ort_run(tuned, feeds)
    assert rel(ort_run(summary["model"], feeds, summary["adapters"][0]), want) <= 1e-5
    assert rel(ort_run(summary["model"], feeds), want) > 1e-3  # without the adapter: the base head


@pytest.mark.slow
@pytest.mark.parametrize("method,writer", [("lora", "lora_fx.onnx_adapter.write_onnx_adapter"),
                                           ("prefix", "lora_fx.adapters.write_peft_dir")])
def test_export_onnx_with_adapters_writes_all_its_files_or_none(tmp_path, monkeypatch, method, writer):
    """The Python API (export_onnx / export_prefix_onnx) wrote the model first, so a failed adapter write left a
    served model without its adapters. One writer per method: the staging they share (write_with_adapters) is
    checked against every writer, the model's included, through export_file above."""
    from tests import models

    kw = models.inputs(2, 8)
    gm = lora_fx.capture(models.build("bert"), kwargs=kw)
    config = (lora_fx.LoraConfig(r=2, target_modules=["query"]) if method == "lora"
              else lora_fx.PrefixConfig(num_virtual_tokens=2))
    gm = lora_fx.apply(gm, config)
    if method == "prefix" and writer.endswith("write_peft_dir"):
        writer = "lora_fx.prefix_adapters.save_prefix_adapter"  # the prefix PEFT dir's writer
    real = {}
    import importlib

    module, _, attr = writer.rpartition(".")
    real[writer] = getattr(importlib.import_module(module), attr)
    monkeypatch.setattr(writer, _disk_full)
    with pytest.raises(OSError, match="No space left"):
        lora_fx.export_onnx(gm, tmp_path / "served.onnx", kwargs=kw, mode="adapters")
    assert _files(tmp_path) == []
    monkeypatch.setattr(writer, real[writer])
    result = lora_fx.export_onnx(gm, tmp_path / "served.onnx", kwargs=kw, mode="adapters")
    assert result.adapter_paths[0].is_file() and (result.peft_dirs[0] / "adapter_config.json").is_file()
    assert not [p for p in _files(tmp_path) if ".lora_fx-staged." in p or p.endswith(".tmp")]
