"""``lora-fx run``: run an ONNX model in ONNX Runtime, optionally with an adapter active."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run an ONNX model in ONNX Runtime, with an .onnx_adapter active",
        description="Run an ONNX model (e.g. one exported with --adapters) on the inputs in an .npz file, with an "
        ".onnx_adapter active (or none: the base model). Prints each output's shape and summary statistics; "
        "-o saves the outputs as .npz. The execution providers chosen are reported.",
    )
    p.add_argument("model", help="the .onnx model")
    p.add_argument("--adapter", metavar="FILE", help="an .onnx_adapter to activate for the run")
    p.add_argument("--inputs", metavar="NPZ", required=True, help="an .npz file with one array per model input (no pickle)")
    p.add_argument("-o", "--out", metavar="NPZ", help="save the outputs to this .npz file")
    p.add_argument("--cpu", action="store_true", help="force the CPU execution provider")
    p.add_argument("--json", action="store_true", help="print providers and outputs as JSON")
    p.set_defaults(func=run)


def load_feeds(path: str | Path) -> dict:
    import zipfile

    import numpy as np

    from lora_fx.errors import ConfigError

    from lora_fx.files import require_file

    path = require_file(path, "inputs file")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{path} is not an .npz of plain arrays (np.savez; object arrays need pickle and are refused): {exc}") from None


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from lora_fx.cli import print_json
    from lora_fx.files import atomic_path, check_output, require_file
    from lora_fx.runtime.ort import CPU, Session

    require_file(args.model, "ONNX model")
    if args.out:  # -o feeds.npz used to replace the inputs with the outputs
        check_output(args.out, inputs=[p for p in (args.model, args.inputs, args.adapter) if p])
    feeds = load_feeds(args.inputs)
    session = Session(args.model, providers=[CPU] if args.cpu else None)
    name = None
    if args.adapter:
        name = Path(args.adapter).stem
        session.add_adapter(name, args.adapter)
    outputs = session.run(feeds, adapter=name)
    named = dict(zip(session.outputs, outputs))
    if args.out:
        with atomic_path(args.out) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **named)
    summary = {
        "model": args.model,
        "providers": session.providers,
        "adapter": args.adapter,
        "outputs": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype), "mean": float(np.mean(v)), "std": float(np.std(v)),
                "first": np.asarray(v).reshape(-1)[:8].tolist()}
            for k, v in named.items()
        },
    }
    if args.out:
        summary["saved"] = args.out
    if args.json:
        print_json(summary)
    else:
        print(f"providers: {', '.join(session.providers)}; adapter: {args.adapter or 'none (base model)'}")
        for k, v in summary["outputs"].items():
            print(f"{k}: shape {tuple(v['shape'])} {v['dtype']}  mean {v['mean']:.6g}  std {v['std']:.6g}")
    return 0
