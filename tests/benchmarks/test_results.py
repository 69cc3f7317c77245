"""The committed benchmark results: each Markdown is what its JSON renders to, and README.md quotes them right.

No timing here: these read the saved files only.
"""

import json
import re
from pathlib import Path

import pytest

from benchmarks import onnx_training, ort_inference, qlora_memory, rewrite_scaling, train_step

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
RENDER = {
    "train_step": train_step.markdown,
    "ort_inference": ort_inference.markdown,
    "onnx_training": onnx_training.markdown,
    "rewrite_scaling": rewrite_scaling.to_markdown,
    "qlora_memory": qlora_memory.render,
}


def _load(name):
    return json.loads((RESULTS / f"{name}.json").read_text())


@pytest.mark.parametrize("name", sorted(RENDER))
def test_the_markdown_is_what_the_json_renders_to(name):
    # train_step's Markdown printed tuples when fresh and lists when rendered from its JSON (--render): the two
    # files of one run disagreed.
    assert RENDER[name](_load(name)) == (RESULTS / f"{name}.md").read_text()


def _readme_row(command):
    row = next((line for line in (ROOT / "README.md").read_text().splitlines() if f"`python -m benchmarks.{command}`" in line), None)
    assert row is not None, f"README.md has no row for benchmarks.{command}"
    return re.sub(r"\s+", " ", row)


def test_readme_quotes_train_step():
    r = _load("train_step")
    qv, al = r["configs"]["query_value"], r["configs"]["all_linear"]
    rows = {p["T"]: p for p in r["prefix"]["rows"]}
    row = _readme_row("train_step")
    assert f"ours/PEFT {qv['cpu_ratio']['lora_fx']:.2f} (query/value), {al['cpu_ratio']['lora_fx']:.2f} (all-linear, CPU time)" in row
    assert f"torch.compile'd graph {qv['cpu_ratio']['lora_fx_compiled']:.2f} / {al['cpu_ratio']['lora_fx_compiled']:.2f}" in row
    assert f"step memory {qv['memory_ratio']['lora_fx']:.2f} / {al['memory_ratio']['lora_fx']:.2f}" in row
    vs_peft = " / ".join(f"{rows[t]['cpu_ratio_vs_peft']:.2f}" for t in (8, 32, 128))
    vs_lora = " / ".join(f"{rows[t]['cpu_ratio_vs_lora']:.2f}" for t in (8, 32, 128))
    assert f"T = 8 / 32 / 128: {vs_peft} of PEFT's prefix-tuning, {vs_lora} of LoRA r=8's step" in row


def test_readme_quotes_rewrite_scaling():
    r = _load("rewrite_scaling")
    first, last = r["runs"][0], r["runs"][-1]
    row = _readme_row("rewrite_scaling")
    assert f"400 layers ({last['linear_sites']:,} sites) in {r['total_400_s']:.2f} s" in row
    assert f"{first['seconds_per_site'] * 1e3:.2f} → {last['seconds_per_site'] * 1e3:.2f} ms per site" in row


def test_readme_quotes_ort_inference():
    runs = {run["batch"]: run["ratios"] for run in _load("ort_inference")["runs"]}
    b1, b8 = runs[1], runs[8]
    row = _readme_row("ort_inference")

    def pair(key):
        return f"{b1[key]['median']:.2f} / {b8[key]['median']:.2f}"

    assert f"merged/base {pair('merged/base')} (batch 1 / 8)" in row
    assert f"adapter slot/base {pair('slot/base')} with `fuse_lora_add`, {pair('slot unfused/base')} without" in row
    assert f"switching per call {b1['switch/same']['median']:.2f}" in row
    b8_new = f"{b8['new session/switch']['median']:.1f}".removesuffix(".0")
    assert f"a new session per adapter instead {b1['new session/switch']['median']:.0f}x / {b8_new}x (batch 1 / 8)" in row
    prefix = " / ".join(f"{b1[f'prefix T={t}/base']['median']:.2f}" for t in (8, 32, 128))
    assert f"prefix-tuning slot/base T = 8 / 32 / 128: {prefix} (batch 1)" in row


def test_readme_quotes_onnx_training():
    ratios = _load("onnx_training")["results"]["ratio_onnx_over_fx"]
    assert f"step time ONNX/FX {ratios['eager']:.2f} eager, {ratios['compiled']:.2f} compiled" in _readme_row("onnx_training")


def test_readme_quotes_qlora_memory():
    rows = {(r["frontend"], r["model"], r["method"]): r for r in _load("qlora_memory")["rows"]}
    row = _readme_row("qlora_memory")

    def bytes_ratio(frontend, method):
        return f"{rows[frontend, 'minilm', method]['frozen_bytes_ratio_quantized_sites']:.3f}"

    assert (f"frozen-weight bytes nf4 {bytes_ratio('fx', 'nf4')}, int4 {bytes_ratio('fx', 'int4')} "
            f"({bytes_ratio('onnx', 'int4')} in ONNX, float scales), int8 {bytes_ratio('fx', 'int8')}") in row
    fx, onnx = rows["fx", "llama12-h2048", "nf4"], rows["onnx", "llama12-h2048", "nf4"]
    assert (f"nf4 peak RSS {fx['peak_ratio']:.2f}x and step {fx['step_ratio']:.2f}x LoRA fp32 from the torch model, "
            f"{onnx['peak_ratio']:.2f}x and {onnx['step_ratio']:.2f}x from its ONNX file") in row
    weights = rows["fx", "llama12-h2048", "lora_fp32"]["float_linear_bytes"] / 2**30
    assert f"hidden 2048, {weights:.1f} GiB of weights" in row
    # The README said 3.27 / 3.26 GiB: the MiB figure divided by 1000.
    peaks = [rows[f, "llama12-h2048", "lora_fp32"]["peak_rss_mib"] / 1024 for f in ("fx", "onnx")]
    assert f"LoRA fp32 itself peaks at {peaks[0]:.2f} / {peaks[1]:.2f} GiB" in row
    h1024 = [rows[f, "llama12-h1024", "nf4"]["peak_ratio"] for f in ("fx", "onnx")]
    assert f"{h1024[0]:.2f}x / {h1024[1]:.2f}x" in row
