"""ONNX Runtime inference: merged and adapter-slot models against the plain exported base, MiniLM.

``python -m benchmarks.ort_inference`` (``--rounds N``, ``--threads N``, ``--quick`` for a smoke run).
The bundled all-MiniLM-L6-v2 is captured with ``lora_fx.capture``; the base is exported with
``lora_fx.export_onnx``; the LoRA model (r=8 on all linear layers, non-zero adapters) is exported once
and written as: merged (adapters folded, ``fold_lora``); with adapter slots as ``export_onnx`` writes
them (``serve_slots``: expose, hoist, optimize, ``fuse_lora_add``); and two ablations of the slot model,
without ``fuse_lora_add`` (MatMul, MatMul, Add per site) and without either (the contract order). Plus
two ``.onnx_adapter`` files. Prefix-tuning with T = 8, 32, 128 virtual tokens (random prefixes) is
exported with ``mode="adapters"`` too and served with its prefix active. Sequence 128, batch 1 and 8,
ONNX Runtime with 1 intra-op thread timed by its CPU time (``--threads 2 --clock wall`` for elapsed
time on both cores).

Measured in one process in rounds: each round calls every variant once, in a rotating order, and
each variant's time is divided by the base's time in the same round, so the load other tenants put
on the shared machine (it swings timings by +-30% from call to call here) hits both sides of a ratio
alike. Reported: the median of those per-round ratios with its interquartile range (quartiles interpolated
between the sorted ratios), and the median milliseconds per call:

- merged / base (target <= 1.02), adapter-slot with an adapter active / base (target <= 1.05),
- switching between two adapters every call / the same adapter every call (target <= 1.05),
- a new session per adapter (create + add_adapter + run) / switching on one session (a factor),
- prefix-tuning slot with its prefix active / base, for each T (beside LoRA's slot/base above).

The CUDA execution provider with IOBinding runs where a CUDA GPU is present; otherwise it is skipped
and the results say so. Results: ``benchmarks/results/ort_inference.json`` and ``ort_inference.md`` (``--out DIR``
elsewhere), with the machine and package versions; ``--quick`` writes nothing unless ``--out`` is given.
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

from benchmarks._shared import environment, log, paired_ratios, provenance_lines, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
SEQ, RANK, ALPHA = 128, 8, 16
BATCHES = (1, 8)
PREFIX_LENGTHS = (8, 32, 128)
TARGETS = {"merged/base": 1.02, "slot/base": 1.05, "switch/same": 1.05}
# One intra-op thread timed by its CPU time: on this shared 2-core machine wall time per call swings by
# +-30% with other tenants' load, while one thread's CPU time stays within a few percent.
THREADS = 1


def build_models(out: Path, prefix_lengths: tuple[int, ...] = PREFIX_LENGTHS) -> dict[str, Any]:
    """base.onnx, merged.onnx, served.onnx + adapters a/b (same rank, different weights), the ablations,
    and prefix<T>.onnx with prefix<T>.adapters/default.onnx_adapter."""
    import onnx_ir as ir

    import lora_fx
    from lora_fx.export import optimize_keeping_slots, save_model, to_onnx_ir
    from lora_fx.hf import load_hf_model, minilm_dir
    from lora_fx.onnx_adapter import current_adapter, stamp_fingerprint, write_onnx_adapter
    from lora_fx.passes.fx.capture import meta
    from lora_fx.passes.onnx.expose_adapters import expose_adapters
    from lora_fx.passes.onnx.fold_lora import fold_lora
    from lora_fx.passes.onnx.fuse_lora_add import fuse_lora_add
    from lora_fx.passes.onnx.hoist_lora_add import hoist_lora_add
    from lora_fx.passes.onnx.normalize_lora import normalize_lora

    model = load_hf_model(minilm_dir())
    example = {"input_ids": torch.randint(1, 1000, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    log("exporting the base, the LoRA model (merged, with slots, two ablations) and the prefix models to ONNX")
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
    # Ablations: the contract order (LoRA Add after the bias Add) shows what hoist_lora_add buys,
    # the hoisted model before fuse_lora_add what the fusion buys. All three carry the same fingerprint.
    contract = ir.from_proto(ir.to_proto(lora))
    optimize_keeping_slots(contract)
    stamp_fingerprint(contract)  # the fingerprint is of the weights as stored, after constant folding
    save_model(contract, out / "served_contract_order.onnx")
    hoist_lora_add(lora)
    optimize_keeping_slots(lora)  # = lora_fx.export.serve_slots from here on
    adapter.fingerprint = stamp_fingerprint(lora)
    save_model(lora, out / "served_matmul_add.onnx")
    fuse_lora_add(lora)
    save_model(lora, out / "served.onnx")
    write_onnx_adapter(out / "a.onnx_adapter", adapter)
    rng = np.random.default_rng(1)
    other = copy.deepcopy(adapter)
    other.tensors = {k: (v + rng.standard_normal(v.shape).astype(v.dtype) * 0.01) for k, v in adapter.tensors.items()}
    write_onnx_adapter(out / "b.onnx_adapter", other)
    log(f"LoRA model exported merged + slots ({time.perf_counter() - t:.0f} s), {len(meta(gm)['lora_sites'])} sites")
    for length in prefix_lengths:
        t = time.perf_counter()
        pm = lora_fx.capture(model, kwargs=example)
        torch.manual_seed(length)
        lora_fx.apply(pm, lora_fx.PrefixConfig(num_virtual_tokens=length))  # random prefixes, as PEFT initializes them
        lora_fx.export_onnx(pm, out / f"prefix{length}.onnx", kwargs=example, mode="adapters", peft_dir=False)
        log(f"prefix T={length} exported with slots ({time.perf_counter() - t:.0f} s)")
    return {"sites": len(meta(gm)["lora_sites"])}


def session_options(threads: int = THREADS) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # Each session has its own pool; spinning workers of the session that ran last would take cores from the next one.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def measure(out: Path, batch: int, rounds: int, providers: list[str], threads: int, clock: str = "wall",
            prefix_lengths: tuple[int, ...] = PREFIX_LENGTHS) -> dict[str, Any]:
    import onnxruntime as ort

    from lora_fx.runtime import Session

    rng = np.random.default_rng(batch)
    feeds = {"input_ids": rng.integers(1, 1000, (batch, SEQ)).astype(np.int64), "attention_mask": np.ones((batch, SEQ), np.int64)}
    plain = {name: ort.InferenceSession(str(out / f"{name}.onnx"), session_options(threads), providers=providers) for name in ("base", "merged")}
    served = {}
    for name in ("served", "served_matmul_add", "served_contract_order"):
        served[name] = Session(out / f"{name}.onnx", providers=providers, session_options=session_options(threads))
        served[name].add_adapter("a", out / "a.onnx_adapter")
    served["served"].add_adapter("b", out / "b.onnx_adapter")
    for length in prefix_lengths:
        name = f"prefix{length}"
        served[name] = Session(out / f"{name}.onnx", providers=providers, session_options=session_options(threads))
        served[name].add_adapter("p", out / f"{name}.adapters" / "default.onnx_adapter")
    slot = served["served"]
    on_cuda = slot.on_cuda

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
        "slot, no adapter": lambda _: slot.run(feeds),
        "slot, same adapter": lambda _: slot.run(feeds, adapter="a"),
        "slot, switching a/b": lambda i: slot.run(feeds, adapter="ab"[i % 2]),
        "slot unfused, same adapter": lambda _: served["served_matmul_add"].run(feeds, adapter="a"),
        "slot unhoisted, same adapter": lambda _: served["served_contract_order"].run(feeds, adapter="a"),
        **{f"prefix T={n}": (lambda _, s=served[f"prefix{n}"]: s.run(feeds, adapter="p")) for n in prefix_lengths},
    }
    names = list(variants)
    # "cpu": the calling thread's CPU time, which is all of ORT's work at 1 intra-op thread and which
    # other processes on the machine do not inflate the way they inflate wall time.
    now = time.thread_time if clock == "cpu" else time.perf_counter
    for fn in variants.values():  # warm-up: first runs allocate
        fn(0), fn(1)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(rounds):
        k = i % len(names)
        order = names[k:] + names[:k]
        for name in (order if i % 2 == 0 else order[::-1]):
            t = now()
            variants[name](i)
            times[name].append(now() - t)
        if rounds >= 10 and (i + 1) % (rounds // 5) == 0:
            log(f"  round {i + 1}/{rounds}")

    def ratio(num: str, den: str) -> dict[str, Any]:
        return paired_ratios(times[num], times[den])

    def new_session_per_adapter(i: int) -> Any:
        sess = Session(out / "served.onnx", providers=providers, session_options=session_options(threads))
        sess.add_adapter("x", out / ("a.onnx_adapter" if i % 2 else "b.onnx_adapter"))
        return sess.run(feeds, adapter="x")

    new_session, switching = [], []
    for i in range(4):
        for fn, store in ((new_session_per_adapter, new_session), (variants["slot, switching a/b"], switching)):
            t = time.perf_counter()
            fn(i)
            store.append(time.perf_counter() - t)
    # Outputs agree: merged vs slot with adapter a (the same adapter, two deployments).
    if on_cuda:
        check = None
    else:
        m = plain["merged"].run(None, feeds)[0]
        s = slot.run(feeds, adapter="a")[0]
        check = float(np.abs(m - s).max() / np.abs(m).max())
    return {
        "batch": batch, "seq": SEQ, "provider": slot.providers[0], "threads": threads, "clock": clock,
        "median_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
        "new_session_per_adapter_ms": statistics.median(new_session) * 1e3,
        "ratios": {
            "merged/base": ratio("merged", "base"),
            "slot/base": ratio("slot, same adapter", "base"),
            "slot no adapter/base": ratio("slot, no adapter", "base"),
            "slot unfused/base": ratio("slot unfused, same adapter", "base"),
            "slot unhoisted/base": ratio("slot unhoisted, same adapter", "base"),
            "switch/same": ratio("slot, switching a/b", "slot, same adapter"),
            "new session/switch": {"median": statistics.median(new_session) / statistics.median(switching)},
            **{f"prefix T={n}/base": ratio(f"prefix T={n}", "base") for n in prefix_lengths},
        },
        "merged_vs_slot_max_rel": check,
        "rounds": rounds,
        "all_s": times,
    }


def markdown(result: dict[str, Any]) -> str:
    runs = result["runs"]
    rounds = ", ".join(f"batch {r['batch']}: {r['rounds']} rounds" for r in runs)
    lines = [
        "# ONNX Runtime inference: merged and adapter slots vs the plain base (all-MiniLM-L6-v2)",
        "",
        f"LoRA r={RANK} on all {result['sites']} linear layers, sequence {SEQ}, {runs[0]['threads']} intra-op thread(s), "
        f"{'CPU time of the calling thread' if runs[0].get('clock') == 'cpu' else 'wall time'} per call. "
        f"Rounds of one call per variant, rotating order; ratios are medians of per-round ratios [interquartile range] "
        f"({rounds}). "
        f"Machine: {result['machine']}, load average at the end {result.get('load_average_at_end')}. onnxruntime {result['onnxruntime']}.",
        "",
        "| provider | batch | base ms | merged ms | slot (no adapter) ms | slot (adapter) ms | slot unfused ms | slot unhoisted ms | switching ms | new session per adapter ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        m = r["median_ms"]
        lines.append(f"| {r['provider']} | {r['batch']} | {m['base']:.2f} | {m['merged']:.2f} | {m['slot, no adapter']:.2f} | "
                     f"{m['slot, same adapter']:.2f} | {m['slot unfused, same adapter']:.2f} | {m['slot unhoisted, same adapter']:.2f} | "
                     f"{m['slot, switching a/b']:.2f} | {r['new_session_per_adapter_ms']:.1f} |")
    lines += ["", "| provider | batch | merged/base (≤1.02) | slot/base (≤1.05) | slot no adapter/base | slot unfused/base | slot unhoisted/base | switch/same (≤1.05) | new session / switch |",
              "|---|---|---|---|---|---|---|---|---|"]

    def cell(q: dict[str, Any], key: str) -> str:
        v = q[key]
        text = f"{v['median']:.3f} [{v['q1']:.2f}–{v['q3']:.2f}]"
        return f"{text} {'✓' if v['median'] <= TARGETS[key] else '✗'}" if key in TARGETS else text

    for r in runs:
        q = r["ratios"]
        lines.append(f"| {r['provider']} | {r['batch']} | {cell(q, 'merged/base')} | {cell(q, 'slot/base')} | {cell(q, 'slot no adapter/base')} | "
                     f"{cell(q, 'slot unfused/base')} | {cell(q, 'slot unhoisted/base')} | {cell(q, 'switch/same')} | {q['new session/switch']['median']:.0f}x |")
    lengths = [int(k.split("=")[1].split("/")[0]) for k in runs[0]["ratios"] if k.startswith("prefix T=")]
    if lengths:
        lines += ["", "Prefix-tuning, served with its prefix active (adapter slots), against the base and beside LoRA r=8 (all linear layers):", "",
                  "| provider | batch | LoRA slot/base | " + " | ".join(f"prefix T={n}/base" for n in lengths) + " | "
                  + " | ".join(f"prefix T={n} ms" for n in lengths) + " |",
                  "|---|---|---|" + "---|" * (2 * len(lengths))]
        for r in runs:
            q, m = r["ratios"], r["median_ms"]
            lines.append(f"| {r['provider']} | {r['batch']} | {cell(q, 'slot/base')} | "
                         + " | ".join(cell(q, f"prefix T={n}/base") for n in lengths) + " | "
                         + " | ".join(f"{m[f'prefix T={n}']:.2f}" for n in lengths) + " |")
    lines += ["", f"CUDA: {result['cuda']}", ""]
    lines += provenance_lines(result)
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=150, help="rounds at batch 1 (batch 8: a fifth, at least 10; CUDA: as many)")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"ONNX Runtime intra-op threads (default {THREADS})")
    parser.add_argument("--clock", choices=("wall", "cpu"), default=None,
                        help="wall: elapsed time per call; cpu: the calling thread's CPU time (needs --threads 1), "
                             "steadier when other work shares the machine; the default with --threads 1, else wall")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (about a minute): 4 rounds, batch 1, prefix T=8 only; printed, not saved unless --out is given")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for ort_inference.json and .md (default: benchmarks/results; --quick: none)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1")
    if args.clock is None:
        args.clock = "cpu" if args.threads == 1 else "wall"
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures the calling thread only; use it with --threads 1")
    if args.quick:
        args.rounds = 4
    out_dir = args.out if args.out is not None else (None if args.quick else RESULTS)
    with tempfile.TemporaryDirectory(prefix="lora_fx_ort_bench_") as tmp:
        out = Path(tmp)
        lengths = PREFIX_LENGTHS[:1] if args.quick else PREFIX_LENGTHS
        info = build_models(out, lengths)
        runs = []
        for batch in (BATCHES[:1] if args.quick else BATCHES):
            rounds = args.rounds if batch == 1 else max(10, args.rounds // 5)
            log(f"CPU batch {batch}: {rounds} rounds")
            runs.append(measure(out, batch, rounds, ["CPUExecutionProvider"], args.threads, args.clock, lengths))
            log(json.dumps({k: round(v["median"], 3) for k, v in runs[-1]["ratios"].items()}))
        cuda = "skipped: no CUDA GPU on this machine (CUDAExecutionProvider did not load)"
        if "CUDAExecutionProvider" in ort.get_available_providers():
            from lora_fx.runtime import Session

            if Session(out / "base.onnx").on_cuda:
                for batch in BATCHES:
                    log(f"CUDA batch {batch}")
                    runs.append(measure(out, batch, args.rounds, ["CUDAExecutionProvider", "CPUExecutionProvider"], args.threads,
                                        prefix_lengths=lengths))
                cuda = "measured with IOBinding (adapter tensors device-resident)"
        if cuda.startswith("skipped"):
            log(cuda)
    result = {
        "benchmark": "ort_inference", "model": "all-MiniLM-L6-v2", "rank": RANK, "sites": info["sites"], "runs": runs,
        "targets": TARGETS, "cuda": cuda, "onnxruntime": ort.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)", "date": time.strftime("%Y-%m-%d %H:%M"),
        "quick": args.quick, "env": environment(),
        # Other work on the shared machine inflates every timing; the ratios are paired per round, the load is recorded.
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "notes": [],
    }
    if out_dir is not None:
        print(write_results(out_dir, "ort_inference", result, markdown))
    else:
        print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
