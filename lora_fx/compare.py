"""``lora-fx compare``: one base, one task, several methods, the same budget and seed, side by side.

Each method trains in a fresh subprocess so its peak resident memory is its own. The parent then
times every exported model in ONNX Runtime in rounds of one call per model, in a rotating order; a
model's latency ratio to the plain base is the median of its per-round ratios (with the interquartile
range), so load from other processes hits both sides of a ratio alike. Output: ``report.md``,
``report.json``, PNG plots and per-method site drawings. A method that fails does not take the others
with it: the report is written with the methods that finished and names the one that failed, and
``compare`` then raises.
"""

from __future__ import annotations

import enum
import multiprocessing as mp
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_fx.enums import parse_enum
from lora_fx.errors import ConfigError, LoraFxError
from lora_fx.files import atomic_write_text


class Method(enum.Enum):
    LORA = "lora"
    QLORA_NF4 = "qlora-nf4"
    QLORA_INT4 = "qlora-int4"
    QLORA_INT8 = "qlora-int8"
    PREFIX = "prefix"

    @classmethod
    def parse_list(cls, text: str | list[str]) -> list["Method"]:
        names = text.split(",") if isinstance(text, str) else list(text)
        out = []
        for name in (n.strip() for n in names if n.strip()):
            method = parse_enum(cls, name, f"unknown method {name!r}; choose from {', '.join(m.value for m in cls)}")
            if method in out:  # both would train into the same folder and share one latency label
                raise ConfigError(f"method {method.value!r} is listed twice; list each method once")
            out.append(method)
        if not out:
            raise ConfigError("no methods given")
        return out

    @property
    def quant_dtype(self) -> str | None:
        return self.value.split("-", 1)[1] if self.value.startswith("qlora-") else None


@dataclass
class CompareConfig:
    hf_dir: str
    out_dir: str = "report"
    methods: list[Method] = field(default_factory=lambda: [Method.LORA, Method.QLORA_NF4, Method.PREFIX])
    data: str | None = None  # JSONL {"text","label","split"}; None = the shipped tense set
    label_prompts: list[str] | None = None
    steps: int = 60
    lr: float = 2e-3
    seed: int = 0
    r: int = 8
    lora_alpha: float = 16
    target_modules: str | list[str] = "all-linear"
    num_virtual_tokens: int = 16
    max_length: int = 32
    batch_size: int = 16
    latency_runs: int = 30
    export: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = [m.value for m in self.methods]
        return d


def _task(cfg: CompareConfig):
    from lora_fx.tasks import LABEL_PROMPTS, TenseTask

    prompts = tuple(cfg.label_prompts or LABEL_PROMPTS)
    return TenseTask.from_model_dir(cfg.hf_dir, max_length=cfg.max_length, batch_size=cfg.batch_size, data=cfg.data, label_prompts=prompts)


