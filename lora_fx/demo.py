"""The main job on the bundled all-MiniLM-L6-v2: capture, rewrite, train, save, and report.

``lora-fx demo`` runs it; ``make demo`` sets up the environment first.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_fx.files import atomic_write_text


@dataclass
class MethodResult:
    method: str
    trainable_parameters: int
    steps: int
    train_seconds: float
    accuracy_before: float
    accuracy_after: float
    losses: list[float] = field(default_factory=list)
    artefacts: dict[str, str] = field(default_factory=dict)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_demo(out_dir: str | Path = "out/demo", *, steps: int = 60, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    import lora_fx
    from lora_fx.hf import load_hf_model, minilm_dir
    from lora_fx.tasks import TenseTask

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if quick:
        steps = min(steps, 25)
    torch.manual_seed(seed)
    model_dir = minilm_dir()
    _say(f"[1/4] loading all-MiniLM-L6-v2 from {model_dir}")
    task = TenseTask.from_model_dir(model_dir)
    model = load_hf_model(model_dir)

    _say("[2/4] capturing with torch.export")
    t0 = time.perf_counter()
    gm = lora_fx.capture(model, kwargs=task.example())
    sites = lora_fx.find_sites(gm)
    capture_s = time.perf_counter() - t0

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return gm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])["last_hidden_state"]

    before = task.accuracy(forward)
    _say(f"      {len(sites)} sites; zero-shot test accuracy {before:.3f}")

    _say(f"[3/4] LoRA r=8 on all linear layers, training {steps} steps")
    config = lora_fx.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    lora_fx.apply(gm, config)
    result = lora_fx.train(gm, task.batches("train", seed=seed), task.loss_fn, steps=steps, lr=2e-3, seed=seed)
    after = task.accuracy(forward)
    _say(f"      loss {result.losses[0]:.3f} -> {result.final_loss:.4f}; test accuracy {before:.3f} -> {after:.3f}")

    _say("[4/4] saving the adapter in PEFT format")
    adapter_dir = lora_fx.save_adapter(gm, out_dir / "lora_adapter")
    methods = [
        MethodResult(
            method="lora", trainable_parameters=result.trainable_parameters, steps=result.steps,
            train_seconds=result.seconds, accuracy_before=before, accuracy_after=after, losses=result.losses,
            artefacts={"peft_adapter": str(adapter_dir)},
        )
    ]
    summary = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (bundled)",
        "task": "tense classification (lora_fx/data/tense.jsonl), accuracy on held-out verbs",
        "capture_seconds": capture_s,
        "sites": {"linear": sum(s.kind.value == "linear" for s in sites), "attention": sum(s.kind.value == "attention" for s in sites)},
        "methods": [asdict(m) for m in methods],
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    print(format_summary(summary))
    print(f"\nartefacts in {out_dir.resolve()}")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        "| method | trainable params | steps | train s | accuracy before | accuracy after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in summary["methods"]:
        lines.append(
            f"| {m['method']} | {m['trainable_parameters']:,} | {m['steps']} | {m['train_seconds']:.1f} | "
            f"{m['accuracy_before']:.3f} | {m['accuracy_after']:.3f} |"
        )
    return "\n".join(lines)
