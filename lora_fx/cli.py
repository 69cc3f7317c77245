"""The ``lora-fx`` command line. Each subcommand lives in ``lora_fx/commands/<name>.py``.

Every subcommand has ``--help``; ``--json`` prints machine-readable output; errors print one clear
message to stderr and exit non-zero (no traceback unless ``LORA_FX_DEBUG=1``): 2 for bad input
(``LoraFxError``, or an ``OSError`` naming a path), 130 when interrupted, 1 for any other exception (a bug).
The error goes to stderr, with or without ``--json``. Output piped into a reader that stops early
(``lora-fx sites --json | head -1``) ends quietly with 141, as a Unix tool killed by SIGPIPE does.

This module imports nothing heavy (``lora_fx`` loads its public names on first use), so Ctrl-C is handled from
the moment ``main`` starts, before a command imports torch or onnx (seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import select
import sys
import warnings
from pathlib import Path
from typing import Iterator, Sequence

from lora_fx.errors import LoraFxError

# Subcommand modules, in the order --help lists them. Each defines add_parser(subparsers) and run(args) -> int.
COMMANDS = ["sites", "rewrite", "train", "export", "run", "compare", "demo"]


def build_parser() -> argparse.ArgumentParser:
    from lora_fx import __version__

    parser = argparse.ArgumentParser(
        prog="lora-fx",
        description="Parameter-efficient fine-tuning as graph rewriting: find the linear/attention sites of a "
        "torch model or ONNX file, rewrite them into LoRA (optionally over a quantized W: QLoRA) or prefix-tuning "
        "subgraphs, train through the graph and export for ONNX Runtime.",
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


@contextlib.contextmanager
def _warnings_as_cli_lines() -> Iterator[None]:
    """lora_fx's own warnings as ``lora-fx: warning: ...`` lines, as errors print, rather than Python's
    ``file:line: UserWarning: ...`` with the source line under it; other libraries' keep their form.
    ``formatwarning`` rather than ``showwarning``: a caller recording warnings (pytest) still gets them."""
    original = warnings.formatwarning
    roots = [str(Path(p).resolve()) + os.sep for p in _package_dirs()]

    def formatwarning(message, category, filename, lineno, line=None):  # noqa: ANN001 - warnings' signature
        if any(str(Path(filename).resolve()).startswith(r) for r in roots):
            text = " ".join(str(message).split())
            kind = "" if category is UserWarning else f"{category.__name__}: "
            return f"lora-fx: warning: {kind}{text}\n"
        return original(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning
    try:
        yield
    finally:
        warnings.formatwarning = original


def _package_dirs() -> list[str]:
    import lora_fx
    import lora_fx.passes
    import lora_fx.runtime

    return [*lora_fx.__path__, *lora_fx.passes.__path__, *lora_fx.runtime.__path__]


# What a shell reports for a command killed by SIGPIPE (128 + 13): a reader that stopped early is no error of the
# user's (2) nor a bug (1), and the output was cut short, so not 0 either.
EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    """The ``lora-fx`` console script. Ctrl-C anywhere, while the parser loads the subcommands or a command
    imports torch, is one line and exit 130; a reader that closed the pipe on stdout, exit 141 and no message."""
    try:
        try:
            return _main(argv)
        finally:
            # What stdout still buffers, written here, where a closed pipe is caught (--help too, which exits by
            # SystemExit), not at interpreter exit ("Exception ignored ... BrokenPipeError", exit 120).
            sys.stdout.flush()
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        with _warnings_as_cli_lines():
            return int(args.func(args) or 0)
    except BrokenPipeError as exc:
        if _stdout_closed():
            raise  # main's: the reader went away
        return _user_error(exc)  # another pipe (a training process's): an OSError like any other
    # OSError: a file or folder the user named could not be read or written (exists, is a file, disk full,
    # read-only): its message names the path. FloatingPointError: training diverged (runtime.train says so).
    except (LoraFxError, OSError, FloatingPointError) as exc:
        return _user_error(exc)
    except Exception as exc:  # noqa: BLE001 - a bug: still one line, not a traceback from deep inside torch or onnx
        if os.environ.get("LORA_FX_DEBUG"):
            raise
        text = " ".join(str(exc).split())
        return fail(f"internal error, {type(exc).__name__}: {text[:500]}{'...' if len(text) > 500 else ''} (a bug in "
                    f"lora-fx: rerun with LORA_FX_DEBUG=1 for the traceback and report it)", 1)


def _user_error(exc: BaseException) -> int:
    """Bad input: its message and exit 2 (the traceback with LORA_FX_DEBUG=1)."""
    if os.environ.get("LORA_FX_DEBUG"):
        raise exc
    return fail(str(exc))


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone: a flush of what is still buffered fails, or (nothing
    buffered) poll reports the error POSIX gives a pipe with no reader."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):  # closed, or no real stream
        return False
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or a stdout with no file descriptor
        return False


def _silence_stdout() -> None:
    """Point stdout at devnull (Python's documented recipe for SIGPIPE): what is still buffered would fail again
    when the interpreter flushes at exit, printing "Exception ignored ... BrokenPipeError" and exiting 120."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # a stdout with no file descriptor (a test's capture)
        pass


def print_json(obj: object) -> None:
    # Strict JSON: json.dumps would write NaN / Infinity, which JSON does not have (JSON.parse, jq --seq and
    # strict parsers refuse the whole document); a NaN output statistic is written as null instead.
    from lora_fx.report import json_text

    print(json_text(obj))


if __name__ == "__main__":
    sys.exit(main())
