"""Prefix-tuning against LoRA and the base model on the bundled all-MiniLM-L6-v2.

``python -m benchmarks.prefix_overhead`` (``--reps N``, ``--quick`` for a smoke run). For prefix
lengths T = 8, 32, 128, LoRA r=8 on query/value, and the unadapted base:

* trainable parameters;
* one training step (forward + backward + AdamW on the adapter parameters), batch 8, sequence 64:
  lora_fx's rewritten graph, and PEFT's prefix-tuning with the same T as the peer (ratio reported);
* ONNX Runtime (CPU) latency of the exported model, batch 1, sequence 64, with the adapters as
  swappable slots (``export_onnx(..., mode="adapters")``; the base model exported plain), and the
  overhead against the base.

Timing: all variants run in one process from the same weights, interleaved (the order rotates
every repetition so drift and other load on the shared machine hit all alike); medians reported.
Results go to ``benchmarks/results/prefix_overhead.json`` and ``prefix_overhead.md``.
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

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, SEQ, RANK, ALPHA = 8, 64, 8, 16
PREFIX_LENGTHS = (8, 32, 128)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_minilm() -> torch.nn.Module:
    from lora_fx.hf import load_hf_model, minilm_dir

    # eval(): dropout off for every variant (lora_fx captures in eval mode), so all do the same arithmetic.
    return load_hf_model(minilm_dir()).eval()


def batch(b: int, s: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (b, s), generator=gen)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[-1, s - s // 4:] = 0  # some padding, as real batches have
    return {"input_ids": ids, "attention_mask": mask}


def _hidden(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "keys") and "last_hidden_state" in out:
        return out["last_hidden_state"]
    return out[0]


def step_fn(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> tuple[Callable[[], None], int]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    target = torch.zeros(BATCH, 384)

    def step() -> None:
        h = _hidden(model(**data))
        loss = torch.nn.functional.mse_loss(h[:, 0], target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in params)


def build_variants(base: torch.nn.Module, quick: bool) -> dict[str, dict[str, Any]]:
    import peft

    import lora_fx

    example = batch(2, 16)
    variants: dict[str, dict[str, Any]] = {}
    lengths = PREFIX_LENGTHS[:1] if quick else PREFIX_LENGTHS
    log("capturing base")
    variants["base"] = {"gm": lora_fx.capture(copy.deepcopy(base), kwargs=example)}
    log("LoRA r=8")
    gm = lora_fx.capture(copy.deepcopy(base), kwargs=example)
    variants[f"lora_r{RANK}"] = {"gm": lora_fx.apply(gm, lora_fx.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["query", "value"]))}
    for t in lengths:
        log(f"prefix T={t}")
        gm = lora_fx.capture(copy.deepcopy(base), kwargs=example)
        variants[f"prefix_T{t}"] = {
            "gm": lora_fx.apply(gm, lora_fx.PrefixConfig(num_virtual_tokens=t)),
            "peft": peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=t)),
            "T": t,
        }
    return variants


def time_interleaved(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 2) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def ort_sessions(variants: dict[str, dict[str, Any]], workdir: Path) -> dict[str, Any]:
    import onnxruntime as ort

    from lora_fx.export import export_onnx, to_onnx_ir
    from lora_fx.onnx_model import save

    example = batch(2, 16)
    sessions = {}
    for name, v in variants.items():
        log(f"export {name}")
        path = workdir / f"{name}.onnx"
        if name == "base":
            save(to_onnx_ir(v["gm"], example), path)
        else:
            export_onnx(v["gm"], path, kwargs=example, mode="adapters", peft_dir=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sessions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="smoke run: T=8 only, 2 repetitions")
    args = parser.parse_args(argv)
    reps = 2 if args.quick else args.reps
    torch.manual_seed(0)
    torch.set_num_threads(2)
    base = load_minilm()
    variants = build_variants(base, args.quick)
    data = batch(BATCH, SEQ, seed=1)

    # ---- training steps ----
    steps: dict[str, Callable[[], None]] = {}
    params: dict[str, int] = {}
    for name, v in variants.items():
        if name == "base":
            continue
        steps[name], params[name] = step_fn(v["gm"], data)
        if "peft" in v:
            steps[f"peft_{name}"], params[f"peft_{name}"] = step_fn(v["peft"], data)
    log(f"timing {len(steps)} training steps x {reps}")
    step_times = time_interleaved(steps, reps)

    # ---- ORT latency ----
    with tempfile.TemporaryDirectory() as tmp:
        sessions = ort_sessions(variants, Path(tmp))
        one = batch(1, SEQ, seed=2)
        feeds = {k: v.numpy() for k, v in one.items()}
        runs = {name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()}
        log(f"timing ORT x {reps * 5}")
        latency = time_interleaved(runs, reps * 5, warmup=3)

    rows = []
    for name, v in variants.items():
        row: dict[str, Any] = {
            "variant": name,
            "trainable_parameters": params.get(name, 0),
            "step_s": step_times.get(name),
            "ort_latency_ms": latency[name] * 1e3,
            "ort_overhead_vs_base": latency[name] / latency["base"],
        }
        if "peft" in v:
            row["peft_step_s"] = step_times[f"peft_{name}"]
            row["step_ratio_vs_peft"] = step_times[name] / step_times[f"peft_{name}"]
            row["peft_trainable_parameters"] = params[f"peft_{name}"]
        rows.append(row)
    out = {
        "benchmark": "prefix_overhead",
        "model": "all-MiniLM-L6-v2 (bundled)",
        "train_batch": [BATCH, SEQ], "ort_batch": [1, SEQ], "reps": reps, "quick": args.quick,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "prefix_overhead_quick" if args.quick else "prefix_overhead"
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=2))
    (RESULTS / f"{stem}.md").write_text(markdown(out))
    print(markdown(out))
    return 0


def markdown(out: dict[str, Any]) -> str:
    lines = [
        f"# Prefix-tuning overhead ({out['model']})",
        "",
        f"Training step: batch {out['train_batch'][0]} x seq {out['train_batch'][1]} (forward + backward + AdamW), "
        f"ORT CPU latency: batch 1 x seq {out['ort_batch'][1]}; medians of {out['reps']} interleaved repetitions"
        + (" (quick smoke run)" if out["quick"] else "") + ".",
        "",
        "| variant | trainable params | step (s) | PEFT step (s) | ratio vs PEFT | ORT latency (ms) | vs base |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in out["rows"]:
        fmt = lambda x, f: "—" if x is None else format(x, f)  # noqa: E731
        lines.append(
            f"| {r['variant']} | {r['trainable_parameters']:,} | {fmt(r['step_s'], '.3f')} | {fmt(r.get('peft_step_s'), '.3f')} | "
            f"{fmt(r.get('step_ratio_vs_peft'), '.2f')} | {r['ort_latency_ms']:.2f} | {r['ort_overhead_vs_base']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
