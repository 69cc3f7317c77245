"""``lora-fx export``: fold a LoRA ONNX model's adapters into its weights, or expose them as adapter slots."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="fold adapters into the weights (--merge) or keep them as swappable ONNX Runtime slots (--adapters)",
        description="Take an ONNX model with LoRA adapters (from lora-fx rewrite / lora_fx.apply) and write either a "
        "plain model with the adapters folded into W (--merge), or a model whose adapters are ONNX Runtime adapter "
        "slots (--adapters); the latter also writes the current adapter weights as <out stem>.adapters/<name>.onnx_adapter "
        "and as a PEFT adapter directory beside it. --merge --adapter FILE folds an .onnx_adapter into a model with slots.",
    )
    p.add_argument("model", help="an .onnx file with LoRA adapters")
    p.add_argument("-o", "--out", required=True, help="the .onnx file to write")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--merge", action="store_true", help="fold the adapters into the weights: a plain model")
    mode.add_argument("--adapters", action="store_true", help="adapter slots + .onnx_adapter (+ PEFT dir) of the current weights")
    p.add_argument("--adapter", metavar="FILE", help="with --merge: fold this .onnx_adapter (for a model with adapter slots)")
    p.add_argument("--name", default="default", help="name of the written adapter (default: default)")
    p.add_argument("--no-peft", action="store_true", help="with --adapters: do not write the PEFT directory")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lora_fx.cli import print_json
    from lora_fx.errors import ConfigError

    src, out = Path(args.model), Path(args.out)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such file")
    if src.resolve() == out.resolve():
        raise ConfigError(f"-o {out} would overwrite the input model; choose another output path")
    if args.adapter and not args.merge:
        raise ConfigError("--adapter FILE goes with --merge (fold that adapter); --adapters writes the model's own weights")
    summary = export_file(src, out, merge=args.merge, adapter=args.adapter, name=args.name, peft_dir=not args.no_peft)
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {summary['model']} ({summary['mode']}, {len(summary['sites'])} sites)")
        for path in summary.get("adapters", []) + summary.get("peft_dirs", []):
            print(f"wrote {path}")
    return 0


def export_file(src: Path, out: Path, *, merge: bool, adapter: str | None = None, name: str = "default", peft_dir: bool = True) -> dict:
    """The command's work, callable from Python: every output is computed before any file is written."""
    import onnx_ir as ir

    from lora_fx.errors import AdapterError, ConfigError
    from lora_fx.export import adapters_dir, optimize_keeping_slots, save_model
    from lora_fx.onnx_adapter import SUFFIX, check_fits, check_writable, current_adapter, model_slots, read_onnx_adapter, to_peft, write_onnx_adapter
    from lora_fx.onnx_model import load
    from lora_fx.passes.onnx.expose_adapters import expose_adapters
    from lora_fx.passes.onnx.fold_lora import fold_lora
    from lora_fx.passes.onnx.hoist_lora_add import hoist_lora_add
    from lora_fx.passes.onnx.lora_layout import FINGERPRINT_KEY, read_records

    model = load(src)
    records = read_records(model)
    if not records:
        raise AdapterError(f"{src} has no LoRA adapters (no lora_fx.lora metadata); rewrite it first: lora-fx rewrite {src} -o lora.onnx")
    exposed = any(v.name in model.graph.initializers for v in model.graph.inputs)
    summary: dict = {"model": str(out), "sites": sorted(records)}
    if merge:
        if exposed and not adapter:
            raise ConfigError(f"{src} has adapter slots (zero by default); name the adapter to fold: --merge --adapter FILE.onnx_adapter")
        if adapter:
            loaded = read_onnx_adapter(adapter)
            slots = model_slots(model)
            check_fits(loaded, slots, model.metadata_props.get(FINGERPRINT_KEY), where=src.name)
            missing = sorted(set(slots) - set(loaded.tensors))
            if missing:
                raise AdapterError(f"{adapter} lacks tensors for {missing[:4]}; a merge needs every site's A and B")
            for key, arr in loaded.tensors.items():
                model.graph.initializers[key].const_value = ir.tensor(arr, name=key)
        fold_lora(model)
        optimize_keeping_slots(model)
        summary["mode"] = "merged"
        save_model(model, out)
        return summary
    if exposed:
        raise AdapterError(f"{src} already has adapter slots; its initializers are zero defaults, not an adapter to export")
    weights = current_adapter(model)
    check_writable(weights)  # before any file is written
    expose_adapters(model)
    hoist_lora_add(model)
    optimize_keeping_slots(model)
    from lora_fx.onnx_adapter import stamp_fingerprint

    weights.fingerprint = stamp_fingerprint(model)
    save_model(model, out)
    directory = adapters_dir(out)
    summary.update(mode="adapters", fingerprint=weights.fingerprint, adapters=[str(write_onnx_adapter(directory / f"{name}{SUFFIX}", weights))])
    if peft_dir:
        from lora_fx.adapters import write_peft_dir

        config, tensors = to_peft(weights)
        summary["peft_dirs"] = [str(write_peft_dir(directory / name, config, tensors))]
    return summary

