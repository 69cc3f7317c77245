"""QLoRA against LoRA fp32 on the same graph: frozen-weight bytes, peak training memory, step time, loss.

``python -m benchmarks.qlora_memory`` (``--quick`` for a smoke run). Models: the bundled
all-MiniLM-L6-v2 and a 12-layer Llama (vocabulary 1024) at two widths: hidden 1024 (``llama12-h1024``,
484 MiB of linear weights) and TinyLlama's hidden 2048 / intermediate 5632 (``llama12-h2048``,
2.3 GiB). The targets are read on the wider one: at hidden 1024 the process's fixed cost (the
interpreter, torch and transformers, about 600 MiB) is larger than the weights, so the weights do not
dominate peak memory there and no weight format can halve it. Methods: LoRA r=8 on all linear sites with the base in fp32, and the same with the base
stored nf4 (double quantization), int4 (block 64, symmetric) and int8 (per channel). Both front ends:
``fx`` captures the transformers model; ``onnx`` exports it to a plain ONNX file first (once per
model, outside the measurement) and then loads, rewrites and trains the file (``--frontends``).

Every (model, method) runs in a fresh subprocess, so one run's memory never shows in another's, and
``--repeats`` times (default 2: in order, then reversed), keeping its fastest step time.
In it: build, capture, apply (or load the ONNX file and apply), then the eager model is dropped (the graph alone holds the weights),
freed heap is returned to the OS (glibc ``malloc_trim``), the peak-RSS counter is reset
(``/proc/self/clear_refs``), and ``STEPS`` training steps run (forward, backward, AdamW on the
adapters). Reported: the frozen linear weight bytes, peak RSS over the steps (weights, activations,
gradients, optimizer state and the interpreter with torch loaded, which is also reported as
``baseline_rss``), the median step time after one warm-up step, and the loss after the last step.
Ratios are each method's row against LoRA fp32's row of the same model and front end.
Results go to ``benchmarks/results/qlora_memory.json`` and ``qlora_memory.md`` (``--out DIR`` elsewhere),
with the package versions. ``--quick`` (MiniLM, 2 steps, one run per method) writes nothing unless
``--out`` is given.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._shared import environment, log, provenance_lines, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("minilm", "llama12-h1024", "llama12-h2048")
TARGET_MODEL = "llama12-h2048"
LLAMA_WIDTHS = {"llama12-h1024": (1024, 2048, 16), "llama12-h2048": (2048, 5632, 32)}  # hidden, intermediate, heads
METHODS = ("lora_fp32", "nf4", "int4", "int8")
QUANT = {
    "nf4": dict(dtype="nf4", block_size=64, double_quant=True),
    "int4": dict(dtype="int4", block_size=64, symmetric=True),
    "int8": dict(dtype="int8"),
}
BATCH, SEQ, STEPS, RANK = 2, 32, 6, 8
FRONTENDS = ("fx", "onnx")
_VOCAB = {"minilm": 30522}
TARGETS = {"nf4_peak_rss_ratio_llama12": 0.5, "step_time_ratio": 1.5}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the numbers include freed-but-kept heap
        pass


def _build(name: str, steps_vocab: int = 1024):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if name == "minilm":
        from lora_fx.hf import load_hf_model, minilm_dir

        return load_hf_model(minilm_dir()).eval(), _VOCAB["minilm"]
    hidden, intermediate, heads = LLAMA_WIDTHS[name]
    cfg = tf.LlamaConfig(
        vocab_size=steps_vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=12,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256, tie_word_embeddings=False,
    )
    return tf.LlamaForCausalLM(cfg).eval(), steps_vocab


def _onnx_linear_bytes(model: Any) -> dict[str, int]:
    """Bytes of each linear site's frozen weight in an ONNX model: the float initializer, or once
    quantized the ``<site>.weight_*`` storage quantize_weights writes."""
    from lora_fx.passes.onnx.find_sites import const_tensor, linear_parts

    import lora_fx

    inits = model.graph.initializers
    out: dict[str, int] = {}
    for site in lora_fx.find_sites(model):
        if site.kind.value != "linear":
            continue
        stored = [v.const_value.nbytes for n, v in inits.items() if n.startswith(f"{site.name}.weight_")]
        weight = const_tensor(linear_parts(site.handle).weight) if not stored else None
        out[site.name] = sum(stored) if stored else (weight.nbytes if weight is not None else 0)
    return out


def export_model(model_name: str, path: str) -> None:
    """The model as a plain ONNX file (what a vendor ships), for the ONNX front end's rows."""
    import torch

    import lora_fx

    model, vocab = _build(model_name)
    example = {"input_ids": torch.randint(1, vocab, (BATCH, SEQ)), "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}
    lora_fx.export_onnx(lora_fx.capture(model, kwargs=example), path, kwargs=example, mode="merged")


def run_one(model_name: str, method: str, steps: int, onnx_path: str | None = None) -> dict[str, Any]:
    """One configuration, in this (fresh) process: the FX front end, or with ``onnx_path`` the ONNX one."""
    import torch

    import lora_fx
    import lora_fx.passes.onnx.find_sites  # noqa: F401  (both front ends start with the same modules loaded)
    from lora_fx.passes.fx.quantize_weights import linear_weight_bytes

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    _trim()
    baseline = _rss_kib("VmRSS")
    vocab = _VOCAB.get(model_name, 1024)
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, vocab, (BATCH, SEQ), generator=gen),
                "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)} for _ in range(2)]
    quant = lora_fx.QuantConfig(**QUANT[method]) if method in QUANT else None
    config = lora_fx.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear")
    torch.manual_seed(0)
    if onnx_path is None:
        model, _ = _build(model_name)
        gm = lora_fx.capture(model, kwargs=batches[0])
        float_bytes = linear_weight_bytes(gm)
        t0 = time.perf_counter()
        gm = lora_fx.apply(gm, config, quant=quant)
        quantize_s = time.perf_counter() - t0
        head = model.get_output_embeddings()
        head_bytes = head.weight.numel() * head.weight.element_size() if head is not None else 0
        frozen_bytes = linear_weight_bytes(gm)
        sites_ratio = (frozen_bytes - head_bytes) / max(1, float_bytes - head_bytes)
        del model, head
    else:
        gm = lora_fx.load(onnx_path)
        before = _onnx_linear_bytes(gm)
        t0 = time.perf_counter()
        lora_fx.apply(gm, config, quant=quant)
        quantize_s = time.perf_counter() - t0
        after = _onnx_linear_bytes(gm)
        float_bytes, frozen_bytes = sum(before.values()), sum(after.values())
        quantized = [n for n in after if after[n] != before[n]]  # the output layer stays float under all-linear
        sites_ratio = sum(after[n] for n in quantized) / sum(before[n] for n in quantized) if quantized else 1.0
    _trim()
    torch.manual_seed(0)
    target = torch.randn(384)

    def loss_fn(out: Any, batch: dict) -> torch.Tensor:
        # Both front ends name the outputs like the model does (export_onnx keeps the names).
        if model_name == "minilm":  # pull the first token's embedding toward a fixed vector
            return (out["last_hidden_state"][:, 0] - target).pow(2).mean()
        logits = out["logits"][:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1))

    times: list[float] = []
    cpu_times: list[float] = []
    last, last_cpu = time.perf_counter(), time.process_time()

    def on_step(step: int, loss: float) -> None:
        nonlocal last, last_cpu
        now, now_cpu = time.perf_counter(), time.process_time()
        times.append(now - last)
        cpu_times.append(now_cpu - last_cpu)
        last, last_cpu = now, now_cpu

    # The peak counter starts here: it sees the training steps only, not the float weights of set-up.
    Path("/proc/self/clear_refs").write_text("5")
    setup_peak = _rss_kib("VmHWM")
    last, last_cpu = time.perf_counter(), time.process_time()
    result = lora_fx.train(gm, batches, loss_fn, steps=steps, lr=2e-3, progress=False, on_step=on_step)
    peak = _rss_kib("VmHWM")
    return {
        "frontend": "fx" if onnx_path is None else "onnx", "model": model_name, "method": method, "steps": result.steps,
        "float_linear_bytes": float_bytes, "frozen_linear_bytes": frozen_bytes,
        # The output layer stays float under "all-linear": the ratio over the quantized sites excludes it.
        "frozen_bytes_ratio_quantized_sites": sites_ratio,
        "baseline_rss_mib": baseline / 1024, "setup_rss_mib": setup_peak / 1024, "peak_rss_mib": peak / 1024,
        "step_seconds_median": statistics.median(times[1:]) if len(times) > 1 else times[0],
        # The process's CPU time (both threads): what the step costs, little moved by other load on the machine.
        "step_cpu_seconds_median": statistics.median(cpu_times[1:]) if len(cpu_times) > 1 else cpu_times[0],
        "loss_first": result.losses[0], "loss_last": result.losses[-1], "quantize_seconds": quantize_s,
    }


