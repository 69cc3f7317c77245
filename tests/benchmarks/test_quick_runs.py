"""The benchmarks' quick modes and result files: what they write, where, and that the ratios in the JSON are
computed from the times recorded beside them. No timing assertions: any machine may be slow."""

import json
import math
import statistics

import pytest
import torch

from benchmarks import _shared, onnx_training, ort_inference, rewrite_scaling
from lora_fx.report import paired_ratios


def _strict(path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {path.name}"))


def _all_finite(obj):
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_all_finite(v) for v in obj)
    return True


def test_rewrite_scaling_quick_run_end_to_end(tmp_path, monkeypatch):
    # It had no quick mode, no progress, and a run of other depths printed "400 layers: None s" into the results.
    monkeypatch.setattr(rewrite_scaling, "RESULTS", tmp_path / "committed")
    rewrite_scaling.main(["--quick"])
    assert not (tmp_path / "committed").exists()  # a smoke run replaces no results
    rewrite_scaling.main(["--quick", "--out", str(tmp_path / "quick")])
    result = _strict(tmp_path / "quick" / "rewrite_scaling.json")
    assert result["quick"] is True and result["env"]["versions"]["onnx-ir"]
    assert [r["layers"] for r in result["runs"]] == [25, 100]
    for r in result["runs"]:
        assert r["linear_sites"] == 6 * r["layers"] and r["attention_sites"] == r["layers"]
        assert r["total_s"] == pytest.approx(r["find_sites_s"] + r["insert_lora_s"], abs=2e-4)
        # total_s is written to 4 decimals and seconds_per_site to 7, both from the unrounded time
        rounding = 0.5e-4 / r["linear_sites"] + 0.5e-7
        assert r["seconds_per_site"] == pytest.approx(r["total_s"] / r["linear_sites"], abs=rounding)
    first, last = result["runs"][0], result["runs"][-1]
    assert result["per_site_ratio"] == pytest.approx(last["seconds_per_site"] / first["seconds_per_site"])
    assert result["total_400_s"] is None and _all_finite(result)
    md = (tmp_path / "quick" / "rewrite_scaling.md").read_text()
    assert md == rewrite_scaling.to_markdown(result)
    assert "None" not in md and "\n\nPer-site cost ratio 100 vs 25 layers: " in md and "Quick smoke run" in md


class _Tiny(torch.nn.Module):
    """Stands in for MiniLM: the measurement loop, the ratios and the files are what is under test."""

    def __init__(self, scale):
        super().__init__()
        torch.manual_seed(0)  # both runners start from the same weights, as the real ones do
        self.emb = torch.nn.Embedding(30000, 4)
        self.emb.weight.requires_grad_(False)
        self.lora = torch.nn.Parameter(torch.full((4,), scale))

    def forward(self, input_ids, attention_mask, token_type_ids):
        return {"last_hidden_state": self.emb(input_ids) * self.lora}


def _tiny_runners(base, workdir, compile_too):
    runners = {}
    for name, scale in (("fx", 1.0), ("onnx", 1.0)):
        m = _Tiny(scale)
        runners[name] = onnx_training.Runner(m, [m.lora])
    return runners, {"fx_capture_and_rewrite_s": 0.1, "onnx_export_load_rewrite_s": 0.2}


def test_onnx_training_quick_run_writes_no_results_and_ratios_come_from_the_recorded_times(tmp_path, monkeypatch):
    # --quick wrote onnx_training.json/.md over the committed full results.
    monkeypatch.setattr(onnx_training, "RESULTS", tmp_path / "committed")
    monkeypatch.setattr(onnx_training, "load_minilm", lambda: None)
    monkeypatch.setattr(onnx_training, "build", _tiny_runners)
    assert onnx_training.main(["--quick"]) == 0
    assert not (tmp_path / "committed").exists()
    assert onnx_training.main(["--quick", "--out", str(tmp_path / "quick")]) == 0
    result = _strict(tmp_path / "quick" / "onnx_training.json")
    r = result["results"]
    assert result["quick"] is True and result["reps"] == 2 and result["env"]["versions"]["torch"] == torch.__version__
    for m in ("fx", "onnx"):
        assert len(r["all_s"][m]) == len(r["all_cpu_s"][m]) == 2
        assert r["median_s"][m] == statistics.median(r["all_s"][m])
    assert r["ratio_onnx_over_fx"]["eager"] == pytest.approx(r["median_s"]["onnx"] / r["median_s"]["fx"])
    assert r["cpu_ratio_onnx_over_fx"]["eager"] == pytest.approx(r["median_cpu_s"]["onnx"] / r["median_cpu_s"]["fx"])
    assert r["paired_ratio_onnx_over_fx"]["eager"] == pytest.approx(paired_ratios(r["all_s"]["onnx"], r["all_s"]["fx"]))
    assert r["first_loss"]["fx"] == r["first_loss"]["onnx"]
    md = (tmp_path / "quick" / "onnx_training.md").read_text()
    assert md == onnx_training.markdown(result) and "Quick smoke run" in md


