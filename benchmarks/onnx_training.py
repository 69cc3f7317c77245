"""Training through the ONNX graph against training through the FX graph of the same MiniLM.

``python -m benchmarks.onnx_training`` (``--reps N``, ``--quick`` for a smoke run, ``--no-compile``).
The bundled all-MiniLM-L6-v2 (dropout off, so both graphs do the same arithmetic) is captured with
``lora_fx.capture`` and exported with ``torch.onnx.export(dynamo=True)``; both get LoRA r=8 on
query/value with the same initial A (B zero). A step is forward + backward + AdamW on the adapters.
The methods run in one process, interleaved (the order alternates every repetition, so other load
on the shared machine hits all alike); medians of wall and CPU time are reported, each with and
without ``torch.compile``; the ratios are ONNX / FX of those medians, and the JSON also holds the
ratios paired per repetition (median and interquartile range). Target: ONNX / FX step-time ratio <= 1.3.
Results: ``benchmarks/results/onnx_training.json`` and ``onnx_training.md`` (``--out DIR`` elsewhere);
``--quick`` writes nothing unless ``--out`` is given, so a smoke run never replaces the full results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks._shared import environment, log, paired_ratios, provenance_lines, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, SEQ, RANK, ALPHA = 8, 64, 8, 16
TARGETS = ["query", "value"]
TARGET_RATIO = 1.3


def load_minilm() -> torch.nn.Module:
    from lora_fx.hf import load_hf_model, minilm_dir

    model = load_hf_model(minilm_dir())
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.eval()


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[BATCH // 2:, SEQ - 12:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def loss_of(out: Any) -> torch.Tensor:
    return out["last_hidden_state"].float().pow(2).mean()


class Runner:
    def __init__(self, module: Callable[..., Any], params: list[torch.nn.Parameter]) -> None:
        self.module = module
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=1e-4)

    def step(self, inputs: dict[str, torch.Tensor]) -> float:
        loss = loss_of(self.module(**inputs))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


def build(base: torch.nn.Module, workdir: Path, compile_too: bool) -> tuple[dict[str, Runner], dict[str, float]]:
    import lora_fx
    from lora_fx.adapters import to_deployment_layout
    from lora_fx.passes.fx.set_training_mode import set_training_mode
    from lora_fx.runtime.onnx_torch import trainable_module

    setup: dict[str, float] = {}
    inputs = batch()
    config = lora_fx.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS)
    t0 = time.perf_counter()
    gm = lora_fx.capture(base, kwargs=inputs)
    torch.manual_seed(0)
    lora_fx.apply(gm, config)
    set_training_mode(gm, True)
    setup["fx_capture_and_rewrite_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    path = workdir / "minilm.onnx"
    dims = {k: {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")} for k in inputs}
    with torch.no_grad():
        torch.onnx.export(base, (), str(path), kwargs=inputs, dynamo=True, opset_version=18, input_names=list(inputs),
                          output_names=["last_hidden_state", "pooler_output"], dynamic_shapes=dims, verbose=False)
    model = lora_fx.apply(lora_fx.load(path), lora_fx.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    module = trainable_module(model)
    setup["onnx_export_load_rewrite_s"] = time.perf_counter() - t0
    # the same start on both sides: FX's A (and its zero B) in the ONNX layout
    scale = ALPHA / RANK
    with torch.no_grad():
        for name, param in module.named_adapters().items():
            site, which = name.rsplit(".lora_", 1)
            sub = gm.get_submodule(site)
            a, b = to_deployment_layout(sub.lora_A.weight, sub.lora_B.weight, scale)
            param.copy_(a if which.startswith("A") else b)

    fx_params = [p for p in gm.parameters() if p.requires_grad]
    onnx_params = [p for p in module.parameters() if p.requires_grad]
    runners = {"fx": Runner(gm, fx_params), "onnx": Runner(module, onnx_params)}
    if compile_too:
        runners["fx_compiled"] = Runner(torch.compile(gm), fx_params)
        runners["onnx_compiled"] = Runner(torch.compile(module), onnx_params)
    return runners, setup


def measure(reps: int, warmup: int, compile_too: bool) -> dict[str, Any]:
    base = load_minilm()
    with tempfile.TemporaryDirectory() as tmp:
        log("set-up: capture + LoRA on the FX graph, export + load + LoRA on the ONNX file")
        runners, setup = build(base, Path(tmp), compile_too)
        log("set-up: " + ", ".join(f"{k} {v:.1f} s" for k, v in setup.items()))
        inputs = batch()
        first_loss: dict[str, float] = {}
        warm_s: dict[str, float] = {}
        for name, runner in runners.items():
            t0 = time.perf_counter()
            for i in range(warmup):
                loss = runner.step(inputs)
                if i == 0:
                    first_loss[name] = loss
            warm_s[name] = time.perf_counter() - t0
            log(f"warm-up {name}: {warm_s[name]:.1f} s (first loss {first_loss[name]:.6f})")
        methods = tuple(runners)
        wall: dict[str, list[float]] = {m: [] for m in methods}
        cpu: dict[str, list[float]] = {m: [] for m in methods}
        for rep in range(reps):
            for m in methods if rep % 2 == 0 else tuple(reversed(methods)):
                c0, t0 = time.process_time(), time.perf_counter()
                runners[m].step(inputs)
                wall[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
            log(f"rep {rep + 1}/{reps} " + " ".join(f"{m}={wall[m][-1] * 1e3:.0f}ms" for m in methods))
    median = {m: statistics.median(v) for m, v in wall.items()}
    median_cpu = {m: statistics.median(v) for m, v in cpu.items()}
    ratios = {"eager": median["onnx"] / median["fx"]}
    cpu_ratios = {"eager": median_cpu["onnx"] / median_cpu["fx"]}
    paired = {"eager": paired_ratios(wall["onnx"], wall["fx"])}
    if compile_too:
        ratios["compiled"] = median["onnx_compiled"] / median["fx_compiled"]
        cpu_ratios["compiled"] = median_cpu["onnx_compiled"] / median_cpu["fx_compiled"]
        paired["compiled"] = paired_ratios(wall["onnx_compiled"], wall["fx_compiled"])
    return {
        "paired_ratio_onnx_over_fx": paired,
        "median_s": median, "median_cpu_s": median_cpu, "all_s": wall, "all_cpu_s": cpu,
        "ratio_onnx_over_fx": ratios, "cpu_ratio_onnx_over_fx": cpu_ratios, "first_loss": first_loss,
        "warmup_s": warm_s, "setup_s": setup,
    }


def markdown(result: dict[str, Any]) -> str:
    r = result["results"]
    lines = [
        "# Training through the ONNX graph vs the FX graph (MiniLM, LoRA r=8 on query/value)",
        "",
        f"Batch {BATCH}, sequence {SEQ}; one step = forward + backward + AdamW on the adapters; "
        f"{result['reps']} interleaved repetitions after {result['warmup']} warm-up steps; medians. "
        f"Machine: {result['machine']['cpus']} CPUs ({result['machine']['platform']}), torch {result['machine']['torch']}, "
        f"{result['machine']['threads']} threads, shared with other jobs.",
        "",
        "| method | median step (ms) | median CPU (ms) | first loss |",
        "|---|---:|---:|---:|",
    ]
    for m, s in r["median_s"].items():
        lines.append(f"| {m} | {s * 1e3:.1f} | {r['median_cpu_s'][m] * 1e3:.1f} | {r['first_loss'][m]:.6f} |")
    lines += ["", "| ONNX / FX | wall ratio | CPU ratio | target |", "|---|---:|---:|---:|"]
    for k, v in r["ratio_onnx_over_fx"].items():
        ok = "met" if v <= TARGET_RATIO else "missed"
        lines.append(f"| {k} | {v:.3f} | {r['cpu_ratio_onnx_over_fx'][k]:.3f} | <= {TARGET_RATIO} ({ok}) |")
    if "compiled" in r["ratio_onnx_over_fx"]:
        lines += ["", "The compiled runners train the same parameters as the eager ones (torch.compile wraps the same "
                  "modules), so their first loss is taken after the eager warm-up steps; fx and onnx start from the same "
                  "adapters and their equal first loss shows the two graphs compute the same step."]
    else:
        lines += ["", "fx and onnx start from the same adapters; their equal first loss shows the two graphs compute the same step."]
    if r.get("paired_ratio_onnx_over_fx"):
        lines += ["", "Wall-time ratios paired per repetition, median [interquartile range]: " + ", ".join(
            f"{k} {v['median']:.3f} [{v['q1']:.2f}–{v['q3']:.2f}]" for k, v in r["paired_ratio_onnx_over_fx"].items()) + "."]
    lines += ["", "Setup (not in the step times): " + ", ".join(f"{k} {v:.1f} s" for k, v in r["setup_s"].items()) + "."]
    provenance = provenance_lines(result)
    if provenance:
        lines += [""] + provenance[:-1]
    return "\n".join(lines) + "\n"


def rewrite_markdown(out: Path = RESULTS) -> str:
    """Regenerate the Markdown from the saved JSON (no new measurement)."""
    from lora_fx.files import atomic_write_text

    md = markdown(json.loads((out / "onnx_training.json").read_text()))
    atomic_write_text(out / "onnx_training.md", md)
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (about a minute): 2 repetitions, 1 warm-up, no compile; printed, not saved unless --out is given")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile'd runners")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for onnx_training.json and .md (default: benchmarks/results; --quick: none)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 1:
        parser.error("--reps and --warmup must be at least 1")
    reps, warmup, compile_too = args.reps, args.warmup, not args.no_compile
    if args.quick:
        reps, warmup, compile_too = 2, 1, False
    out_dir = args.out if args.out is not None else (None if args.quick else RESULTS)
    result = {
        "benchmark": "onnx_training", "reps": reps, "warmup": warmup, "batch": BATCH, "seq": SEQ, "rank": RANK,
        "targets": TARGETS, "quick": args.quick, "env": environment(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "results": measure(reps, warmup, compile_too),
    }
    print(write_results(out_dir, "onnx_training", result, markdown) if out_dir is not None else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
