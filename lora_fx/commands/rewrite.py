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


# PEFT's TaskType names.
TASK_TYPES = ["SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rewrite",
        help="insert adapters (LoRA, QLoRA or prefix-tuning) at the sites of an ONNX model",
        description="Insert LoRA branches at the selected linear sites of an ONNX file (--method lora, the default; "
        "with --quant the frozen linear weights are stored quantized: QLoRA), or learned key/value prefixes at its "
        "attention sites (--method prefix), and write the rewritten model. Each LoRA site gains <site>.lora_A.weight "
        "[in, r] and <site>.lora_B.weight [r, out] (scale folded into B). With --init kaiming (the default) or "
        "gaussian, B starts at zero, so the LoRA branches add nothing until trained; the quantized weights of --quant, "
        "--init random and the prefixes of --method prefix change the outputs at once.",
    )
    p.add_argument("model", help="the input .onnx file")
    p.add_argument("-o", "--output", required=True, help="where to write the rewritten .onnx file")
    p.add_argument("--method", type=Method, choices=list(Method), default=Method.LORA,
                   help="which adapter to insert (default: lora)")
    # Method-specific options default to None (check_options fills in OPTIONS' defaults) so that one given to the
    # other method is refused instead of silently ignored: --method prefix --exclude-modules X would adapt X.
    p.add_argument("--r", type=int, default=None, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha; the scale is alpha / r (default: r)")
    p.add_argument("--target-modules", default=None,
                   help="comma-separated module names or suffixes (query,value), a regex, or all-linear; required "
                   "for lora; for prefix it selects attention sites (default: all)")
    p.add_argument("--exclude-modules", default=None,
                   help="lora: comma-separated names or suffixes, or a regex, to leave out of the LoRA targets and, "
                   "with --quant, out of quantization (kept in float)")
    p.add_argument("--use-rslora", action="store_true", help="scale by alpha / sqrt(r)")
    p.add_argument("--lora-dropout", type=float, default=None,
                   help="dropout on each LoRA branch's input while training (a Dropout node that inference skips; default 0)")
    p.add_argument("--init", choices=["kaiming", "gaussian", "random"], default=None,
                   help="initialisation of A and B (kaiming/gaussian keep B zero; random changes the outputs; default kaiming)")
    p.add_argument("--num-virtual-tokens", type=int, default=None,
                   help="prefix method: learned key/value prefix length T per attention site (default 16)")
    p.add_argument("--task-type", choices=TASK_TYPES, default=None,
                   help="PEFT's task_type, saved in the adapter config: PEFT applies prefixes only through a task's "
                   "PeftModel, and SEQ_CLS also trains the classification head in full (modules_to_save), as PEFT does "
                   "(default: for prefix, from the model class a dynamo export records; else none)")
    p.add_argument("--external-data", action="store_true", help="store the weights in <output>.data")
    p.add_argument("--quant", choices=["nf4", "int4", "int8"], default=None,
                   help="lora: store the frozen weights of the linear layers quantized (QLoRA): every linear layer but "
                   "the output layer (lm_head) and the --exclude-modules ones; nf4 runs them with MatMulBnb4, int4 with "
                   "MatMulNBits, int8 with DequantizeLinear (one scale per output channel) before a MatMul")
    # None, not 64: so that a block size given without --quant is refused rather than silently dropped.
    p.add_argument("--quant-block-size", type=int, default=None,
                   help="with --quant nf4/int4: weights per scale block (default 64); int8 has one scale per output "
                   "channel, no blocks")
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
        task_type=args.task_type, r=args.r, lora_alpha=args.lora_alpha if args.lora_alpha is not None else args.r,
        target_modules=_csv(args.target_modules), exclude_modules=_csv(args.exclude_modules),
        use_rslora=args.use_rslora, init_lora_weights=args.init, lora_dropout=args.lora_dropout,
    )
    from lora_fx.api import refuse_second_method

    refuse_second_method(model, config)  # before --quant changes the weights
    quant = None
    if getattr(args, "quant", None):  # QLoRA: quantize first, so the adapters attach to the quantized sites
        from lora_fx.config import QuantConfig
        from lora_fx.passes.onnx.quantize_weights import apply_quant

        block = getattr(args, "quant_block_size", None)
        block = 64 if block is None else block
        qconfig = QuantConfig(dtype=args.quant, block_size=block, double_quant=args.double_quant,
                              exclude_modules=_csv(args.exclude_modules))
        if config.modules_to_save:
            _refuse_quantized_heads(model, config, qconfig, args)
        quant = {"config": qconfig.to_dict(), "sites": apply_quant(model, qconfig, None).changed}
    apply_lora(model, config)
    summary = {"method": "lora", "config": config.to_dict(), "sites": lora_metadata(model)}
    if quant is not None:
        summary["quant"] = quant
    return summary


