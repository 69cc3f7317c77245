"""The demo's promise: on the bundled MiniLM, LoRA training beats the zero-shot accuracy."""

import json
from pathlib import Path

import pytest

from lora_fx.demo import run_demo
from lora_fx.tasks import load_rows


def test_dataset_splits_do_not_share_verbs():
    from lora_fx.data.build_tense import N_TRAIN_VERBS, VERBS

    held_out = {v[0] for v in VERBS[N_TRAIN_VERBS:]} | {v[2] for v in VERBS[N_TRAIN_VERBS:]}
    train_words = {w.strip(".") for r in load_rows("train") for w in r["text"].split()}
    assert not held_out & train_words
    test = load_rows("test")
    assert len(test) == 180 and len(load_rows("train")) == 675
    assert {r["label"] for r in test} == {0, 1, 2}


@pytest.mark.slow
def test_quick_demo_runs_the_whole_path_and_beats_zero_shot(tmp_path):
    summary = run_demo(tmp_path, quick=True)
    by = {m["method"]: m for m in summary["methods"]}
    assert set(by) == {"lora", "qlora-nf4", "prefix"}
    assert by["lora"]["accuracy_after"] > by["lora"]["accuracy_before"] + 0.1
    assert by["qlora-nf4"]["accuracy_after"] > by["qlora-nf4"]["accuracy_before"]
    serving = summary["serving"]
    # one ORT session, adapter switched per call: without it the base's zero-shot accuracy, with it the trained one
    assert serving["accuracy_no_adapter"] == pytest.approx(by["lora"]["accuracy_before"], abs=0.02)
    assert serving["accuracy_with_adapter"] == pytest.approx(by["lora"]["accuracy_after"], abs=0.02)
    assert serving["providers"][-1] == "CPUExecutionProvider"
    lora = summary["artefacts"]["lora"]
    for key in ("adapters", "adapter_file", "merged"):
        assert Path(lora[key]).stat().st_size > 0
    cfg = json.loads((Path(lora["peft_adapter"]) / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    assert (tmp_path / "report" / "report.md").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["serving"] == serving


def test_an_output_folder_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    from lora_fx.cli import main

    (tmp_path / "out").write_text("a file")
    assert main(["demo", "-o", str(tmp_path / "out"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "out is a file, not a folder" in err and "Traceback" not in err, err
    assert (tmp_path / "out").read_text() == "a file"


def test_the_summary_prints_the_paired_latency_ratios_not_a_ratio_of_medians():
    from lora_fx.demo import format_summary

    summary = {
        "model": "m", "task": "t", "steps": 1,
        "methods": [{"method": "lora", "trainable_parameters": 10, "adapter_file_bytes": 100, "median_step_seconds": 0.2,
                     "accuracy_before": 0.5, "accuracy_after": 1.0}],
        # medians of times measured in different rounds: 20 / 10 = 2x; the per-round ratios say 1.25x
        "ort_latency_ms": {"base": 10.0, "lora merged": 20.0},
        "ort_latency_ratio": {"lora merged": {"median": 1.25, "q1": 1.2, "q3": 1.3, "n": 5}},
        "serving": {"providers": ["CPUExecutionProvider"], "calls": 2, "accuracy_no_adapter": 0.5, "accuracy_with_adapter": 1.0},
        "report": "r.md",
    }
    text = format_summary(summary)
    assert "ONNX Runtime latency vs the plain base: lora merged 1.250x" in text and "2.000x" not in text
    no_latency = format_summary({**summary, "ort_latency_ms": {}, "ort_latency_ratio": {}})
    assert "ONNX Runtime latency" not in no_latency


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps must be at least 1, got 0"),
    ({"steps": -3, "quick": True}, "steps must be at least 1, got -3"),  # quick caps steps at 8; it must not hide -3
    ({"steps": 1.5}, "steps must be at least 1, got 1.5"),
    ({"seed": 2**64}, r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
    ({"seed": None}, r"seed must be an integer in \[-2\*\*63, 2\*\*64\) \(torch.manual_seed's range\), got None"),
])
def test_run_demo_refuses_bad_numbers_before_the_banner_and_the_folder(tmp_path, capsys, kwargs, match):
    # Only the CLI checked these: run_demo printed its banner and made the folder, and compare refused them only then
    # (a None seed failed in every training process).
    from lora_fx.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        run_demo(tmp_path / "demo", **kwargs)
    assert capsys.readouterr().err == "" and not (tmp_path / "demo").exists()
