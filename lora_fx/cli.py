"""The ``lora-fx`` command line. Each subcommand lives in ``lora_fx/commands/<name>.py``.

Every subcommand has ``--help``; ``--json`` prints machine-readable output; errors print one clear
message to stderr and exit non-zero (no traceback unless ``LORA_FX_DEBUG=1``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Sequence

from lora_fx.errors import LoraFxError

# Subcommand modules, in the order --help lists them. Each defines add_parser(subparsers) and run(args) -> int.
COMMANDS = ["sites", "rewrite", "train", "export", "run", "compare", "demo"]


def build_parser() -> argparse.ArgumentParser:
    from lora_fx import __version__

    parser = argparse.ArgumentParser(
        prog="lora-fx",
        description="Parameter-efficient fine-tuning as graph rewriting: find linear/attention sites of a "
        "torch model or ONNX file and rewrite them into LoRA subgraphs.",
    )
    parser.add_argument("--version", action="version", version=f"lora-fx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"lora_fx.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"lora_fx.commands.{name}":
                continue  # not built yet
            raise
        module.add_parser(sub)
    return parser


def fail(message: str, code: int = 2) -> int:
    print(f"lora-fx: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (LoraFxError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        if os.environ.get("LORA_FX_DEBUG"):
            raise
        return fail(str(exc))
    except KeyboardInterrupt:
        return fail("interrupted", 130)


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