def _child(*args: str) -> dict[str, Any] | None:
    cmd = [sys.executable, "-m", "benchmarks.qlora_memory", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.strip().splitlines()
    if args[0] == "--export":
        return None
    if not lines:
        raise RuntimeError(f"{' '.join(args)} printed no result; its stderr ends:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [
        "# QLoRA memory: LoRA fp32 against nf4 / int4 / int8 bases", "",
        f"Batch {BATCH}, sequence {SEQ}, r={RANK} on all linear sites, {rows[0]['steps']} AdamW steps; each row a fresh "
        f"process. Host: {summary['host']}. Peak RSS covers the training steps and includes the interpreter with torch "
        f"loaded (baseline column); 'above baseline' subtracts it. Ratios against LoRA fp32 of the same model and front end. "
        "Front end fx: the transformers model captured with torch.export; onnx: the same model exported to a plain ONNX file "
        "first (outside the measurement), then lora_fx.load, apply and train run on the file.", "",
        "| front end | model | method | frozen linear MiB | bytes ratio (quantized sites) | peak RSS MiB | above baseline MiB | peak ratio | above-baseline ratio | step s (wall) | step CPU s | step ratio (CPU) | loss first | loss last |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['frontend']} | {r['model']} | {r['method']} | {r['frozen_linear_bytes'] / 2**20:.1f} | {r['frozen_bytes_ratio_quantized_sites']:.4f} | "
            f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - r['baseline_rss_mib']:.0f} | {r['peak_ratio']:.3f} | "
            f"{r['above_baseline_ratio']:.3f} | {r['step_seconds_median']:.3f} | {r['step_cpu_seconds_median']:.3f} | {r['step_ratio']:.2f} | "
            f"{r['loss_first']:.4f} | {r['loss_last']:.4f} |"
        )
    lines += ["", "Step ratio: the process's CPU time per step (both threads) against LoRA fp32's; the rows run one after "
              "another, so wall-time ratios would compare different loads of the shared machine. "
              + (f"Each method ran {summary['repeats']} times (in order, then reversed); a row is its fastest run, with the "
                 "largest peak RSS of its runs." if summary["repeats"] > 1 else "Each method ran once."), "",
              f"Decode: {summary['dequantize']}.", "",
              f"Targets (nf4 on {TARGET_MODEL}, where the weights dominate): peak training memory <= 0.5x LoRA fp32; "
              "step time <= 1.5x.", ""]
    for key, value in summary["targets"].items():
        lines.append(f"- {key}: {value}")
    provenance = provenance_lines(summary)
    if provenance:
        lines += [""] + provenance[:-1]
    return "\n".join(lines) + "\n"


