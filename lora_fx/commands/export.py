"""``lora-fx export``: fold a LoRA ONNX model's adapters into its weights, or expose them as adapter slots."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="fold adapters into the weights (--merge) or keep them as swappable ONNX Runtime slots (--adapters)",
        description="Take an ONNX model with LoRA adapters (from lora-fx rewrite / lora_fx.apply) and write either a "
        "plain model with the adapters folded into W (--merge), or a model whose adapters are ONNX Runtime adapter "
        "slots (--adapters); the latter also writes the current adapter weights as <out stem>.adapters/<name>.onnx_adapter "
        "and as a PEFT adapter directory beside it. --merge --adapter FILE folds an .onnx_adapter (or a PEFT LoRA adapter directory) into a model with slots, a head it brings (modules_to_save slots) included (sites it leaves out stay the base model, a head the base head, with a warning, as lora-fx run serves them). On a quantized (QLoRA) "
        "model --merge needs --float (merged W kept in float) or --requantize (merged W quantized again; the error "
        "this adds is printed per site).",
    )
    p.add_argument("model", help="an .onnx file with LoRA adapters")
    p.add_argument("-o", "--out", required=True, help="the .onnx file to write")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--merge", action="store_true", help="fold the adapters into the weights: a plain model")
    mode.add_argument("--adapters", action="store_true", help="adapter slots + .onnx_adapter (+ PEFT dir) of the current weights")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--float", dest="quant_merge", action="store_const", const="float",
                       help="with --merge on a quantized (QLoRA) model: keep the merged W in float (a plain MatMul)")
    quant.add_argument("--requantize", dest="quant_merge", action="store_const", const="requantize",
                       help="with --merge on a quantized model: quantize the merged W again (same format and op); "
                       "prints the error this adds per site")
    p.add_argument("--adapter", metavar="FILE", help="with --merge: fold this .onnx_adapter or PEFT LoRA adapter directory (for a model with adapter slots)")
    p.add_argument("--name", default=None, help="with --adapters: name of the written adapter (default: default)")
    p.add_argument("--no-peft", action="store_true", help="with --adapters: do not write the PEFT directory")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lora_fx.cli import print_json
    from lora_fx.errors import ConfigError
    from lora_fx.files import require_file

    src, out = Path(args.model), Path(args.out)
    require_file(src, "ONNX model")
    if src.resolve() == out.resolve():
        raise ConfigError(f"-o {out} would overwrite the input model; choose another output path")
    if args.merge and (args.name is not None or args.no_peft):
        # A merge writes one plain model and no adapter: these would be silently ignored.
        given = [flag for flag, on in (("--name", args.name is not None), ("--no-peft", args.no_peft)) if on]
        raise ConfigError(f"{' and '.join(given)} {'goes' if len(given) == 1 else 'go'} with --adapters (the adapter files "
                          "it writes); --merge writes no adapter")
    args.name = "default" if args.name is None else args.name
    check_outputs(out, args)
    if args.adapter and not args.merge:
        raise ConfigError("--adapter FILE goes with --merge (fold that adapter); --adapters writes the model's own weights")
    quant_merge = getattr(args, "quant_merge", None)
    if quant_merge and not args.merge:
        raise ConfigError(f"--{quant_merge} goes with --merge (what a merge makes of a quantized W); --adapters keeps W as it is")
    summary = export_file(src, out, merge=args.merge, adapter=args.adapter, name=args.name, peft_dir=not args.no_peft,
                          quant_merge=quant_merge)
    if args.json:
        print_json(summary)
    else:
        for e in summary.get("requant_errors", []):
            print(f"{e['site']}: requantized ({e['format']}), max abs error {e['max_abs_error']:.3g}, "
                  f"relative error {e['relative_error']:.3g}")
        print(f"wrote {summary['model']} ({summary['mode']}, {len(summary['sites'])} sites)")
    if summary.get("default_sites"):
        total = len(summary["adapter_sites"]) + len(summary["default_sites"])
        print(f"lora-fx: warning: {args.adapter} covers {len(summary['adapter_sites'])} of the {total} adapter sites; "
              f"these were merged as the base model (the base head for a module trained in full, modules_to_save): "
              f"{', '.join(summary['default_sites'])}", file=sys.stderr)
    if quant_merge and not summary.get("quantized_sites"):
        # Accepted, as a script may pass it for every model, but said: the merge is the plain float one either way.
        print(f"lora-fx: warning: --{quant_merge} has no effect: no adapter site of {src.name} has a quantized weight "
              "(MatMulBnb4, MatMulNBits, DequantizeLinear), so its adapters were merged into its float weights as without it",
              file=sys.stderr)
    if not args.json:
        for path in summary.get("adapters", []) + summary.get("peft_dirs", []):
            print(f"wrote {path}")
    return 0


def check_outputs(out: Path, args: argparse.Namespace) -> None:
    """Every path the command will write, checked before any work is done: found only when the files are
    written, a bad adapter path would cost the whole export."""
    from lora_fx.export import adapters_dir
    from lora_fx.files import check_adapter_name, check_adapter_outputs, check_output
    from lora_fx.onnx_adapter import SUFFIX

    check_output(out, inputs=[args.adapter] if args.adapter else [])
    if args.adapters:
        check_adapter_outputs(adapters_dir(out), check_adapter_name(args.name, "--name"), SUFFIX, peft_dir=not args.no_peft)


def export_file(src: Path, out: Path, *, merge: bool, adapter: str | None = None, name: str = "default", peft_dir: bool = True,
                quant_merge=None) -> dict:
    """The command's work, callable from Python: every output is computed before any file is written, and with
    ``merge=False`` the adapter files are written (under a temporary folder) before the model, which only then is
    written and joined by them (``lora_fx.files.write_with_adapters``): a failure leaves no model without its adapters.

    Modules trained in full (``modules_to_save``, the SEQ_CLS head, from ``lora_fx.apply`` on the ONNX file) are
    merged as trained, or become slots defaulting to their base values, the trained head in the adapter files.
    ``quant_merge`` (``QuantMerge`` or "float" / "requantize"): how ``merge`` folds into quantized weights."""
    import onnx_ir as ir

    from lora_fx.errors import AdapterError, ConfigError
    from lora_fx.export import adapters_dir, optimize_keeping_slots, save_model, serve_slots
    from lora_fx.files import Staging, write_with_adapters
    from lora_fx.onnx_adapter import (SUFFIX, check_writable, current_adapter, exposed_slots, model_fingerprints, model_slots,
                                      read_adapter_for, to_peft, write_onnx_adapter)
    from lora_fx.onnx_model import check_not_external_data, load
    from lora_fx.passes.onnx.fold_lora import FoldLora
    from lora_fx.passes.onnx.lora_layout import read_records

    model = load(src)
    # Before any work: the output's .onnx or .data must not replace a file the input model reads.
    check_not_external_data(model, out, source=src)
    records = read_records(model)
    from lora_fx.passes.onnx.insert_prefix import prefix_metadata

    if records and prefix_metadata(model):
        _refuse_both_kinds(src, model, records)
    if not records and prefix_metadata(model):
        return _export_prefix_file(src, out, model, merge=merge, adapter=adapter, name=name, peft_dir=peft_dir)
    if not records:
        raise AdapterError(f"{src} has no LoRA adapters (no lora_fx.lora metadata); rewrite it first: lora-fx rewrite {src} -o lora.onnx")
    exposed = bool(exposed_slots(model))
    summary: dict = {"model": str(out), "sites": sorted(records)}
    if merge:
        if exposed and not adapter:
            raise ConfigError(f"{src} has adapter slots (zero by default); name the adapter to fold: --merge --adapter FILE.onnx_adapter")
        if adapter:
            slots = model_slots(model)
            loaded = read_adapter_for(adapter, slots, model_fingerprints(model.metadata_props), where=src.name)
            # As `lora-fx run` serves it: sites the adapter leaves out keep the slot defaults (B zero: the base), and
            # a head (modules_to_save) it does not bring stays the base head.
            from lora_fx.onnx_adapter import slot_site

            summary["adapter_sites"] = sorted({slot_site(n, slots) for n in loaded.tensors})
            summary["default_sites"] = sorted({slot_site(n, slots) for n in slots} - set(summary["adapter_sites"]))
            for key, arr in loaded.tensors.items():
                model.graph.initializers[key].const_value = ir.tensor(arr, name=key)
        from lora_fx.passes.onnx.expose_adapters import settle_saved
        from lora_fx.passes.onnx.freeze_base import drop_saved_base

        drop_saved_base(model)  # a head trained in full (lora_fx.apply on this file) is merged as trained
        settle_saved(model)  # the head as the adapter set it: plain weights of the merged model
        folder = FoldLora(quant_merge)
        folder(model)
        optimize_keeping_slots(model)
        summary["mode"] = "merged"
        if folder.quant_merge is not None:
            summary["quant_merge"] = folder.quant_merge.value
            summary["quantized_sites"] = folder.quantized_sites
            summary["requant_errors"] = [e.to_dict() for e in folder.errors]
        save_model(model, out)
        return summary
    if exposed:
        raise AdapterError(f"{src} already has adapter slots; its initializers are zero defaults, not an adapter to export")
    from lora_fx.passes.onnx.freeze_base import drop_saved_base

    weights = current_adapter(model)  # with the trained head, where one trains in full (modules_to_save)
    check_writable(weights)  # before any file is written
    # The head's slots default to its base values, kept beside it since lora_fx.apply: no adapter is the base model.
    serve_slots(model, saved=drop_saved_base(model))
    from lora_fx.onnx_adapter import stamp_fingerprint

    weights.fingerprint = stamp_fingerprint(model)
    peft = to_peft(weights) if peft_dir else None
    directory = adapters_dir(out)
    summary.update(mode="adapters", fingerprint=weights.fingerprint, adapters=[str(directory / f"{name}{SUFFIX}")])

    def write_adapters(stage: Staging) -> None:
        write_onnx_adapter(stage.path(f"{name}{SUFFIX}"), weights)
        if peft is not None:
            from lora_fx.adapters import write_peft_dir

            write_peft_dir(stage.path(name), *peft)

    write_with_adapters(model, out, directory, write_adapters, save_model)
    if peft is not None:
        summary["peft_dirs"] = [str(directory / name)]
    return summary


def _refuse_both_kinds(src: Path, model, records: dict) -> None:
    """A file with prefixes and LoRA (``rewrite --method lora`` on a prefix-rewritten file, or the reverse) has no
    export: the LoRA export would bake the prefixes into constants (no slots, adapter files without them, "no
    adapter" not the base model), prefixes cannot be folded (--merge), and one PEFT adapter cannot hold both kinds."""
    from lora_fx.errors import AdapterError
    from lora_fx.passes.onnx.insert_prefix import prefix_metadata

    prefixes = len(prefix_metadata(model)["sites"])
    raise AdapterError(
        f"{src} holds both prefix-tuning prefixes (at {prefixes} attention site{'s' if prefixes != 1 else ''}) and LoRA "
        f"adapters (at {len(records)} site{'s' if len(records) != 1 else ''}), made by rewriting with one method on top "
        "of the other; lora-fx export serves one kind: prefixes cannot be folded "
        "into weights (--merge), and one adapter cannot hold both (--adapters: PEFT has no format for it, and the "
        "prefixes would be baked into the served model). Rewrite the original model once per method (lora-fx rewrite "
        "BASE.onnx -o p.onnx --method prefix ...; lora-fx rewrite BASE.onnx -o l.onnx --method lora ...), then train "
        "and export each on its own"
    )


def _export_prefix_file(src: Path, out: Path, model, *, merge: bool, adapter: str | None, name: str, peft_dir: bool) -> dict:
    """``export --adapters`` of a prefix-tuned ONNX file (``lora-fx rewrite --method prefix``, then train): the
    prefixes become slots defaulting to their trained values (``expose_prefixes``), a head trained in full
    (``modules_to_save``) slots defaulting to the base head; the adapter files hold the prefixes and the trained
    head. Prefixes cannot be folded into weights, so ``--merge`` is refused with the way out. Prefixes on some layers
    only (``--target-modules``) get no PEFT directory, with a warning: PEFT's prefix-tuning has no per-layer targets."""
    import warnings

    import numpy as np
    import onnx_ir as ir

    from lora_fx.errors import AdapterError, UnsupportedError
    from lora_fx.export import adapters_dir, optimize_keeping_slots, save_model
    from lora_fx.onnx_adapter import (SUFFIX, OnnxAdapter, check_writable, read_saved, stamp_fingerprint, trained_values,
                                      write_onnx_adapter)
    from lora_fx.passes.onnx.expose_prefixes import expose_prefixes
    from lora_fx.passes.onnx.freeze_base import drop_saved_base
    from lora_fx.passes.onnx.insert_prefix import PREFIX_CONFIG_KEY, prefix_metadata
    from lora_fx.prefix_adapters import onnx_subset_reason

    if merge or adapter:
        raise UnsupportedError(
            f"{src} holds prefix-tuning prefixes, which cannot be folded into weights (they are extra keys and values "
            f"of each attention, not a change of W); serve them as ONNX Runtime adapter slots: lora-fx export {src} "
            f"-o served.onnx --adapters"
        )
    record = prefix_metadata(model)
    graph = model.graph
    if any(graph.initializers.get(rec[w]) in graph.inputs for rec in record["sites"].values() for w in ("key", "value")):
        raise AdapterError(f"{src} already has prefix slots; export the model it was made from")
    skipped = onnx_subset_reason(model) if peft_dir else None  # read before expose_prefixes changes the graph
    if skipped:
        # The served model and its .onnx_adapter hold any subset; only the PEFT directory cannot.
        warnings.warn(f"{src.name}: no PEFT directory written: {skipped}. The served model and {name}{SUFFIX} hold "
                      "the prefixes (--no-peft says this is wanted); for a PEFT adapter, rewrite the original model "
                      "without --target-modules", stacklevel=2)
        peft_dir = False
    saved = drop_saved_base(model)
    # The trained values, read before the head's slots take the base head as their defaults.
    trained = trained_values(model, read_saved(model.metadata_props), "export the model lora_fx.apply wrote")
    tensors = {rec[w]: np.ascontiguousarray(graph.initializers[rec[w]].const_value.numpy())
               for rec in record["sites"].values() for w in ("key", "value")}
    tensors.update(trained)
    config_text = model.metadata_props.get(PREFIX_CONFIG_KEY)
    weights = OnnxAdapter(tensors, sites=record["sites"], config=json.loads(config_text) if config_text else None)
    check_writable(weights)  # before any file is written
    expose_prefixes(model, saved)
    optimize_keeping_slots(model)
    weights.fingerprint = stamp_fingerprint(model)
    directory = adapters_dir(out)
    summary: dict = {"model": str(out), "sites": sorted(record["sites"]), "mode": "adapters", "fingerprint": weights.fingerprint,
                     "adapters": [str(directory / f"{name}{SUFFIX}")]}

    from lora_fx.files import write_with_adapters

    def write_adapters(stage) -> None:
        write_onnx_adapter(stage.path(f"{name}{SUFFIX}"), weights)
        if not peft_dir:
            return
        from lora_fx.prefix_adapters import save_onnx_prefix_adapter

        # The PEFT directory holds the trained head, the model the slots' defaults (the base head): the trained
        # values go in for the directory only.
        defaults = {key: graph.initializers[key].const_value for key in trained}
        try:
            for key, value in trained.items():
                graph.initializers[key].const_value = ir.tensor(value, name=key)
            save_onnx_prefix_adapter(model, stage.path(name))
        finally:
            for key, value in defaults.items():
                graph.initializers[key].const_value = value

    write_with_adapters(model, out, directory, write_adapters, save_model)
    if peft_dir:
        summary["peft_dirs"] = [str(directory / name)]
    if skipped:
        summary["peft_skipped"] = skipped
    return summary