def _rss_mb() -> float:
    """Peak resident memory in MiB (Linux reports ru_maxrss in KiB; the key peak_rss_mb keeps its old name)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _adapter_config(cfg: CompareConfig, method: Method):
    import lora_fx

    if method is Method.PREFIX:
        return lora_fx.PrefixConfig(num_virtual_tokens=cfg.num_virtual_tokens), None
    lora = lora_fx.LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=cfg.target_modules)
    quant = lora_fx.QuantConfig(dtype=method.quant_dtype) if method.quant_dtype else None
    return lora, quant


def run_method(cfg_dict: dict[str, Any], method_value: str) -> dict[str, Any]:
    """Train one method in this process and export it; returns its measurements (JSON-able)."""
    import torch

    import lora_fx
    from lora_fx.hf import load_hf_model
    from lora_fx.report import fx_op_counts, fx_site_dot, lora_flops_per_token, nodes_added, prefix_flops_per_token, render_dot
    from lora_fx.sites import SiteKind
    from lora_fx.tasks import model_inputs

    cfg = CompareConfig(**{**cfg_dict, "methods": Method.parse_list(cfg_dict["methods"])})
    method = Method(method_value)
    say = _progress(method)
    out = Path(cfg.out_dir) / method.value
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    task = _task(cfg)
    model = load_hf_model(cfg.hf_dir)
    example = task.example()
    say("capture with torch.export, rewrite")
    gm = lora_fx.capture(model, kwargs=example)
    sites = lora_fx.find_sites(gm)
    before_ops = fx_op_counts(gm)
    config, quant = _adapter_config(cfg, method)
    if method is Method.PREFIX:
        attn = [s for s in sites if s.kind is SiteKind.ATTENTION]
        flops = prefix_flops_per_token([(s.num_heads or 0, s.head_dim or 0) for s in attn], cfg.num_virtual_tokens)
        drawn = attn[0].name
    else:
        targets = lora_fx.select_targets(sites, config)
        flops = lora_flops_per_token([(t.site.in_features, t.site.out_features, t.r) for t in targets])
        drawn = targets[0].site.name
    # The "before" drawing is made before apply rewrites the graph in place (a second capture cost seconds a method).
    before_dot = fx_site_dot(gm, drawn, f"{drawn} before")
    lora_fx.apply(gm, config, quant=quant)
    after_ops = fx_op_counts(gm)
    drawings = {
        "before": str(render_dot(before_dot, out / "site_before")),
        "after": str(render_dot(fx_site_dot(gm, drawn, f"{drawn} after {method.value}"), out / "site_after")),
    }

    def forward(batch):
        return gm(**model_inputs(batch))["last_hidden_state"]

    acc_before = task.accuracy(forward)
    step_times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step: int, loss: float) -> None:
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    rss_before = _rss_mb()
    say(f"train {cfg.steps} steps")
    result = lora_fx.train(gm, task.batches("train", seed=cfg.seed), task.loss_fn, steps=cfg.steps, lr=cfg.lr, seed=cfg.seed, on_step=on_step, progress=False)
    rss_peak = _rss_mb()
    acc_after = task.accuracy(forward)
    adapter_dir = lora_fx.save_adapter(gm, out / "adapter")
    adapter_bytes = sum(p.stat().st_size for p in Path(adapter_dir).iterdir() if p.is_file())
    exported: dict[str, str] = {}
    if cfg.export:
        say("export to ONNX" + (" (adapter slots, merged)" if method is Method.LORA else " (adapter slots)"))
        slot = lora_fx.export_onnx(gm, out / "model.onnx", kwargs=example, mode="adapters")
        exported["adapters"] = str(slot.model_path)
        exported["adapter_file"] = str(slot.adapter_paths[0]) if slot.adapter_paths else ""
        if method is Method.LORA:
            exported["merged"] = str(lora_fx.export_onnx(gm, out / "merged.onnx", kwargs=example, mode="merged").model_path)
    return {
        "method": method.value,
        "trainable_parameters": result.trainable_parameters,
        "adapter_file_bytes": adapter_bytes,
        "nodes_added": nodes_added(before_ops, after_ops),
        "flops_per_token_added": flops,
        "median_step_seconds": statistics.median(step_times[1:] or step_times),
        "peak_rss_mb": rss_peak,
        "rss_before_training_mb": rss_before,
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "losses": result.losses,
        "final_loss": result.final_loss,
        "drawings": drawings,
        "exported": exported,
        "adapter_dir": str(adapter_dir),
    }


def _progress(method: Method) -> Any:
    def say(what: str) -> None:
        print(f"      {method.value}: {what}", file=sys.stderr, flush=True)

    return say


def _child(cfg_dict: dict[str, Any], method: str, queue: Any) -> None:
    try:
        queue.put(("ok", run_method(cfg_dict, method)))
    except LoraFxError as exc:
        queue.put(("error", f"{type(exc).__name__}: {exc}"))
    except Exception as exc:  # report, don't hang the parent
        import os
        import traceback

        # The traceback only where the CLI would show one (LORA_FX_DEBUG): users get the one-line error.
        where = f"\n{traceback.format_exc(limit=6)}" if os.environ.get("LORA_FX_DEBUG") else ""
        queue.put(("error", f"{type(exc).__name__}: {exc}{where}"))


def _run_isolated(cfg: CompareConfig, method: Method) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(cfg.to_dict(), method.value, queue))
    proc.start()
    status, payload = _collect(proc, queue)
    if status != "ok":
        raise LoraFxError(f"method {method.value} failed: {payload}")
    return payload


def _collect(proc: Any, queue: Any) -> tuple[str, Any]:
    """The child's report, and the child ended whatever happens while waiting (Ctrl-C, an error here): a
    training process left running after its parent stopped keeps the CPUs and memory busy for minutes."""
    try:
        result = _result_of(proc, queue)
        # A child that has reported exits by itself: let it, so it releases what it holds (terminated while
        # exiting, it leaves a semaphore the resource tracker warns about at the parent's exit).
        proc.join(timeout=30)
        return result
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        proc.join()


def _result_of(proc: Any, queue: Any) -> tuple[str, Any]:
    """The child's report; a child killed before it could send one (out of memory, a signal) is an error
    rather than a parent waiting on the queue forever."""
    import queue as queue_module

    while True:
        try:
            return queue.get(timeout=1.0)
        except queue_module.Empty:
            if not proc.is_alive():
                try:  # it may have reported just before exiting
                    return queue.get(timeout=1.0)
                except queue_module.Empty:
                    return "error", (f"its training process ended with exit code {proc.exitcode} without a result "
                                     "(killed by a signal, or out of memory?); see the kernel log (dmesg), or compare a smaller model")


def _base_onnx(cfg: CompareConfig) -> Path:
    import lora_fx
    from lora_fx.hf import load_hf_model

    task = _task(cfg)
    gm = lora_fx.capture(load_hf_model(cfg.hf_dir), kwargs=task.example())
    return Path(lora_fx.export_onnx(gm, Path(cfg.out_dir) / "base.onnx", kwargs=task.example(), mode="merged").model_path)


def measure_latency(models: dict[str, tuple[str, str | None]], feeds: dict[str, Any], runs: int,
                    base: str | None = "base") -> dict[str, Any]:
    """ONNX Runtime latency of each model, timed in ``runs`` rounds of one call per model (the order rotates
    every round, so no model always runs first or after the same neighbour).

    ``models`` maps a label to (model path, adapter file or None). Returns ``median_ms`` per label, the raw
    ``times_ms`` per round, and, when ``base`` names one of the models, ``ratio_to_base``: per label, the median
    and interquartile range of its per-round time divided by the base's time in the same round.
    """
    from lora_fx.report import paired_ratios
    from lora_fx.runtime import Session

    sessions = {}
    for label, (path, adapter) in models.items():
        sess = Session(path)
        if adapter:
            sess.add_adapter(label, adapter)
        sessions[label] = (sess, label if adapter else None)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(3):  # warm-up
        for label, (sess, adapter) in sessions.items():
            sess.run(_feeds_for(sess, feeds), adapter=adapter)
    labels = list(sessions)
    for i in range(runs):
        k = i % len(labels)
        for label in labels[k:] + labels[:k]:
            sess, adapter = sessions[label]
            f = _feeds_for(sess, feeds)
            t = time.perf_counter()
            sess.run(f, adapter=adapter)
            times[label].append((time.perf_counter() - t) * 1000)
    out: dict[str, Any] = {"median_ms": {k: statistics.median(v) for k, v in times.items()}, "times_ms": times}
    if base in times:
        out["ratio_to_base"] = {k: paired_ratios(v, times[base]) for k, v in times.items() if k != base}
    return out


def _feeds_for(sess: Any, feeds: dict[str, Any]) -> dict[str, Any]:
    names = set(sess.inputs)
    return {k: v for k, v in feeds.items() if k in names}


def check_numbers(*, steps: Any, lr: Any, seed: Any) -> None:
    """The budget every method trains with, refused before any method starts by ``lora_fx.train``'s own rule
    (steps >= 1, a positive finite lr), which would refuse it only inside each training process; the seed must
    be one torch takes (not None, which train takes: every method gets the same seed)."""
    import numbers

    from lora_fx.runtime.train import _check_numbers

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -(2**63) <= seed < 2**64:
        raise ConfigError(f"seed must be an integer in [-2**63, 2**64) (torch.manual_seed's range), got {seed!r}")
    # weight_decay, max_grad_norm and warmup_steps: train's defaults, which every method is trained with
    _check_numbers(steps=steps, lr=lr, weight_decay=0.0, max_grad_norm=1.0, warmup_steps=0, seed=seed)


def check_config(cfg: CompareConfig) -> None:
    """What would otherwise fail inside a training process (a traceback, after minutes) or after every method
    has trained (no latency runs, an output folder that is a file): checked before any of them starts."""
    from lora_fx.files import check_output_dir
    from lora_fx.tasks import LABEL_PROMPTS, load_rows

    hf = Path(cfg.hf_dir)
    if not (hf / "config.json").is_file() or not any(hf.glob("*.safetensors")):
        # found inside each training process in turn otherwise, each failing the same way
        raise ConfigError(f"{hf} is not a transformers model folder with safetensors weights (config.json, *.safetensors, "
                          "tokenizer files); pass such a folder")
    from lora_fx.tasks import check_label_prompts

    check_label_prompts(cfg.label_prompts)
    # The tokenizer (no files: AutoTokenizer builds an empty vocabulary, every method would train on [UNK] tokens)
    # and the inputs the model takes, refused here rather than inside every training process.
    _task(cfg)
    check_numbers(steps=cfg.steps, lr=cfg.lr, seed=cfg.seed)
    if cfg.export and cfg.latency_runs < 1:
        raise ConfigError(f"latency_runs must be at least 1 (CLI: --latency-runs), got {cfg.latency_runs}; or skip timing with --no-export")
    for method in cfg.methods:
        _adapter_config(cfg, method)  # r, alpha, virtual tokens, quantization: refused here, named
    n_labels = len(cfg.label_prompts or LABEL_PROMPTS)
    for split in ("train", "test"):
        rows = load_rows(split, cfg.data)
        if not rows:
            raise ConfigError(f"{cfg.data or 'tense.jsonl'} has no rows with split={split!r}; compare trains on one and scores the other")
        bad = next((r for r in rows if not 0 <= int(r["label"]) < n_labels), None)
        if bad is not None:
            raise ConfigError(f"{cfg.data or 'tense.jsonl'}: label {bad['label']} of {bad['text']!r} has no label prompt; "
                              f"there are {n_labels} prompts, so labels are 0..{n_labels - 1} (give one per label with --label-prompts)")
    check_output_dir(cfg.out_dir)


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run every method of ``cfg``, then write the report. Returns the report dict.

    A method whose training process fails is left out of the report (``report["failed"]`` names it and why);
    the report of the others is written, then ``LoraFxError`` is raised. Nothing is written when every method
    fails.
    """
    from lora_fx.report import plot_bars, plot_losses

    check_config(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    for i, method in enumerate(cfg.methods, 1):
        print(f"[{i}/{len(cfg.methods)}] {method.value}: rewrite, train {cfg.steps} steps, export", file=sys.stderr, flush=True)
        try:
            r = _run_isolated(cfg, method)
        except LoraFxError as exc:
            failed[method.value] = str(exc)
            print(f"      {exc}", file=sys.stderr, flush=True)
            continue
        results.append(r)
        print(f"      accuracy {r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f}, median step {r['median_step_seconds'] * 1000:.0f} ms", file=sys.stderr, flush=True)
    if not results:
        raise LoraFxError("every method failed, no report written: " + "; ".join(failed.values()))
    latency: dict[str, Any] = {}
    if cfg.export:
        print(f"[latency] ONNX Runtime, {cfg.latency_runs} rounds of one call per model", file=sys.stderr, flush=True)
        task = _task(cfg)
        feeds = {k: v.numpy() for k, v in task.example().items()}
        models: dict[str, tuple[str, str | None]] = {"base": (str(_base_onnx(cfg)), None)}
        for r in results:
            if "merged" in r["exported"]:
                models[f"{r['method']} merged"] = (r["exported"]["merged"], None)
            models[f"{r['method']} adapter-slot"] = (r["exported"]["adapters"], r["exported"]["adapter_file"] or None)
        latency = measure_latency(models, feeds, cfg.latency_runs)
    medians = latency.get("median_ms", {})
    plots = {
        "loss": str(plot_losses({r["method"]: r["losses"] for r in results}, out / "loss_curves.png")),
        "memory": str(plot_bars({r["method"]: r["peak_rss_mb"] for r in results}, out / "memory.png", "peak RSS (MiB)", "Peak resident memory of the training process")),
    }
    if medians:
        plots["latency"] = str(plot_bars(medians, out / "latency.png", "median latency (ms)", "ONNX Runtime latency"))
    report = {
        "config": cfg.to_dict(), "methods": results, "failed": failed,
        "ort_latency_ms": medians, "ort_latency_ratio": latency.get("ratio_to_base", {}),
        "ort_latency_rounds_ms": latency.get("times_ms", {}), "plots": plots,
    }
    write_report(report, out)
    if failed:
        raise LoraFxError("; ".join(failed.values()) + f"; the report of {', '.join(r['method'] for r in results)} "
                          f"is in {out / 'report.md'}")
    return report


def write_report(report: dict[str, Any], out: Path) -> None:
    """``report.json`` (strict JSON: a non-finite number is null) and ``report.md``, both rendered before either
    file is replaced, so a failure leaves the previous pair whole."""
    from lora_fx.report import json_text

    text = json_text(report)
    md = render_markdown(report)
    atomic_write_text(Path(out) / "report.json", text)
    atomic_write_text(Path(out) / "report.md", md)


def render_markdown(report: dict[str, Any]) -> str:
    from lora_fx.report import markdown_table

    cfg = report["config"]
    rows = []
    for r in report["methods"]:
        rows.append({**r, "step_ms": r["median_step_seconds"] * 1000, "nodes": ", ".join(f"{k} {v:+d}" for k, v in r["nodes_added"].items())})
    cols = [
        ("method", "method"), ("trainable_parameters", "trainable params"), ("adapter_file_bytes", "adapter bytes"),
        ("flops_per_token_added", "FLOPs/token added"), ("step_ms", "median step (ms)"), ("peak_rss_mb", "peak RSS (MiB)"),
        ("accuracy_before", "accuracy before"), ("accuracy_after", "accuracy after"), ("final_loss", "final loss"),
    ]
    parts = [
        "# lora_fx compare report",
        "",
        f"Base: `{cfg['hf_dir']}`; data: `{cfg['data'] or 'lora_fx/data/tense.jsonl'}`; {cfg['steps']} steps, lr {cfg['lr']}, seed {cfg['seed']} for every method.",
        "",
        markdown_table(rows, cols),
        "",
        "## Nodes added to the graph (by op type)",
        "",
        markdown_table(rows, [("method", "method"), ("nodes", "added (+) / removed (−)")]),
        "",
        "![loss curves](loss_curves.png)",
        "",
        "![peak memory](memory.png)",
    ]
    lat = report.get("ort_latency_ms") or {}
    if lat:
        ratios = report.get("ort_latency_ratio") or {}
        rounds = len(next(iter((report.get("ort_latency_rounds_ms") or {}).values()), []))
        parts += ["", "## ONNX Runtime latency", "",
                  f"Rounds of one call per model in a rotating order ({rounds} rounds); '/ base' is the median of each "
                  "round's time divided by the base's time in the same round, with the interquartile range.", ""]
        parts.append(markdown_table(
            [{"model": k, "ms": v, "ratio": _ratio_text(ratios.get(k))} for k, v in lat.items()],
            [("model", "model"), ("ms", "median ms"), ("ratio", "/ base [IQR]")]))
        parts += ["", "![latency](latency.png)"]
    if report.get("failed"):
        parts += ["", "## Failed", ""] + [f"- {m}: {why}" for m, why in report["failed"].items()]
    parts += ["", "## One rewritten site per method", ""]
    for r in report["methods"]:
        d = r["drawings"]
        parts.append(f"- {r['method']}: before `{Path(d['before']).name}`, after `{Path(d['after']).name}` (in `{r['method']}/`)")
    return "\n".join(parts) + "\n"


def _ratio_text(q: dict[str, float] | None) -> str | None:
    if not q:
        return None
    return f"{q['median']:.3f} [{q['q1']:.3f}–{q['q3']:.3f}]"
