"""Report pieces: FLOPs counted from site shapes agree with torch's FLOP counter; graph diffs; drawings."""

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertModel

import lora_fx
from lora_fx.report import fx_op_counts, fx_site_dot, lora_flops_per_token, markdown_table, nodes_added, plot_losses


def _bert():
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)).eval()
    ids = torch.randint(1, 64, (2, 8))
    return model, dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def _flops(gm, kw):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        gm(**kw)
    return counter.get_total_flops()


def test_lora_flops_from_shapes_match_torch_flop_counter():
    model, kw = _bert()
    gm = lora_fx.capture(model, kwargs=kw)
    base = _flops(gm, kw)
    # the pooler sees one token per sequence, not every token: leave it out of a per-token count
    config = lora_fx.LoraConfig(r=4, target_modules="all-linear", exclude_modules=["pooler.dense"], rank_pattern={"query": 2})
    targets = lora_fx.select_targets(lora_fx.find_sites(gm), config)
    lora_fx.apply(gm, config)
    tokens = kw["input_ids"].numel()
    predicted = lora_flops_per_token([(t.site.in_features, t.site.out_features, t.r) for t in targets], elementwise=False)
    assert _flops(gm, kw) - base == predicted * tokens


def test_nodes_added_names_the_lora_ops_and_the_drawing_highlights_them(tmp_path):
    model, kw = _bert()
    gm = lora_fx.capture(model, kwargs=kw)
    before = fx_op_counts(gm)
    lora_fx.apply(gm, lora_fx.LoraConfig(r=4, target_modules=["query"]))
    added = nodes_added(before, fx_op_counts(gm))
    # two linear (A, B), one mul (scale), one add per adapted site; two layers; two get_attr each
    assert added == {"aten.linear": 4, "aten.mul": 2, "aten.add": 2, "get_attr": 4}
    dot = fx_site_dot(gm, "encoder.layer.0.attention.self.query", "after")
    assert dot.startswith('digraph "after"') and "lora_A.weight" in dot and "#ffe9a8" in dot
    png = plot_losses({"lora": [1.0, 0.5, 0.25]}, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_table_formats_numbers():
    text = markdown_table([{"m": "lora", "p": 1234, "s": 0.123456}], [("m", "method"), ("p", "params"), ("s", "sec")])
    assert text.splitlines() == ["| method | params | sec |", "|---|---|---|", "| lora | 1,234 | 0.1235 |"]


def test_markdown_table_writes_a_dash_for_nan_and_inf():
    import math

    text = markdown_table([{"m": "lora", "s": math.nan, "t": math.inf}], [("m", "method"), ("s", "loss"), ("t", "ratio")])
    assert text.splitlines()[-1] == "| lora | – | – |"


def test_quartiles_and_paired_ratios_match_numpy():
    # The old index-based quartiles took the maximum as q3 for 4 rounds (sorted[3 * 4 // 4]).
    import numpy as np
    import pytest

    from lora_fx.report import paired_ratios, quartiles

    rng = np.random.default_rng(0)
    for n in (2, 3, 4, 5, 10, 151):
        values = rng.uniform(0.5, 2.0, n).tolist()
        q = quartiles(values)
        assert [q["q1"], q["median"], q["q3"]] == pytest.approx(np.percentile(values, [25, 50, 75]).tolist(), rel=1e-12)
        assert q["n"] == n
    num, den = rng.uniform(1, 3, 9), rng.uniform(1, 3, 9)
    q = paired_ratios(num.tolist(), den.tolist())
    assert [q["q1"], q["median"], q["q3"]] == pytest.approx(np.percentile(num / den, [25, 50, 75]).tolist(), rel=1e-12)
    assert quartiles([3.0]) == {"median": 3.0, "q1": 3.0, "q3": 3.0, "n": 1}
    with pytest.raises(ValueError, match="unpaired"):
        paired_ratios([1.0, 2.0], [1.0])


def test_json_text_is_strict_json():
    import json
    import math

    from lora_fx.report import json_text

    text = json_text({"loss": math.nan, "curve": [1.0, math.inf, (2.0, -math.inf)], "ok": 0.5})
    assert json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(AssertionError(c))) == {
        "loss": None, "curve": [1.0, None, [2.0, None]], "ok": 0.5}
