"""ONNX Runtime inference: merged and adapter-slot models against the plain exported base, MiniLM.

``python -m benchmarks.ort_inference`` (``--reps N``, ``--quick`` for a smoke run).
The bundled all-MiniLM-L6-v2 is captured with ``lora_fx.capture``; the base is exported with
``lora_fx.export_onnx``; the LoRA model (r=8 on all linear layers, non-zero adapters) is exported once
and written twice: merged (adapters folded, ``fold_lora``) and with adapter slots (``expose_adapters``)
plus two ``.onnx_adapter`` files. Sequence 128, batch 1 and 8, ONNX Runtime with 2 intra-op threads.

Measured in one process, the variants interleaved every repetition (the order alternates, so other
load on the shared machine hits all alike); per variant the median wall time per call:

- merged / base (target <= 1.02), adapter-slot with an adapter active / base (target <= 1.05),
- switching between two adapters every call / the same adapter every call (target <= 1.05),
- a new session per adapter (create + add_adapter + run) / switching on one session (a factor).

The CUDA execution provider with IOBinding runs where a CUDA GPU is present; otherwise it is skipped
and the results say so. Results: ``benchmarks/results/ort_inference.json`` and ``ort_inference.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
SEQ, RANK, ALPHA = 128, 8, 16
BATCHES = (1, 8)
TARGETS = {"merged/base": 1.02, "slot/base": 1.05, "switch/same": 1.05}
THREADS = 2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_models(out: Path) -> dict[str, Any]:
    """base.onnx, merged.onnx, served.onnx + adapters a/b (same rank, different weights)."""
    import onnx_ir as ir

    import lora_fx
    from lora_fx.export import optimize_keeping_slots, save_model, to_onnx_ir
    from lora_fx.hf import load_hf_model, minilm_dir
    from lora_fx.onnx_adapter import current_adapter, stamp_fingerprint, write_onnx_adapter
    from lora_fx.passes.fx.capture import meta
    from lora_fx.passes.onnx.expose_adapters import expose_adapters
    from lora_fx.passes.onnx.fold_lora import fold_lora
    from lora_fx.passes.onnx.hoist_lora_add import hoist_lora_add
    from lora_fx.passes.onnx.normalize_lora import normalize_lora

    model = load_hf_model(minilm_dir())
    example = {"input_ids": torch.randint(1, 1000, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    t = time.perf_counter()
    lora_fx.export_onnx(lora_fx.capture(model, kwargs=example), out / "base.onnx", kwargs=example, mode="merged")
    log(f"base exported ({time.perf_counter() - t:.0f} s)")
    gm = lora_fx.capture(model, kwargs=example)
    torch.manual_seed(0)
    gm = lora_fx.apply(gm, lora_fx.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights="gaussian"))
    with torch.no_grad():
        for site in meta(gm)["lora_sites"]:
            b = gm.get_submodule(site).lora_B.weight
            b.copy_(torch.randn(b.shape) * 0.02)
    t = time.perf_counter()
    # One export serves both outputs (the same steps export_onnx runs for each mode).
    lora = to_onnx_ir(gm, example)
    normalize_lora(lora, meta(gm)["lora_sites"], meta(gm)["adapters"]["default"])
    merged = ir.from_proto(ir.to_proto(lora))  # deepcopy fails on the exporter's node metadata
    fold_lora(merged)
    save_model(optimize_keeping_slots(merged), out / "merged.onnx")
    adapter = current_adapter(lora)
    expose_adapters(lora)
    # The contract order (LoRA Add after the bias Add), kept to show what hoist_lora_add buys.
    contract = ir.from_proto(ir.to_proto(lora))
    optimize_keeping_slots(contract)
    stamp_fingerprint(contract)  # the fingerprint is of the weights as stored, after constant folding
    save_model(contract, out / "served_contract_order.onnx")
    hoist_lora_add(lora)
    optimize_keeping_slots(lora)
    adapter.fingerprint = stamp_fingerprint(lora)
    save_model(lora, out / "served.onnx")
    write_onnx_adapter(out / "a.onnx_adapter", adapter)
    rng = np.random.default_rng(1)
    other = copy.deepcopy(adapter)
    other.tensors = {k: (v + rng.standard_normal(v.shape).astype(v.dtype) * 0.01) for k, v in adapter.tensors.items()}
    write_onnx_adapter(out / "b.onnx_adapter", other)
    log(f"LoRA model exported merged + slots ({time.perf_counter() - t:.0f} s), {len(meta(gm)['lora_sites'])} sites")
    return {"sites": len(meta(gm)["lora_sites"])}


def session_options() -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


def time_calls(fn: Callable[[int], Any], n: int) -> float:
    """Median seconds per call over n calls (after one warm-up)."""
    fn(0)
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(out: Path, batch: int, reps: int, calls: int, providers: list[str]) -> dict[str, Any]:
    import onnxruntime as ort

    from lora_fx.runtime import Session

    rng = np.random.default_rng(batch)
    feeds = {"input_ids": rng.integers(1, 1000, (batch, SEQ)).astype(np.int64), "attention_mask": np.ones((batch, SEQ), np.int64)}
    plain = {name: ort.InferenceSession(str(out / f"{name}.onnx"), session_options(), providers=providers) for name in ("base", "merged")}
    served = Session(out / "served.onnx", providers=providers, session_options=session_options())
    served.add_adapter("a", out / "a.onnx_adapter")
    served.add_adapter("b", out / "b.onnx_adapter")
    contract = Session(out / "served_contract_order.onnx", providers=providers, session_options=session_options())
    contract.add_adapter("a", out / "a.onnx_adapter")
    on_cuda = served.on_cuda

    def run_plain(name: str) -> Callable[[int], Any]:
        sess = plain[name]
        if on_cuda:
            def call(_: int) -> Any:
                binding = sess.io_binding()
                for k, v in feeds.items():
                    binding.bind_cpu_input(k, v)
                binding.bind_output(sess.get_outputs()[0].name, "cuda")
                sess.run_with_iobinding(binding)
                return binding
            return call
        return lambda _: sess.run(None, feeds)

    variants: dict[str, Callable[[int], Any]] = {
        "base": run_plain("base"),
        "merged": run_plain("merged"),
        "slot, no adapter": lambda _: served.run(feeds),
        "slot, same adapter": lambda _: served.run(feeds, adapter="a"),
        "slot, switching a/b": lambda i: served.run(feeds, adapter="ab"[i % 2]),
        "slot unhoisted, same adapter": lambda _: contract.run(feeds, adapter="a"),
    }
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(reps):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for name in order:
            samples[name].append(time_calls(variants[name], calls))
    med = {k: statistics.median(v) for k, v in samples.items()}

    def new_session_per_adapter(i: int) -> Any:
        sess = Session(out / "served.onnx", providers=providers, session_options=session_options())
        sess.add_adapter("x", out / ("a.onnx_adapter" if i % 2 else "b.onnx_adapter"))
        return sess.run(feeds, adapter="x")

    new_session = statistics.median(time_calls(new_session_per_adapter, 3) for _ in range(max(1, reps // 2)))
    # Outputs agree: merged vs slot with adapter a (the same adapter, two deployments).
    if on_cuda:
        check = None
    else:
        m = plain["merged"].run(None, feeds)[0]
        s = served.run(feeds, adapter="a")[0]
        check = float(np.abs(m - s).max() / np.abs(m).max())
    return {
        "batch": batch, "seq": SEQ, "provider": served.providers[0],
        "median_ms": {k: v * 1e3 for k, v in med.items()},
        "new_session_per_adapter_ms": new_session * 1e3,
        "ratios": {
            "merged/base": med["merged"] / med["base"],
            "slot/base": med["slot, same adapter"] / med["base"],
            "slot no adapter/base": med["slot, no adapter"] / med["base"],
            "slot unhoisted/base": med["slot unhoisted, same adapter"] / med["base"],
            "switch/same": med["slot, switching a/b"] / med["slot, same adapter"],
            "new session/switch": new_session / med["slot, switching a/b"],
        },
        "merged_vs_slot_max_rel": check,
        "reps": reps, "calls_per_rep": calls,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# ONNX Runtime inference: merged and adapter slots vs the plain base (all-MiniLM-L6-v2)",
        "",
        f"LoRA r={RANK} on all {result['sites']} linear layers, sequence {SEQ}, {THREADS} intra-op threads. "
        f"Medians of interleaved repetitions ({result['runs'][0]['reps']} repetitions; calls per repetition in the JSON). "
        f"Machine: {result['machine']}, load average at the end {result.get('load_average_at_end')}. onnxruntime {result['onnxruntime']}.",
        "",
        "| provider | batch | base ms | merged ms | slot (no adapter) ms | slot (adapter) ms | slot unhoisted (adapter) ms | switching ms | new session per adapter ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        m = r["median_ms"]
        lines.append(f"| {r['provider']} | {r['batch']} | {m['base']:.2f} | {m['merged']:.2f} | {m['slot, no adapter']:.2f} | "
                     f"{m['slot, same adapter']:.2f} | {m['slot unhoisted, same adapter']:.2f} | {m['slot, switching a/b']:.2f} | {r['new_session_per_adapter_ms']:.1f} |")
    lines += ["", "| provider | batch | merged/base (≤1.02) | slot/base (≤1.05) | slot no adapter/base | slot unhoisted/base | switch/same (≤1.05) | new session / switch |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        q = r["ratios"]
        mark = lambda key: f"{q[key]:.3f} {'✓' if q[key] <= TARGETS[key] else '✗'}"  # noqa: E731
        lines.append(f"| {r['provider']} | {r['batch']} | {mark('merged/base')} | {mark('slot/base')} | {q['slot no adapter/base']:.3f} | "
                     f"{q['slot unhoisted/base']:.3f} | {mark('switch/same')} | {q['new session/switch']:.0f}x |")
    lines += ["", f"CUDA: {result['cuda']}", ""]
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--calls", type=int, default=12, help="calls per repetition at batch 1 (batch 8: a sixth)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 repetitions of 3 calls, batch 1, not saved")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.calls = 2, 3
    with tempfile.TemporaryDirectory(prefix="lora_fx_ort_bench_") as tmp:
        out = Path(tmp)
        info = build_models(out)
        runs = []
        for batch in (BATCHES[:1] if args.quick else BATCHES):
            log(f"CPU batch {batch}")
            calls = args.calls if batch == 1 else max(2, args.calls // 6)
            runs.append(measure(out, batch, args.reps, calls, ["CPUExecutionProvider"]))
            log(json.dumps(runs[-1]["ratios"]))
        cuda = "skipped: no CUDA GPU on this machine (CUDAExecutionProvider did not load)"
        if "CUDAExecutionProvider" in ort.get_available_providers():
            from lora_fx.runtime import Session

            if Session(out / "base.onnx").on_cuda:
                for batch in BATCHES:
                    log(f"CUDA batch {batch}")
                    runs.append(measure(out, batch, args.reps, args.calls * 4, ["CUDAExecutionProvider", "CPUExecutionProvider"]))
                cuda = "measured with IOBinding (adapter tensors device-resident)"
        if cuda.startswith("skipped"):
            log(cuda)
    result = {
        "benchmark": "ort_inference", "model": "all-MiniLM-L6-v2", "rank": RANK, "sites": info["sites"], "runs": runs,
        "targets": TARGETS, "cuda": cuda, "onnxruntime": ort.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)", "date": time.strftime("%Y-%m-%d %H:%M"),
        # Other work on the shared machine inflates every timing; the ratios are interleaved, the load is recorded.
        "load_average_at_end": list(os.getloadavg()),
        "notes": [],
    }
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "ort_inference.json").write_text(json.dumps(result, indent=2))
        (RESULTS / "ort_inference.md").write_text(markdown(result))
        log(f"wrote {RESULTS / 'ort_inference.md'}")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
