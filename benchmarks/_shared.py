"""What every benchmark does the same way: ratios paired per round, the machine and versions it ran on,
and writing its JSON and Markdown together. Not a benchmark itself (no ``python -m`` entry point)."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

from lora_fx.report import json_text, paired_ratios, quartiles  # noqa: F401  (the benchmarks' ratios are the compare report's)

RESULTS = Path(__file__).resolve().parent / "results"
# (distribution, module): the module's __version__ answers where the distribution has another name
# (onnxruntime ships as onnxruntime-gpu, ort-nightly, ...).
PACKAGES = (("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"), ("onnx", "onnx"),
            ("onnx-ir", "onnx_ir"), ("onnxscript", "onnxscript"), ("onnxruntime", "onnxruntime"), ("lora-fx", "lora_fx"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _version(dist: str, module: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return getattr(importlib.import_module(module), "__version__", None)
    except ImportError:
        return None


def environment() -> dict[str, Any]:
    """The machine and the versions a result was measured with."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "versions": {dist: _version(dist, module) for dist, module in PACKAGES},
    }


def write_results(out: Path, stem: str, result: dict[str, Any], render: Callable[[dict[str, Any]], str]) -> str:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out``; returns the Markdown.

    The Markdown is rendered from the JSON as written (tuples become lists, NaN becomes null), before either file
    is replaced: a rendering error leaves the previous pair in place, and ``--render``-style regeneration from the
    JSON gives the same text.
    """
    from lora_fx.files import atomic_write_text

    text = json_text(result)
    md = render(json.loads(text))
    out = Path(out)
    atomic_write_text(out / f"{stem}.json", text)
    atomic_write_text(out / f"{stem}.md", md)
    log(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return md


def provenance_lines(result: dict[str, Any]) -> list[str]:
    """Markdown lines naming the versions (and a quick run as such); none for results saved before ``env`` was."""
    env = result.get("env") or {}
    lines = []
    if result.get("quick"):
        lines.append("**Quick smoke run** (few repetitions): it checks that the benchmark runs; do not quote its numbers.")
    if env.get("versions"):
        versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
        lines.append(f"Measured {env.get('date', '')} with Python {env.get('python')}; {versions}.")
    return lines + [""] if lines else []
