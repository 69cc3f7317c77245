"""``lora-fx sites``: list the linear and attention sites of a model."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sites",
        help="list the linear and attention sites of a model",
        description="List the linear and attention sites of a local transformers model folder (--hf DIR) "
        "or an ONNX file: name (the source module path), kind, op and shapes.",
    )
    p.add_argument("model", nargs="?", help="an .onnx file")
    p.add_argument("--hf", metavar="DIR", help="a local transformers model folder (config.json + *.safetensors): a text "
                   "encoder or decoder, an encoder-decoder or an image model, captured with example inputs built "
                   "from its config")
    p.add_argument("--kind", choices=["linear", "attention"], help="only sites of this kind")
    p.add_argument("--json", action="store_true", help="print a JSON list of site objects")
    p.set_defaults(func=run)


def load_sites(args: argparse.Namespace) -> list:
    import lora_fx
    from lora_fx.errors import CaptureError, ConfigError

    if args.hf and args.model:
        raise ConfigError("give either an .onnx file or --hf DIR, not both")
    if args.hf:
        from lora_fx.hf import example_inputs, load_hf_model

        model = load_hf_model(args.hf)
        inputs = example_inputs(model)
        try:
            gm = lora_fx.capture(model, kwargs=inputs)
        except CaptureError as exc:
            # capture's ways out (other example inputs, dynamic=False) are the Python API's: say so, and what ran
            raise CaptureError(
                f"{exc}\nlora-fx sites --hf captured {type(model).__name__} with {', '.join(inputs)} built from its "
                "config, and dynamic batch and sequence; to capture it otherwise use the Python API: "
                "gm = lora_fx.capture(model, kwargs={...}, dynamic=...); lora_fx.find_sites(gm)"
            ) from None
        return lora_fx.find_sites(gm)
    if args.model:
        if not Path(args.model).exists():
            raise FileNotFoundError(f"{args.model}: no such file")
        return lora_fx.find_sites(lora_fx.load(args.model))
    raise ConfigError("name a model: lora-fx sites model.onnx, or lora-fx sites --hf DIR")


def run(args: argparse.Namespace) -> int:
    from lora_fx.cli import print_json
    from lora_fx.sites import format_sites

    sites = load_sites(args)
    # ONNX layers inside If/Loop/Scan subgraphs (passes.onnx.find_sites.Sites.subgraphs): listed, never rewritten.
    groups = [(g, [s for s in g.sites if not args.kind or s.kind.value == args.kind]) for g in getattr(sites, "subgraphs", ())]
    note = getattr(sites, "unreachable_note", None)
    # Linear layers in If branches on main-graph weights (Optimum's merged decoders): ordinary sites, said where.
    inside = getattr(sites, "inside", {})
    if args.kind:
        sites = [s for s in sites if s.kind.value == args.kind]
    if args.json:
        print_json([dict(s.to_dict(), inside=inside[s.name]) if s.name in inside else s.to_dict() for s in sites]
                   + [dict(s.to_dict(), rewritable=False, inside=g.where) for g, hidden in groups for s in hidden])
    else:
        print(format_sites(sites))
        n_lin = sum(s.kind.value == "linear" for s in sites)
        print(f"\n{len(sites)} sites: {n_lin} linear, {len(sites) - n_lin} attention")
        shown = [s.name for s in sites if s.name in inside]
        for where in dict.fromkeys(inside[n] for n in shown):
            names = [n for n in shown if inside[n] == where]
            print(f"{len(names)} of them inside {where}: each is one site (one adapter), rewritten in every branch")
        hidden = [s for _, part in groups for s in part]
        if hidden:
            print(f"\nnot rewritable, inside control-flow subgraphs ({len(hidden)}):\n{format_sites(hidden)}\n\n{note}")
    return 0