def _fake_measure(out, batch, rounds, providers, threads, clock="wall", prefix_lengths=(8,)):
    names = ["base", "merged", "slot, no adapter", "slot, same adapter", "slot, switching a/b", "slot unfused, same adapter",
             "slot unhoisted, same adapter", *(f"prefix T={n}" for n in prefix_lengths)]
    times = {n: [0.010 * (1 + i / 10) * (1 + r) for r in range(rounds)] for i, n in enumerate(names)}
    q = {k: paired_ratios(times[k], times["base"]) for k in names}
    return {
        "batch": batch, "seq": 128, "provider": "CPUExecutionProvider", "threads": threads, "clock": clock,
        "median_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()}, "new_session_per_adapter_ms": 50.0,
        "ratios": {"merged/base": q["merged"], "slot/base": q["slot, same adapter"], "slot no adapter/base": q["slot, no adapter"],
                   "slot unfused/base": q["slot unfused, same adapter"], "slot unhoisted/base": q["slot unhoisted, same adapter"],
                   "switch/same": paired_ratios(times["slot, switching a/b"], times["slot, same adapter"]),
                   "new session/switch": {"median": 5.0},
                   **{f"prefix T={n}/base": q[f"prefix T={n}"] for n in prefix_lengths}},
        "merged_vs_slot_max_rel": 1e-6, "rounds": rounds, "all_s": times,
    }


def test_ort_inference_writes_its_results_only_where_asked_and_both_files_agree(tmp_path, monkeypatch):
    # It wrote with Path.write_text (a crash mid-write left half a file) and had no --out.
    monkeypatch.setattr(ort_inference, "RESULTS", tmp_path / "committed")
    monkeypatch.setattr(ort_inference, "build_models", lambda out, lengths: {"sites": 37})
    monkeypatch.setattr(ort_inference, "measure", _fake_measure)
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])  # no models to try CUDA on
    assert ort_inference.main(["--quick"]) == 0
    assert not (tmp_path / "committed").exists()
    assert ort_inference.main(["--quick", "--out", str(tmp_path / "quick")]) == 0
    result = _strict(tmp_path / "quick" / "ort_inference.json")
    assert result["quick"] is True and result["env"]["versions"]["onnxruntime"]
    (run,) = result["runs"]
    assert run["rounds"] == 4
    md = (tmp_path / "quick" / "ort_inference.md").read_text()
    assert md == ort_inference.markdown(result) and "Quick smoke run" in md
    assert sorted(p.name for p in (tmp_path / "quick").iterdir()) == ["ort_inference.json", "ort_inference.md"]


def test_write_results_keeps_the_previous_pair_when_rendering_fails(tmp_path):
    _shared.write_results(tmp_path, "b", {"x": 1.0, "t": (1, 2)}, lambda r: f"x={r['x']} t={r['t']}\n")
    assert (tmp_path / "b.md").read_text() == "x=1.0 t=[1, 2]\n"  # rendered from the JSON as written

    def broken(result):
        raise KeyError("missing")

    with pytest.raises(KeyError):
        _shared.write_results(tmp_path, "b", {"x": float("nan")}, broken)
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": 1.0, "t": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.md"]


@pytest.mark.parametrize("module,argv", [
    ("train_step", ["--reps", "0"]), ("train_step", ["--warmup", "0"]), ("onnx_training", ["--reps", "0"]),
    ("ort_inference", ["--rounds", "0"]), ("rewrite_scaling", ["--repeats", "0"]), ("qlora_memory", ["--repeats", "0"]),
])
def test_a_count_below_one_is_a_usage_error_before_any_work(module, argv, capsys):
    # --reps 0 used to run the whole set-up and then fail in statistics.median([]) (warm-up 0: a KeyError).
    import importlib

    with pytest.raises(SystemExit) as exc:
        importlib.import_module(f"benchmarks.{module}").main(argv)
    assert exc.value.code == 2 and "must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["train_step", "ort_inference", "onnx_training", "rewrite_scaling", "qlora_memory"])
def test_every_benchmark_has_help_naming_quick_and_out(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as exc:
        importlib.import_module(f"benchmarks.{module}").main(["--help"])
    text = capsys.readouterr().out
    assert exc.value.code == 0 and "--quick" in text and "--out" in text
