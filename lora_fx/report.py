"""Pieces of the compare report: graph statistics, added FLOPs, paired timing ratios, site drawings, plots, Markdown.

Pure functions over graphs and numbers; ``lora_fx.compare`` runs the methods and calls these.
"""

from __future__ import annotations

import collections
import json
import math
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any, Iterable, Sequence

from lora_fx.files import atomic_path, atomic_write_text


# ---- graph statistics ------------------------------------------------------------------------------
def fx_op_counts(gm: Any) -> collections.Counter:
    """Count call_function nodes of a GraphModule by op name (``aten.linear``, ``aten.cat``...)."""
    counts: collections.Counter = collections.Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            counts[_op_name(node.target)] += 1
        elif node.op == "get_attr":
            counts["get_attr"] += 1
    return counts


def onnx_op_counts(model: Any) -> collections.Counter:
    """Count the nodes of an onnx_ir Model (main graph and subgraphs) by ``domain::op_type``."""
    import onnx_ir as ir

    counts: collections.Counter = collections.Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        counts[f"{node.domain}::{node.op_type}" if node.domain else node.op_type] += 1
    return counts


def nodes_added(before: collections.Counter, after: collections.Counter) -> dict[str, int]:
    """Op types whose count changed, with the difference (negative = removed)."""
    keys = set(before) | set(after)
    return {k: after[k] - before[k] for k in sorted(keys) if after[k] != before[k]}


def _op_name(target: Any) -> str:
    name = getattr(target, "__name__", None) or str(target)
    overload = getattr(target, "_overloadpacket", None)
    if overload is not None:
        return f"{getattr(target, 'namespace', 'aten')}.{overload.__name__}"
    return name


# ---- FLOPs -----------------------------------------------------------------------------------------
def lora_flops_per_token(shapes: Iterable[tuple[int, int, int]], elementwise: bool = True) -> int:
    """FLOPs a LoRA branch adds per token: ``x@A`` (2*in*r), ``@B`` (2*r*out), and the scale and add (2*out).

    ``shapes`` yields ``(in_features, out_features, r)`` per adapted site.
    """
    return sum(2 * r * (i + o) + (2 * o if elementwise else 0) for i, o, r in shapes)


def prefix_flops_per_token(attention: Iterable[tuple[int, int]], virtual_tokens: int) -> int:
    """FLOPs prefix-tuning adds per query token: each head attends to T more keys (scores and values).

    ``attention`` yields ``(num_heads, head_dim)`` per attention site.
    """
    return sum(2 * 2 * h * d * virtual_tokens for h, d in attention)


# ---- timing ----------------------------------------------------------------------------------------
def quartiles(values: Sequence[float]) -> dict[str, float]:
    """Median and interquartile range of ``values`` (quartiles interpolated between the sorted values), and n."""
    values = sorted(values)
    if not values:
        raise ValueError("no values to summarize")
    if len(values) == 1:
        return {"median": values[0], "q1": values[0], "q3": values[0], "n": 1}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "n": len(values)}


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float]:
    """``numerator[i] / denominator[i]`` for each round i (both timed in that round), summarized by ``quartiles``.

    Pairing within a round cancels the load other processes put on the machine at that moment; a ratio of two
    medians taken over different moments does not.
    """
    if len(numerator) != len(denominator):
        raise ValueError(f"unpaired times: {len(numerator)} against {len(denominator)}")
    return quartiles([a / b for a, b in zip(numerator, denominator)])


def json_text(obj: Any) -> str:
    """``obj`` as strict JSON: non-finite floats (which JSON does not have) written as null."""
    return json.dumps(_finite(obj), indent=2, allow_nan=False, default=str)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ---- drawings -------------------------------------------------------------------------------------
def fx_site_dot(gm: Any, site_name: str, title: str, radius: int = 2) -> str:
    """DOT text of the nodes belonging to one site's module (plus ``radius`` hops around them)."""
    nodes = [n for n in gm.graph.nodes if _belongs(n, site_name)]
    keep = set(nodes)
    frontier = set(nodes)
    for _ in range(radius):
        nxt = set()
        for n in frontier:
            nxt.update(a for a in n.all_input_nodes)
            nxt.update(n.users)
        keep |= nxt
        frontier = nxt
    keep = [n for n in gm.graph.nodes if n in keep]
    lines = [f'digraph "{title}" {{', "  rankdir=TB;", f'  label="{title}"; labelloc=t;', '  node [shape=box, fontname="Helvetica", fontsize=10];']
    for n in keep:
        label = _op_name(n.target) if n.op == "call_function" else (f"{n.op}\\n{n.target}" if n.op == "get_attr" else n.op)
        style = ', style=filled, fillcolor="#ffe9a8"' if n.meta.get("lora_fx_inserted") or (n.op == "get_attr" and ("lora_" in str(n.target) or "prefix" in str(n.target))) else ""
        lines.append(f'  "{n.name}" [label="{label}"{style}];')
    ids = set(keep)
    for n in keep:
        for a in n.all_input_nodes:
            if a in ids:
                lines.append(f'  "{a.name}" -> "{n.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _belongs(node: Any, site_name: str) -> bool:
    if node.op == "get_attr":
        return str(node.target).startswith(site_name + ".")
    stack = node.meta.get("nn_module_stack") or {}
    return bool(stack) and list(stack.values())[-1][0] == site_name


def render_dot(dot_text: str, path: Path) -> Path:
    """Write ``path.dot``; also ``path.png`` when Graphviz's ``dot`` is installed. Returns what was made."""
    path = Path(path)
    dot_path = path.with_suffix(".dot")
    atomic_write_text(dot_path, dot_text)
    exe = shutil.which("dot")
    if exe is None:
        return dot_path
    png = path.with_suffix(".png")
    with atomic_path(png) as tmp:
        subprocess.run([exe, "-Tpng", str(dot_path), "-o", str(tmp)], check=True, capture_output=True, timeout=60)
    return png


# ---- plots -----------------------------------------------------------------------------------------
def plot_losses(curves: dict[str, Sequence[float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("Training loss, same budget and seed")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def plot_bars(values: dict[str, float], path: Path, ylabel: str, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(values)
    bars = ax.bar(names, [values[n] for n in names], color="#4c78a8")
    ax.bar_label(bars, fmt="%.3g")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


# ---- Markdown ---------------------------------------------------------------------------------------
def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """``columns`` = (key, header). Floats get 4 significant digits, ints thousands separators; a missing or
    non-finite number is a dash."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, int):
            return f"{v:,}"
        if isinstance(v, float):
            return f"{v:.4g}" if math.isfinite(v) else "–"
        if v is None:
            return "–"
        return str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])
