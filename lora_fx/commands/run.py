"""``lora-fx run``: run an ONNX model in ONNX Runtime, optionally with an adapter active."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run an ONNX model in ONNX Runtime, with an adapter active",
        description="Run an ONNX model (e.g. one exported with --adapters) on the inputs in an .npz file, with an "
        ".onnx_adapter or a PEFT LoRA adapter directory active. Without --adapter the file runs as saved: its own weights "
        "(a trained, merged file runs trained), and a file with adapter slots its slot defaults (the base model at LoRA "
        "slots and head slots, the exported prefixes at prefix slots). Prints each output's shape and summary statistics; "
        "-o saves the outputs as .npz. The execution providers chosen are reported.",
    )
    p.add_argument("model", help="the .onnx model")
    p.add_argument("--adapter", metavar="FILE", help="an .onnx_adapter (or a PEFT LoRA adapter directory) to activate for the run; without it the file "
                   "runs as saved (see above)")
    p.add_argument("--inputs", metavar="NPZ", required=True, help="an .npz file with one array per model input (no pickle)")
    p.add_argument("-o", "--out", metavar="NPZ", help="save the outputs to this .npz file (bfloat16 outputs as float32, "
                   "which holds every bfloat16 value exactly: an .npz cannot carry bfloat16 as numbers)")
    p.add_argument("--cpu", action="store_true", help="force the CPU execution provider")
    p.add_argument("--json", action="store_true", help="print providers and outputs as JSON")
    p.set_defaults(func=run)


def load_feeds(path: str | Path) -> dict:
    """The arrays of an .npz file by name (``lora_fx.files.read_npz``: never unpickles); the names, dtypes and
    shapes are checked against the model's inputs when the session runs them."""
    from lora_fx.files import read_npz

    return read_npz(path, "inputs file", "np.savez(path, <input name>=array, ...)")


def save_outputs(path: str | Path, arrays: dict) -> None:
    """``arrays`` as an .npz (what ``np.savez`` writes), bfloat16 arrays as float32 (the same values). Not
    ``np.savez(f, **arrays)``: an output named ``file`` or ``allow_pickle`` would collide with its own parameters."""
    import zipfile

    import numpy as np

    from lora_fx.onnx_adapter import is_bfloat16

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, value in arrays.items():
            value = np.asanyarray(value)
            if is_bfloat16(value.dtype):
                # .npy has no bfloat16: it would store bare 2-byte values ('|V2') that read back as bytes, not numbers.
                value = value.astype(np.float32)
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, value, allow_pickle=False)


def _stats(v) -> dict:
    """Shape, dtype, mean, std (in float64) and the first values; no mean/std of an empty or non-numeric output
    (numpy would warn and give nan, or fail). bfloat16 (numpy kind 'V') counts as numeric."""
    import numpy as np

    from lora_fx.onnx_adapter import is_bfloat16

    v = np.asarray(v)
    numeric = v.size > 0 and (v.dtype.kind in "biuf" or is_bfloat16(v.dtype))
    return {"shape": list(v.shape), "dtype": str(v.dtype),
            "mean": float(np.mean(v, dtype=np.float64)) if numeric else None,
            "std": float(np.std(v, dtype=np.float64)) if numeric else None,
            "first": v.reshape(-1)[:8].tolist()}


def without_adapter(slots: dict) -> str:
    """What a session runs with no adapter active, by the file's adapter slots (``Session.slots``). With none the
    file's own weights run: the base model only if the file is one (a trained or merged file runs trained). With
    slots, ONNX Runtime runs their defaults: zeros at LoRA slots and the base head at head slots (the base model
    there), but the exported prefixes at prefix slots, which are trained."""
    from lora_fx.onnx_adapter import site_of

    if not slots:
        return "none (the file's own weights)"
    prefixed = sorted({site_of(n) for n in slots if ".prefix_" in n})
    if not prefixed:
        return "none (slot defaults: the base model)"
    return (f"none (slot defaults: the exported prefixes at {len(prefixed)} prefix site{'s' if len(prefixed) != 1 else ''}, "
            "not the base model)")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from lora_fx.cli import print_json
    from lora_fx.errors import ConfigError
    from lora_fx.files import atomic_path, check_output, require_file
    from lora_fx.runtime.ort import CPU, Session

    require_file(args.model, "ONNX model")
    if args.out == "":
        # An empty -o (an unset shell variable) was taken for no -o at all: the outputs went nowhere, exit 0.
        raise ConfigError(f"-o {args.out!r} is an empty path; name the .npz file for the outputs, or leave -o out")
    if args.out:  # -o feeds.npz used to replace the inputs with the outputs
        check_output(args.out, inputs=[p for p in (args.model, args.inputs, args.adapter) if p])
    feeds = load_feeds(args.inputs)
    session = Session(args.model, providers=[CPU] if args.cpu else None)
    name = None
    default_sites: list[str] | None = None  # None: no adapter, every site runs the model's defaults
    if args.adapter:
        name = "adapter"  # the session's one adapter: a name from the path would be empty for "." or "dir/.."
        default_sites = session.add_adapter(name, args.adapter).default_sites
        if default_sites:
            # ONNX Runtime runs the slots an adapter does not name with the model's defaults (zeros: the base model
            # there); a user who meant to serve the whole adapter would never notice.
            print(f"lora-fx: warning: {args.adapter} covers {len(session.slot_sites) - len(default_sites)} of the "
                  f"{len(session.slot_sites)} adapter sites of {Path(args.model).name}; these run with the model's defaults "
                  f"(the base model for LoRA slots, the base head for a module trained in full): {', '.join(default_sites)}",
                  file=sys.stderr)
    outputs = session.run(feeds, adapter=name)
    named = dict(zip(session.outputs, outputs))
    if args.out:
        with atomic_path(args.out) as tmp:
            save_outputs(tmp, named)
    summary = {
        "model": args.model,
        "providers": session.providers,
        "adapter": args.adapter,
        "runs": args.adapter or without_adapter(session.slots),
        "default_sites": default_sites,
        "outputs": {k: _stats(v) for k, v in named.items()},
    }
    if args.out:
        summary["saved"] = args.out
    if args.json:
        print_json(summary)
    else:
        print(f"providers: {', '.join(session.providers)}; adapter: {summary['runs']}")
        for k, v in summary["outputs"].items():
            stats = f"  mean {v['mean']:.6g}  std {v['std']:.6g}" if v["mean"] is not None else ""
            print(f"{k}: shape {tuple(v['shape'])} {v['dtype']}{stats}")
    return 0
