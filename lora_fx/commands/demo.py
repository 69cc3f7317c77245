"""``lora-fx demo``: the whole path on the bundled all-MiniLM-L6-v2."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on the bundled all-MiniLM-L6-v2",
        description="On the bundled all-MiniLM-L6-v2 and the shipped tense-classification set: capture with "
        "torch.export, rewrite with LoRA, QLoRA-nf4 and prefix-tuning, train each with the same budget, export merged "
        "and with adapter slots, serve in ONNX Runtime switching the adapter per call, and write the compare report.",
    )
    p.add_argument("-o", "--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--steps", type=int, default=40, help="training steps per method (default: 40)")
    p.add_argument("--quick", action="store_true", help="a reduced run for CI (at most 8 steps, fewer latency runs)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of every method, the same for each: initialisation, data order (default: 0)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import contextlib
    import io

    from lora_fx.cli import print_json
    from lora_fx.demo import run_demo

    # --steps and --seed: run_demo refuses bad ones before its banner and the output folder.
    if args.json:
        with contextlib.redirect_stdout(io.StringIO()):
            summary = run_demo(args.out, steps=args.steps, quick=args.quick, seed=args.seed)
        print_json(summary)
    else:
        run_demo(args.out, steps=args.steps, quick=args.quick, seed=args.seed)
    return 0
