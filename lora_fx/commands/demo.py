"""``lora-fx demo``: the whole path on the bundled all-MiniLM-L6-v2."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on the bundled all-MiniLM-L6-v2",
        description="Capture the bundled all-MiniLM-L6-v2 with torch.export, rewrite it with LoRA, train it on the "
        "shipped tense-classification set, report accuracy before and after, and save the adapter (PEFT format).",
    )
    p.add_argument("-o", "--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--steps", type=int, default=60, help="training steps per method (default: 60)")
    p.add_argument("--quick", action="store_true", help="a reduced run for CI (at most 25 steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import contextlib
    import io

    from lora_fx.cli import print_json
    from lora_fx.demo import run_demo

    if args.json:
        with contextlib.redirect_stdout(io.StringIO()):
            summary = run_demo(args.out, steps=args.steps, quick=args.quick, seed=args.seed)
        print_json(summary)
    else:
        run_demo(args.out, steps=args.steps, quick=args.quick, seed=args.seed)
    return 0
