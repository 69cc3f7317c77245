"""How find_sites + insert_lora scale with model depth on synthetic ONNX transformers.

Builds transformer-shaped ONNX graphs of 25, 100 and 400 layers (tiny widths; per layer q/k/v/o
projections with biases, a decomposed attention, an MLP: 6 linear sites and 1 attention site, named
the way the TorchScript exporter names nodes), then times ``find_sites`` and LoRA insertion at every
linear site (``all-linear``). Seconds per site should stay flat (linear total cost); the 400-layer
total is the number a user waits for on a deep model.

    python -m benchmarks.rewrite_scaling [--layers 25 100 400] [--repeats 3] [--out DIR] [--quick]

Writes ``benchmarks/results/rewrite_scaling.json`` and ``.md`` (``--out DIR`` elsewhere). ``--quick``
(25 and 100 layers, one run each) writes nothing unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from benchmarks._shared import environment, log, provenance_lines, write_results

RESULTS = Path(__file__).parent / "results"
WIDTH = 16


def build(layers: int, width: int = WIDTH, seed: int = 0) -> ir.Model:
    """A synthetic transformer: ``layers`` blocks of attention (q, k, v, o) and MLP (up, down)."""
    rng = np.random.default_rng(seed)
    f32 = ir.DataType.FLOAT
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 18}, name=f"synthetic_{layers}")
    x = ir.Value(name="x", shape=ir.Shape(["batch", "seq", width]), type=ir.TensorType(f32))
    graph.inputs.append(x)

    def const(name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(f32), const_value=ir.Tensor(array, name=name))
        graph.register_initializer(value)
        return value

    def op(op_type: str, inputs: list, name: str, **attrs) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attrs or None, name=name)
        graph.append(node)
        node.outputs[0].name = f"{name}_output_0"
        return node.outputs[0]

    scale = const("scale", np.array(1.0 / np.sqrt(width), np.float32))
    h = x
    for i in range(layers):
        def linear(inp: ir.Value, mod: str, n_in: int, n_out: int) -> ir.Value:
            w = const(f"onnx::MatMul_{mod}", (rng.standard_normal((n_in, n_out)) * 0.1).astype(np.float32))
            b = const(f"{mod}.bias", np.zeros(n_out, np.float32))
            path = "/" + mod.replace(".", "/").replace("/layers/", "/layers.").replace("layers/", "layers.")
            y = op("MatMul", [inp, w], f"{path}/MatMul")
            return op("Add", [y, b], f"{path}/Add")

        pre = f"model.layers.{i}"
        q = linear(h, f"{pre}.attn.q_proj", width, width)
        k = linear(h, f"{pre}.attn.k_proj", width, width)
        v = linear(h, f"{pre}.attn.v_proj", width, width)
        base = f"/model/layers.{i}/attn"
        kt = op("Transpose", [k], f"{base}/Transpose", perm=[0, 2, 1])
        s = op("MatMul", [q, kt], f"{base}/MatMul")
        s = op("Mul", [s, scale], f"{base}/Mul")
        p = op("Softmax", [s], f"{base}/Softmax", axis=-1)
        a = op("MatMul", [p, v], f"{base}/MatMul_1")
        o = linear(a, f"{pre}.attn.o_proj", width, width)
        h = op("Add", [h, o], f"/model/layers.{i}/Add")
        up = linear(h, f"{pre}.mlp.up_proj", width, 2 * width)
        act = op("Relu", [up], f"/model/layers.{i}/mlp/act/Relu")
        down = linear(act, f"{pre}.mlp.down_proj", 2 * width, width)
        h = op("Add", [h, down], f"/model/layers.{i}/Add_1")
    graph.outputs.append(h)
    return ir.Model(graph, ir_version=10, producer_name="lora_fx.benchmarks")


def measure(layers: int, repeats: int) -> dict:
    import lora_fx
    from lora_fx.api import _gc_paused
    from lora_fx.passes.onnx.find_sites import find_sites
    from lora_fx.passes.onnx.insert_lora import InsertLora
    from lora_fx.targeting import select_targets

    config = lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    best = None
    for _ in range(repeats):
        model = build(layers)
        # as lora_fx.apply runs it: with the cyclic GC paused (see lora_fx.api._gc_paused)
        with _gc_paused():
            w0, c0 = time.perf_counter(), time.process_time()
            sites = find_sites(model)
            w1, c1 = time.perf_counter(), time.process_time()
            result = InsertLora(select_targets(sites, config), config.init_lora_weights)(model)
            w2, c2 = time.perf_counter(), time.process_time()
        n_linear = sum(s.kind.value == "linear" for s in sites)
        assert n_linear == 6 * layers and len(sites) == 7 * layers and len(result.changed) == n_linear
        run = {"find_sites_s": w1 - w0, "insert_lora_s": w2 - w1, "total_s": w2 - w0, "total_cpu_s": c2 - c0}
        if best is None or run["total_s"] < best["total_s"]:
            best = run
    n_sites = 6 * layers
    return {
        "layers": layers, "linear_sites": n_sites, "attention_sites": layers, "nodes_before": len(build(layers).graph),
        **{k: round(v, 4) for k, v in best.items()},
        "seconds_per_site": round(best["total_s"] / n_sites, 7),
        "cpu_seconds_per_site": round(best["total_cpu_s"] / n_sites, 7),
    }


def to_markdown(result: dict) -> str:
    lines = [
        "# rewrite_scaling: find_sites + insert_lora (all-linear) on synthetic ONNX transformers",
        "",
        f"Width {result['width']}, 6 linear sites and 1 attention site per layer; best of {result['repeats']} runs; "
        f"{result['machine']}; machine load average at start {result['load_average']} on {result['cpus']} CPUs "
        "(wall times include other processes' share; CPU time is this process's own).",
        "",
        "| layers | linear sites | nodes | find_sites (s) | select + insert_lora (s) | total wall (s) | total CPU (s) | wall / site | CPU / site |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        lines.append(f"| {r['layers']} | {r['linear_sites']} | {r['nodes_before']} | {r['find_sites_s']:.4f} | "
                     f"{r['insert_lora_s']:.4f} | {r['total_s']:.4f} | {r['total_cpu_s']:.4f} | {r['seconds_per_site'] * 1e3:.3f} ms | "
                     f"{r['cpu_seconds_per_site'] * 1e3:.3f} ms |")
    runs = result["runs"]
    summary = ""
    if result.get("total_400_s") is not None:
        summary += f"400 layers: {result['total_400_s']} s wall, {result['total_400_cpu_s']} s CPU (target: under 2 s). "
    if len(runs) > 1:
        summary += (f"Per-site cost ratio {runs[-1]['layers']} vs {runs[0]['layers']} layers: {result['per_site_ratio']:.2f} "
                    "(1.0 = linear scaling).")
    lines += ["", summary, ""] + provenance_lines(result)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[25, 100, 400])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for rewrite_scaling.json and .md (default: benchmarks/results; --quick: none)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (seconds): 25 and 100 layers, one run each; printed, not saved unless --out is given")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.repeats = [25, 100], 1
    if any(n < 1 for n in args.layers) or args.repeats < 1:
        parser.error("--layers and --repeats must be at least 1")
    out_dir = args.out if args.out is not None else (None if args.quick else RESULTS)
    runs = []
    for n in sorted(args.layers):
        log(f"{n} layers: build, find_sites, insert_lora ({args.repeats} run(s))")
        runs.append(measure(n, args.repeats))
        log(f"{n} layers: {runs[-1]['total_s']:.3f} s, {runs[-1]['seconds_per_site'] * 1e3:.3f} ms per site")
    result = {
        "benchmark": "rewrite_scaling", "width": WIDTH, "repeats": args.repeats,
        "machine": f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}, "
                   f"onnx_ir {ir.__version__}",
        "runs": runs,
        "load_average": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        "total_400_s": next((r["total_s"] for r in runs if r["layers"] == 400), None),
        "total_400_cpu_s": next((r["total_cpu_s"] for r in runs if r["layers"] == 400), None),
        "per_site_ratio": runs[-1]["seconds_per_site"] / runs[0]["seconds_per_site"],
        "quick": args.quick, "env": environment(),
    }
    print(write_results(out_dir, "rewrite_scaling", result, to_markdown) if out_dir is not None else to_markdown(result))
    return result


if __name__ == "__main__":
    main()