def _refuse_quantized_heads(model: Any, config: Any, qconfig: Any, args: argparse.Namespace) -> None:
    """--task-type SEQ_CLS trains the classification head in full (PEFT's modules_to_save), which needs float weights,
    and --quant's default selection (every linear layer but the output layer) would pack it. Refused before quantizing,
    with the CLI's way out: the LoRA pass would refuse it only afterwards, in the Python API's words (QuantConfig)."""
    import warnings

    import lora_fx
    from lora_fx.config import LoraConfig
    from lora_fx.errors import ConfigError, LoraFxError
    from lora_fx.passes.onnx.find_sites import module_tree
    from lora_fx.passes.onnx.freeze_base import saved_module_paths
    from lora_fx.targeting import select_modules_to_save

    heads = select_modules_to_save(config, saved_module_paths(model))
    selector = LoraConfig(r=1, target_modules=qconfig.target_modules, exclude_modules=qconfig.exclude_modules)
    try:
        with warnings.catch_warnings():  # the quantization pass says its selection's warnings itself
            warnings.simplefilter("ignore")
            packed = [t.site.name for t in lora_fx.select_targets(lora_fx.find_sites(model), selector,
                                                                   modules=module_tree(model))]
    except LoraFxError:
        return  # the quantization pass reports its own selection errors
    hit = sorted(n for n in packed if any(n == h or n.startswith(f"{h}.") for h in heads))
    if not hit:
        return
    given = _csv(args.exclude_modules)
    if isinstance(given, str):  # a regex: the user's to extend
        way = f"an --exclude-modules regex that also matches {', '.join(heads)}"
    else:
        way = "--exclude-modules " + ",".join((given or []) + [h for h in heads if h not in (given or [])])
    raise ConfigError(
        f"--task-type {args.task_type} trains {', '.join(heads)} in full (as PEFT does), which needs float weights, "
        f"but --quant {args.quant} would store {', '.join(hit[:4])} quantized; keep it in float with {way}"
    )


def _rewrite_prefix(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    import json

    import lora_fx
    from lora_fx.config import PrefixConfig
    from lora_fx.passes.onnx.insert_prefix import PREFIX_CONFIG_KEY, prefix_metadata

    config = PrefixConfig(num_virtual_tokens=args.num_virtual_tokens, target_modules=_csv(args.target_modules),
                          task_type=args.task_type)
    lora_fx.apply(model, config)  # with the task type the file's model class gives, and its head for SEQ_CLS
    record = prefix_metadata(model)
    applied = model.metadata_props.get(PREFIX_CONFIG_KEY)
    return {"method": "prefix", "config": json.loads(applied) if applied else config.to_dict(), "sites": record["sites"]}


# One entry per --method; later methods (prefix, quantized bases) register here.
METHODS: dict[Method, Callable[[Any, argparse.Namespace], dict[str, Any]]] = {
    Method.LORA: _rewrite_lora, Method.PREFIX: _rewrite_prefix,
}


# Options of one method: (flag, default). A given one is not None (or not False, for switches).
OPTIONS: dict[Method, dict[str, tuple[str, Any]]] = {
    Method.LORA: {"r": ("--r", 8), "lora_alpha": ("--lora-alpha", None), "exclude_modules": ("--exclude-modules", None),
                  "use_rslora": ("--use-rslora", False), "lora_dropout": ("--lora-dropout", 0.0),
                  "init": ("--init", "kaiming")},
    Method.PREFIX: {"num_virtual_tokens": ("--num-virtual-tokens", 16)},
}


def check_options(args: argparse.Namespace) -> None:
    """Refuse options the chosen method would silently ignore (the user asked for something not done), then
    fill in the chosen method's defaults."""
    from lora_fx.errors import ConfigError

    method = Method(args.method)
    for other, options in OPTIONS.items():
        given = [flag for name, (flag, _) in options.items() if getattr(args, name, None) is not None
                 and getattr(args, name) is not False]  # `in (None, False)` would let 0 through as False
        if other is not method and given:
            raise ConfigError(f"{', '.join(given)}: options of --method {other}, not of {method}; drop them or use --method {other}")
    for name, (_, default) in OPTIONS[method].items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    quant = getattr(args, "quant", None)
    if quant and method is not Method.LORA:
        raise ConfigError(f"--quant {quant} quantizes the weights under LoRA branches (QLoRA); it goes with --method lora")
    if quant == "int8" and getattr(args, "quant_block_size", None) is not None:
        raise ConfigError("--quant-block-size: --quant int8 stores one scale per output channel (DequantizeLinear on "
                          "axis 0), not per block; drop --quant-block-size or use --quant nf4|int4")
    if not quant:
        given = [flag for flag, on in (("--double-quant", getattr(args, "double_quant", False)),
                                       ("--quant-block-size", getattr(args, "quant_block_size", None) is not None)) if on]
        if given:
            raise ConfigError(f"{' and '.join(given)} only apply with --quant (how it stores weights); add --quant nf4|int4|int8 or drop them")


def rewrite(args: argparse.Namespace) -> dict[str, Any]:
    import lora_fx
    from lora_fx.errors import ConfigError
    from lora_fx.files import check_output
    from lora_fx.onnx_model import check_not_external_data

    src, dst = Path(args.model), Path(args.output)
    if src.resolve() == dst.resolve():
        raise ConfigError(f"-o {dst} is the input file; write the rewritten model to a new path")
    check_options(args)
    check_output(dst)  # before the rewrite: a path that cannot be written is found now, not after the work
    model = lora_fx.load(src)
    external_data = True if args.external_data else None
    # Now that the files the input reads are known, before the rewrite: the output's .onnx or .data must not replace them.
    check_not_external_data(model, dst, external_data=external_data, source=src)
    summary = METHODS[Method(args.method)](model, args)
    lora_fx.save(model, dst, external_data=external_data)
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
