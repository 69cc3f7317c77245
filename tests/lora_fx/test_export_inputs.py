"""export_onnx's example inputs and output paths: a batch-1 / sequence-1 example still exports a model that runs
at any batch and sequence (checked in ONNX Runtime against the GraphModule), example inputs that do not match the
capture and output paths that cannot be written are refused before the export, naming what is wrong."""

from __future__ import annotations

import functools

import pytest
import torch

import lora_fx
import lora_fx.export
from lora_fx.errors import ConfigError, UnsupportedError
from lora_fx.export import adapters_dir, exporter_reason
from tests import models
from tests.exported import ort_run, rel


@functools.cache
def _gm() -> torch.fx.GraphModule:
    """Tiny Llama captured at (2, 8) with non-zero adapters on q_proj and v_proj (the output really changes)."""
    gm = lora_fx.capture(models.build("llama"), kwargs=models.inputs(2, 8))
    torch.manual_seed(0)
    return lora_fx.apply(gm, lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def _no_export(monkeypatch) -> None:
    """Make the export itself fail loudly: a check that runs before it is proven to run first."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.onnx.export ran although the call was to be refused before it")

    monkeypatch.setattr(lora_fx.export, "to_onnx_ir", refuse)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["merged", "adapters"])
def test_a_batch_1_sequence_1_example_exports_a_model_that_runs_at_other_shapes(tmp_path, mode):
    # The exporter fixed size-1 dims at 1 (0/1 specialization) while the file still named them: ONNX Runtime
    # failed in a Reshape at (3, 11).
    gm = _gm()
    out = lora_fx.export_onnx(gm, tmp_path / "m.onnx", kwargs=models.inputs(1, 1), mode=mode)
    adapter = out.adapter_paths[0] if mode == "adapters" else None
    for batch, seq, pad in [(3, 11, 4), (1, 1, 0), (2, 5, 0)]:
        x = models.inputs(batch, seq, pad=pad, seed=batch)
        want = models.run(gm, x).numpy()
        assert rel(want, models.run(models.build("llama"), x).numpy()) > 1e-3  # the adapters change the output
        assert rel(ort_run(out.model_path, {k: v.numpy() for k, v in x.items()}, adapter=adapter), want) <= 1e-4


def _drop_mask(kw):
    return {"input_ids": kw["input_ids"]}


def _misspell(kw):
    return {"input_ids": kw["input_ids"], "attn_mask": kw["attention_mask"]}


def _float_ids(kw):
    return {**kw, "input_ids": kw["input_ids"].float()}


def _extra_dim(kw):
    return {**kw, "attention_mask": kw["attention_mask"][None]}


@pytest.mark.parametrize("change, message", [
    (_drop_mask, r"kwargs lack 'attention_mask'; the capture takes input_ids, attention_mask"),
    (_misspell, r"kwargs have 'attn_mask' \(did you mean 'attention_mask'\?\), which the captured graph does not take"),
    (_float_ids, r"kwargs\['input_ids'\] is a 2-d float32 tensor, but the capture took a 2-d int64 one"),
    (_extra_dim, r"kwargs\['attention_mask'\] is a 3-d int64 tensor, but the capture took a 2-d int64 one"),
])
def test_example_inputs_that_do_not_match_the_capture_are_refused_naming_the_input(tmp_path, monkeypatch, change, message):
    _no_export(monkeypatch)
    with pytest.raises(ConfigError, match=message) as info:
        lora_fx.export_onnx(_gm(), tmp_path / "m.onnx", kwargs=change(models.inputs(2, 8)))
    assert "\x1b[" not in str(info.value) and "Next steps" not in str(info.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_an_exporter_failure_says_what_failed_without_colours_or_advice(tmp_path):
    # Names, dtypes and ranks fit the capture; the sequence lengths disagree, which only the exporter finds.
    kw = models.inputs(2, 8)
    kw["attention_mask"] = kw["attention_mask"][:, :5]
    with pytest.raises(UnsupportedError, match="could not export this graph") as info:
        lora_fx.export_onnx(_gm(), tmp_path / "m.onnx", kwargs=kw)
    text = str(info.value)
    assert "Guard failed" in text and "attention_mask" in text, text
    assert "\x1b[" not in text and "Next steps" not in text and "\n- " not in text, text
    assert not list(tmp_path.iterdir())


def test_exporter_reason_strips_colours_and_keeps_the_summary():
    exc = RuntimeError("Failed to export the model with torch.export. Next steps:\n- Modify the model code\n- Debug it\n"
                       "## Exception summary\n\n\x1b[31m<class 'AssertionError'>\x1b[0m: Guard failed: x.size()[0] == 2\n\n"
                       "(Refer to the full stack trace above for more information.)")
    assert exporter_reason(exc) == ("Failed to export the model with torch.export.\n"
                                    "<class 'AssertionError'>: Guard failed: x.size()[0] == 2")
    assert exporter_reason(RuntimeError("")) == "RuntimeError"


def test_an_adapters_path_that_is_a_file_is_refused_before_the_export(tmp_path, monkeypatch):
    # The FileExistsError used to come from pathlib after the whole export.
    _no_export(monkeypatch)
    (tmp_path / "x.adapters").write_text("a file")
    with pytest.raises(ConfigError, match="x.adapters is a file, not a folder"):
        lora_fx.export_onnx(_gm(), tmp_path / "x.onnx", kwargs=models.inputs(2, 8), mode="adapters")
    # The PEFT folder's place taken by a file: refused unless no PEFT folder is written.
    adapters_dir(tmp_path / "y.onnx").mkdir()
    (adapters_dir(tmp_path / "y.onnx") / "default").write_text("a file")
    with pytest.raises(ConfigError, match=r"default is a file; the PEFT adapter folder goes there.*peft_dir=False"):
        lora_fx.export_onnx(_gm(), tmp_path / "y.onnx", kwargs=models.inputs(2, 8), mode="adapters")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["default", "x.adapters", "y.adapters"]
    assert (tmp_path / "x.adapters").read_text() == "a file"


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../up", "a\\b"])
def test_adapter_names_that_are_not_one_plain_name_are_refused(tmp_path, monkeypatch, name):
    _no_export(monkeypatch)
    with pytest.raises(ConfigError, match=r"adapter_name .* use a plain name"):
        lora_fx.export_onnx(_gm(), tmp_path / "w.onnx", kwargs=models.inputs(2, 8), mode="adapters", adapter_name=name)
    assert not list(tmp_path.iterdir())
