"""``lora-fx compare``: LoRA, QLoRA and prefix-tuning on one base and task, side by side."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from lora_fx.compare import Method

    p = sub.add_parser(
        "compare",
        help="train several methods on one base and task and write a side-by-side report",
        description="Train each method with the same budget and seed on a local transformers encoder folder, export "
        "it to ONNX, time every model in ONNX Runtime in one loop, and write report.md, report.json, PNG plots and "
        "a drawing of one rewritten site per method. The task: classify each JSONL row's text by cosine similarity "
        "to label prompts (the default data is the shipped tense set).",
    )
    p.add_argument("--hf", metavar="DIR", required=True, help="a local transformers encoder folder (config.json, *.safetensors, tokenizer)")
    p.add_argument("--data", metavar="JSONL", help='rows {"text", "label", "split": "train"|"test"} (default: the shipped tense set)')
    p.add_argument("--label-prompts", metavar="P0|P1|...", help="one prompt per label, separated by '|' (default: the tense prompts)")
    p.add_argument("--methods", default="lora,qlora-nf4,prefix", help=f"comma-separated, from: {', '.join(m.value for m in Method)} (default: lora,qlora-nf4,prefix)")
    p.add_argument("-o", "--out", default="report", help="report folder (default: report)")
    p.add_argument("--steps", type=int, default=60, help="training steps per method (default: 60)")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate of every method (default: 0.002)")
    p.add_argument("--seed", type=int, default=0, help="seed of every method: initialisation, data order (default: 0)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default: 8)")
    p.add_argument("--num-virtual-tokens", type=int, default=16, help="prefix length (default: 16)")
    p.add_argument("--latency-runs", type=int, default=None, help="timed ONNX Runtime calls per model (default: 30)")
    p.add_argument("--no-export", action="store_true", help="skip ONNX export and latency")
    p.add_argument("--json", action="store_true", help="print report.json to stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lora_fx.cli import print_json
    from lora_fx.compare import CompareConfig, Method, compare
    from lora_fx.errors import ConfigError

    if not Path(args.hf).is_dir():
        raise ConfigError(f"--hf {args.hf}: not a folder")
    if not -(2**63) <= args.seed < 2**64:  # torch.manual_seed's range; beyond it every method failed on an overflow
        raise ConfigError(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    if args.no_export and args.latency_runs is not None:
        # Latency is measured on the exported ONNX models: with --no-export the count was silently ignored.
        raise ConfigError(f"--latency-runs {args.latency_runs} times the exported ONNX models, and --no-export exports "
                          "none; drop --latency-runs, or --no-export to measure latency")
    # An empty --label-prompts is refused by CompareConfig's check, not taken for the default prompts.
    cfg = CompareConfig(
        hf_dir=args.hf, out_dir=args.out, methods=Method.parse_list(args.methods), data=args.data,
        label_prompts=args.label_prompts.split("|") if args.label_prompts is not None else None, steps=args.steps, lr=args.lr,
        seed=args.seed, r=args.r, num_virtual_tokens=args.num_virtual_tokens, export=not args.no_export,
    )
    if args.latency_runs is not None:
        cfg.latency_runs = args.latency_runs
    report = compare(cfg)
    if args.json:
        print_json(report)
    else:
        print((Path(args.out) / "report.md").read_text())
        print(f"report: {Path(args.out).resolve() / 'report.md'}")
    return 0