def _ratios(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per method (its fastest run, its largest peak), with ratios against LoRA fp32's row."""
    rows = []
    base = None
    for method in METHODS:
        row = min(runs[method], key=lambda r: r["step_cpu_seconds_median"])
        row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs[method])
        row["step_cpu_seconds_runs"] = [r["step_cpu_seconds_median"] for r in runs[method]]
        base = base or row
        row["peak_ratio"] = row["peak_rss_mib"] / base["peak_rss_mib"]
        row["above_baseline_ratio"] = (row["peak_rss_mib"] - row["baseline_rss_mib"]) / (base["peak_rss_mib"] - base["baseline_rss_mib"])
        # CPU time: the rows run one after another, so wall-time ratios compare different loads.
        row["step_ratio"] = row["step_cpu_seconds_median"] / base["step_cpu_seconds_median"]
        row["step_wall_ratio"] = row["step_seconds_median"] / base["step_seconds_median"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--onnx", metavar="PATH", help=argparse.SUPPRESS)  # with --one: the ONNX front end
    parser.add_argument("--export", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--repeats", type=int, default=2, help="runs per method, alternating order; the fastest counts")
    parser.add_argument("--frontends", default=",".join(FRONTENDS), help="fx, onnx or both (default fx,onnx)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: MiniLM only, 2 steps, one run per method; printed, not saved unless --out is given")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for qlora_memory.json and .md (default: benchmarks/results; --quick: none)")
    args = parser.parse_args(argv)
    if args.export:
        export_model(*args.export)
        return 0
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.steps, args.onnx)))
        return 0
    frontends = [f.strip() for f in args.frontends.split(",") if f.strip()]
    unknown = sorted(set(frontends) - set(FRONTENDS))
    if unknown or not frontends:
        parser.error(f"--frontends: unknown {unknown or frontends}; choose from {', '.join(FRONTENDS)}")
    models = ("minilm",) if args.quick else MODELS
    steps = 2 if args.quick else args.steps
    if args.quick:
        args.repeats = 1
    if args.repeats < 1 or steps < 1:
        parser.error("--repeats and --steps must be at least 1")
    out_dir = args.out if args.out is not None else (None if args.quick else RESULTS)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="qlora_memory_") as tmp:
        for frontend in frontends:
            for model_name in models:
                extra: list[str] = []
                if frontend == "onnx":
                    path = str(Path(tmp) / f"{model_name}.onnx")
                    log(f"exporting {model_name} to ONNX")
                    _child("--export", model_name, path)
                    extra = ["--onnx", path]
                # Every method runs `repeats` times, in order and then in reverse (A B C D D C B A), so a slow
                # spell of the shared machine lands on different methods; each method keeps its fastest run's
                # step time and its largest peak memory.
                runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
                for rep in range(args.repeats):
                    for method in (METHODS if rep % 2 == 0 else METHODS[::-1]):
                        log(f"{frontend} {model_name} {method} (run {rep + 1}/{args.repeats})")
                        runs[method].append(_child("--one", model_name, method, "--steps", str(steps), *extra))
                rows += _ratios(runs)
    targets: dict[str, Any] = {}
    for frontend in frontends:
        for name in LLAMA_WIDTHS:
            llama = {r["method"]: r for r in rows if r["model"] == name and r["frontend"] == frontend}
            if llama:
                mark = " (the target model)" if name == TARGET_MODEL else ""
                targets[f"{frontend} {name} nf4 peak RSS ratio (<= 0.5){mark}"] = round(llama["nf4"]["peak_ratio"], 3)
                targets[f"{frontend} {name} nf4 peak RSS above baseline ratio"] = round(llama["nf4"]["above_baseline_ratio"], 3)
                targets[f"{frontend} {name} nf4 step time ratio (<= 1.5){mark}"] = round(llama["nf4"]["step_ratio"], 3)
    from lora_fx.kernels.dequant import native_status

    summary = {"host": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads 2", "targets": targets, "repeats": args.repeats,
               "dequantize": native_status(),
               "batch": BATCH, "seq": SEQ, "steps": steps, "rank": RANK, "frontends": frontends,
               "quick": args.quick, "env": environment()}
    result = {"summary": summary, "rows": rows}
    print(write_results(out_dir, "qlora_memory", result, render) if out_dir is not None else render(result))
    return 0


def render(result: dict[str, Any]) -> str:
    """The Markdown of a saved result (``{"summary", "rows"}``)."""
    return markdown(result["rows"], result["summary"])


if __name__ == "__main__":
    raise SystemExit(main())
