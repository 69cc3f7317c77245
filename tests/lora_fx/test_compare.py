"""``lora-fx compare`` on a tiny BERT: every artefact is produced and the numbers agree with each other."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lora_fx.cli import main
from lora_fx.compare import Method
from lora_fx.errors import ConfigError
from lora_fx.hf import minilm_dir


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    # MiniLM's tokenizer, so the vocabulary size must be its 30522.
    model = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    model.save_pretrained(d, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / name, d / name)
    return d


@pytest.mark.slow
def test_compare_produces_every_artefact_with_consistent_numbers(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["compare", "--hf", str(tiny_bert_dir), "--methods", "lora,qlora-int8,prefix", "--steps", "3",
                 "--num-virtual-tokens", "4", "--latency-runs", "2", "-o", str(out), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads((out / "report.json").read_text()) == report
    md = (out / "report.md").read_text()
    for png in ("loss_curves.png", "memory.png", "latency.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and png in md
    by = {m["method"]: m for m in report["methods"]}
    assert set(by) == {"lora", "qlora-int8", "prefix"}
    for name, m in by.items():
        assert len(m["losses"]) == 3 and m["median_step_seconds"] > 0 and m["peak_rss_mb"] > 0
        for drawing in m["drawings"].values():
            text = open(drawing.replace(".png", ".dot")).read()
            assert text.startswith("digraph")
        # trainable parameters = the saved adapter tensors' sizes
        tensors = load_file(f"{m['adapter_dir']}/adapter_model.safetensors")
        assert sum(t.numel() for t in tensors.values()) == m["trainable_parameters"], name
        assert m["adapter_file_bytes"] > 4 * m["trainable_parameters"]
    # all-linear on 2 layers: 6 sites x 2 + pooler = 13 sites; A and B at r=8 (in, out = 32 or 64)
    lora = by["lora"]
    assert lora["nodes_added"]["aten.linear"] == 2 * 13 and lora["nodes_added"]["aten.mul"] == 13
    assert lora["flops_per_token_added"] == sum(
        2 * 8 * (i + o) + 2 * o for i, o in [(32, 32)] * 4 * 2 + [(32, 64), (64, 32)] * 2 + [(32, 32)]
    )
    assert by["prefix"]["trainable_parameters"] == 2 * 2 * 4 * 32  # layers x (K, V) x T x hidden
    assert by["prefix"]["nodes_added"]["aten.cat"] == 2 * 2
    assert by["qlora-int8"]["nodes_added"]["lora_fx.linear_int8"] == 13
    lat = report["ort_latency_ms"]
    assert set(lat) == {"base", "lora merged", "lora adapter-slot", "qlora-int8 adapter-slot", "prefix adapter-slot"}
    assert "| lora |" in md and "ONNX Runtime latency" in md


def test_unknown_method_is_refused():
    with pytest.raises(ConfigError, match="unknown method 'dora'.*lora"):
        Method.parse_list("lora,dora")


def test_compare_cli_bad_folder_exits_nonzero(tmp_path, capsys):
    assert main(["compare", "--hf", str(tmp_path / "missing")]) != 0
    assert "not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("rows,extra,match", [
    (None, ["--data", "{tmp}/missing.jsonl"], "cannot read the data file"),
    ('{"text": "I ran", "label": 0, "split": "train"}\n{"text": "I run", "label": 7, "split": "test"}\n', [],
     "label 7 of 'I run' has no label prompt; there are 3 prompts"),
    ('{"text": "I ran", "label": 0, "split": "train"}\n', [], "no rows with split='test'"),
    (None, ["--latency-runs", "0"], "latency_runs must be at least 1"),
    (None, ["--r", "0"], "r must be a positive integer"), (None, ["--lr", "-1"], "lr must be at least 0"),
    (None, ["-o", "{tmp}/a_file"], "a_file is a file, not a folder"),
])
def test_compare_refuses_bad_input_before_any_method_trains(tmp_path, capsys, rows, extra, match):
    # These used to surface from a training process as a traceback (missing file, label 7 for 3 prompts),
    # or after every method had trained (--latency-runs 0, -o naming a file).
    (tmp_path / "a_file").write_text("x")
    argv = ["compare", "--hf", str(minilm_dir()), "--methods", "lora", "--steps", "1", "-o", str(tmp_path / "report")]
    if rows is not None:
        (tmp_path / "rows.jsonl").write_text(rows)
        argv += ["--data", str(tmp_path / "rows.jsonl")]
    assert main(argv + [a.format(tmp=tmp_path) for a in extra]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and "[1/1]" not in err, err  # "[1/1]": a method started
    assert not (tmp_path / "report").exists()


def test_a_training_process_that_dies_is_an_error_not_a_hang():
    import multiprocessing as mp
    import os

    from lora_fx.compare import _result_of

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=os._exit, args=(3,))  # dies without a word, as an OOM-killed child does
    proc.start()
    status, message = _result_of(proc, queue)
    proc.join()
    assert status == "error" and "exit code 3" in message
