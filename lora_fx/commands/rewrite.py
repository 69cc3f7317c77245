"""``lora-fx rewrite``: rewrite the linear sites of an ONNX file into LoRA subgraphs."""

from __future__ import annotations

import argparse
import enum
from pathlib import Path
from typing import Any, Callable


class Method(str, enum.Enum):
    LORA = "lora"
    PREFIX = "prefix"

    def __str__(self) -> str:  # argparse shows choices with str()
        return self.value


def _csv(text: str | None) -> list[str] | str | None:
    """``query,value`` → a list (suffix match); one item with regex characters stays a regex string."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if len(items) == 1 and (items[0] == "all-linear" or any(c in items[0] for c in "*+?[]()|^$\\")):
        return items[0]
    return items


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rewrite",
        help="insert adapters (LoRA) at the sites of an ONNX model",
        description="Insert LoRA branches at the selected linear sites of an ONNX file and write the rewritten "
        "model. Each adapted site gains <site>.lora_A.weight [in, r] and <site>.lora_B.weight [r, out] "
        "(scale folded into B; B starts at zero, so outputs are unchanged until training).",
    )
    p.add_argument("model", help="the input .onnx file")
    p.add_argument("-o", "--output", required=True, help="where to write the rewritten .onnx file")
    p.add_argument("--method", type=Method, choices=list(Method), default=Method.LORA,
                   help="which adapter to insert (default: lora)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha; the scale is alpha / r (default: r)")
    p.add_argument("--target-modules", default=None,
                   help="comma-separated module names or suffixes (query,value), a regex, or all-linear")
    p.add_argument("--exclude-modules", default=None, help="comma-separated names or suffixes, or a regex, to leave out")
    p.add_argument("--use-rslora", action="store_true", help="scale by alpha / sqrt(r)")
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="dropout on each LoRA branch's input while training (a Dropout node that inference skips; default 0)")
    p.add_argument("--init", choices=["kaiming", "gaussian", "random"], default="kaiming",
                   help="initialisation of A and B (kaiming/gaussian keep B zero; random changes the outputs)")
    p.add_argument("--num-virtual-tokens", type=int, default=16,
                   help="prefix method: learned key/value prefix length T per attention site (default 16)")
    p.add_argument("--external-data", action="store_true", help="store the weights in <output>.data")
    p.add_argument("--quant", choices=["nf4", "int4", "int8"], default=None,
                   help="store the frozen linear weights quantized (QLoRA): nf4 (MatMulBnb4), int4 (MatMulNBits), int8 (DequantizeLinear)")
    p.add_argument("--quant-block-size", type=int, default=64, help="weights per scale block for nf4/int4 (default 64)")
    p.add_argument("--double-quant", action="store_true",
                   help="nf4: store the block scales in 8 bits too (QLoRA's double quantization; about 4.13 bits a weight)")
    p.add_argument("--json", action="store_true", help="print a JSON summary of the adapted sites")
    p.set_defaults(func=run)


def _rewrite_lora(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from lora_fx.config import LoraConfig
    from lora_fx.errors import ConfigError
    from lora_fx.passes.onnx.insert_lora import apply_lora, lora_metadata

    if args.target_modules is None:
        raise ConfigError("name the sites to adapt with --target-modules (e.g. query,value or all-linear); "
                          "see them with: lora-fx sites MODEL")
    config = LoraConfig(
        r=args.r, lora_alpha=args.lora_alpha if args.lora_alpha is not None else args.r,
        target_modules=_csv(args.target_modules), exclude_modules=_csv(args.exclude_modules),
        use_rslora=args.use_rslora, init_lora_weights=args.init, lora_dropout=args.lora_dropout,
    )
    quant = None
    if getattr(args, "quant", None):  # QLoRA: quantize first, so the adapters attach to the quantized sites
        from lora_fx.config import QuantConfig
        from lora_fx.passes.onnx.quantize_weights import apply_quant

        qconfig = QuantConfig(dtype=args.quant, block_size=args.quant_block_size, double_quant=args.double_quant,
                              exclude_modules=_csv(args.exclude_modules))
        quant = {"config": qconfig.to_dict(), "sites": apply_quant(model, qconfig, None).changed}
    apply_lora(model, config)
    summary = {"method": "lora", "config": config.to_dict(), "sites": lora_metadata(model)}
    if quant is not None:
        summary["quant"] = quant
    return summary


def _rewrite_prefix(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from lora_fx.config import PrefixConfig
    from lora_fx.passes.onnx.insert_prefix import apply_prefix, prefix_metadata

    config = PrefixConfig(num_virtual_tokens=args.num_virtual_tokens, target_modules=_csv(args.target_modules))
    apply_prefix(model, config)
    record = prefix_metadata(model)
    return {"method": "prefix", "config": config.to_dict(), "sites": record["sites"]}


# One entry per --method; later methods (prefix, quantized bases) register here.
METHODS: dict[Method, Callable[[Any, argparse.Namespace], dict[str, Any]]] = {
    Method.LORA: _rewrite_lora, Method.PREFIX: _rewrite_prefix,
}


def rewrite(args: argparse.Namespace) -> dict[str, Any]:
    import lora_fx
    from lora_fx.errors import ConfigError

    src, dst = Path(args.model), Path(args.output)
    if src.resolve() == dst.resolve():
        raise ConfigError(f"-o {dst} is the input file; write the rewritten model to a new path")
    model = lora_fx.load(src)
    summary = METHODS[Method(args.method)](model, args)
    lora_fx.save(model, dst, external_data=True if args.external_data else None)
    summary["output"] = str(dst)
    return summary


def run(args: argparse.Namespace) -> int:
    from lora_fx.cli import print_json

    summary = rewrite(args)
    if args.json:
        print_json(summary)
    else:
        for name, rec in summary["sites"].items():
            if summary["method"] == "prefix":
                print(f"{name}  prefix kv_heads={rec['kv_heads']} T={args.num_virtual_tokens} head_dim={rec['head_dim']}")
                continue
            print(f"{name}  r={rec['r']} alpha={rec['alpha']:g} {rec['in_features']} -> {rec['out_features']}")
        print(f"\n{len(summary['sites'])} sites adapted with {summary['method']}; wrote {summary['output']}")
    return 0
