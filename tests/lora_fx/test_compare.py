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
    # each ratio to the base is the median of the per-round ratios recorded beside it
    from lora_fx.report import paired_ratios

    rounds = report["ort_latency_rounds_ms"]
    assert all(len(v) == 2 for v in rounds.values()) and report["failed"] == {}
    assert set(report["ort_latency_ratio"]) == set(lat) - {"base"}
    for label, q in report["ort_latency_ratio"].items():
        assert q == pytest.approx(paired_ratios(rounds[label], rounds["base"]))
        assert f"| {label} |" in md and f"{q['median']:.3f} [" in md


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
    (None, ["--r", "0"], "r must be a positive integer"),
    (None, ["--lr", "-1"], "lr must be a positive, finite number (e.g. 1e-3), got -1.0"),
    # Accepted before, where lora-fx train refuses it: every method "trained" without changing a weight.
    (None, ["--lr", "0"], "lr must be a positive, finite number (e.g. 1e-3), got 0.0"),
    (None, ["--lr", "nan"], "lr must be a positive, finite number"),
    # The count was silently ignored: latency is measured on the exported models, which --no-export skips.
    (None, ["--no-export", "--latency-runs", "5"], "--latency-runs 5 times the exported ONNX models, and --no-export exports none"),
    (None, ["-o", "{tmp}/a_file"], "a_file is a file, not a folder"),
    # Ran every method to completion: an empty prompt, or two labels with one prompt, told apart by nothing.
    (None, ["--label-prompts", "a||c"], "label prompt 1 of ['a', '', 'c'] is empty: label 1 would be matched against no text"),
    (None, ["--label-prompts", "a|b|"], "label prompt 2 of ['a', 'b', ''] is empty"),
    (None, ["--label-prompts", "a| |c"], "label prompt 1 of ['a', ' ', 'c'] is only whitespace"),
    (None, ["--label-prompts", "past|past|future"], "label prompts 0 and 1 are the same ('past'): labels 0 and 1 would be indistinguishable"),
    (None, ["--label-prompts", "past|future| past "], "label prompts 0 and 2 are the same ('past')"),
    (None, ["--label-prompts", ""], "needs one prompt per label, two or more"),
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


def test_a_method_listed_twice_is_refused():
    # Both runs trained into the same folder and the second's latency label overwrote the first's.
    with pytest.raises(ConfigError, match="'lora' is listed twice"):
        Method.parse_list("lora,prefix,lora")


class _Clock:
    now = 0.0

    def perf_counter(self):
        return self.now


def test_latency_ratios_are_paired_per_round_with_the_order_rotating(monkeypatch):
    # Other processes' load changes from round to round (here x1, x5, x2, x9); a model 1.25x slower than the base
    # in every round is 1.25x in every round's ratio, and the order of the calls rotates.
    import types

    import lora_fx.compare as compare
    import lora_fx.runtime

    clock, calls = _Clock(), []
    load = [1.0, 5.0, 2.0, 9.0]
    cost = {"base.onnx": 4.0, "slow.onnx": 5.0}
    warmup_calls = 3 * len(cost)

    class FakeSession:
        inputs = ["input_ids"]

        def __init__(self, path):
            self.path = path

        def add_adapter(self, name, path):
            pass

        def run(self, feeds, adapter=None):
            calls.append(self.path)
            n = max(0, len(calls) - 1 - warmup_calls) // len(cost)
            clock.now += cost[self.path] * load[n % len(load)] / 1000

    monkeypatch.setattr(lora_fx.runtime, "Session", FakeSession)
    monkeypatch.setattr(compare, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    out = compare.measure_latency({"base": ("base.onnx", None), "slow": ("slow.onnx", None)}, {"input_ids": 0}, runs=4)
    assert out["times_ms"]["base"] == pytest.approx([4.0, 20.0, 8.0, 36.0])
    assert out["times_ms"]["slow"] == pytest.approx([5.0, 25.0, 10.0, 45.0])
    assert out["median_ms"] == pytest.approx({"base": 14.0, "slow": 17.5})
    q = out["ratio_to_base"]["slow"]
    assert (q["median"], q["q1"], q["q3"], q["n"]) == pytest.approx((1.25, 1.25, 1.25, 4))
    assert "base" not in out["ratio_to_base"]
    timed = calls[warmup_calls:]
    assert timed[0::2] == ["base.onnx", "slow.onnx", "base.onnx", "slow.onnx"]  # who goes first alternates


def _fake_result(method, out_dir):
    return {
        "method": method, "trainable_parameters": 1000, "adapter_file_bytes": 4100, "nodes_added": {"aten.linear": 2},
        "flops_per_token_added": 10, "median_step_seconds": 0.01, "peak_rss_mb": 100.0, "rss_before_training_mb": 90.0,
        "accuracy_before": 0.5, "accuracy_after": 0.75, "losses": [1.0, 0.5], "final_loss": float("nan"),
        "drawings": {"before": f"{out_dir}/{method}/site_before.dot", "after": f"{out_dir}/{method}/site_after.dot"},
        "exported": {}, "adapter_dir": f"{out_dir}/{method}/adapter",
    }


def test_a_failed_method_leaves_the_report_of_the_others_and_an_error(tmp_path, monkeypatch):
    # One failing method used to lose the methods trained before it (no report at all).
    import lora_fx.compare as compare
    from lora_fx.errors import LoraFxError

    def fake_run(cfg, method):
        if method is Method.PREFIX:
            raise LoraFxError("method prefix failed: ValueError: boom")
        return _fake_result(method.value, cfg.out_dir)

    monkeypatch.setattr(compare, "_run_isolated", fake_run)
    out = tmp_path / "report"
    cfg = compare.CompareConfig(hf_dir=str(minilm_dir()), out_dir=str(out), methods=[Method.LORA, Method.PREFIX, Method.QLORA_NF4],
                                steps=2, export=False)
    with pytest.raises(LoraFxError, match=r"method prefix failed: ValueError: boom; the report of lora, qlora-nf4 is in .*report.md"):
        compare.compare(cfg)
    # strict JSON: the NaN final loss is null, not the NaN token json.loads would accept
    report = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in report.json"))
    assert [m["method"] for m in report["methods"]] == ["lora", "qlora-nf4"]
    assert report["failed"] == {"prefix": "method prefix failed: ValueError: boom"}
    assert report["methods"][0]["final_loss"] is None
    md = (out / "report.md").read_text()
    assert "| lora |" in md and "| qlora-nf4 |" in md and "- prefix: method prefix failed" in md
    assert "nan" not in md.lower()


def test_every_method_failing_writes_no_report(tmp_path, monkeypatch):
    import lora_fx.compare as compare
    from lora_fx.errors import LoraFxError

    def fake_run(cfg, method):
        raise LoraFxError(f"method {method.value} failed: OSError: no model")

    monkeypatch.setattr(compare, "_run_isolated", fake_run)
    cfg = compare.CompareConfig(hf_dir=str(minilm_dir()), out_dir=str(tmp_path / "report"), methods=[Method.LORA], export=False)
    with pytest.raises(LoraFxError, match="every method failed, no report written: method lora failed"):
        compare.compare(cfg)
    assert not (tmp_path / "report" / "report.json").exists()


def _sleep_long():
    import time

    time.sleep(120)


def test_an_interrupted_wait_ends_the_training_process():
    # Ctrl-C while waiting for a method used to leave its training process running on.
    import multiprocessing as mp

    from lora_fx.compare import _collect

    class InterruptedQueue:
        def get(self, timeout=None):
            raise KeyboardInterrupt

    proc = mp.get_context("spawn").Process(target=_sleep_long)
    proc.start()
    with pytest.raises(KeyboardInterrupt):
        _collect(proc, InterruptedQueue())
    assert not proc.is_alive() and proc.exitcode is not None


def test_a_folder_that_is_no_model_is_refused_before_any_method_trains(tmp_path, capsys):
    # It used to start every method in turn, each failing in its training process on the same folder.
    (tmp_path / "config.json").write_text("{}")
    assert main(["compare", "--hf", str(tmp_path), "--methods", "lora,prefix", "-o", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert "is not a transformers model folder with safetensors weights" in err and "[1/2]" not in err, err
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("field, value, match", [
    ("lr", 0.0, r"lr must be a positive, finite number \(e\.g\. 1e-3\), got 0\.0"),  # train's own rule and words
    ("lr", float("inf"), "lr must be a positive, finite number"),
    ("steps", 0, "steps must be at least 1, got 0"),
    ("seed", None, r"seed must be an integer in \[-2\*\*63, 2\*\*64\) \(torch.manual_seed's range\), got None"),
    ("seed", 2**64, r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
])
def test_compare_takes_the_budget_train_takes(tmp_path, field, value, match):
    from lora_fx.compare import CompareConfig, check_config, compare

    cfg = CompareConfig(hf_dir=str(minilm_dir()), out_dir=str(tmp_path / "report"), methods=[Method.LORA], steps=1)
    setattr(cfg, field, value)
    with pytest.raises(ConfigError, match=match):
        compare(cfg)
    assert not (tmp_path / "report").exists()
    setattr(cfg, field, {"lr": 1e-6, "steps": 1, "seed": -(2**63)}[field])  # values train takes pass
    check_config(cfg)


def test_latency_runs_reach_the_config_only_with_the_export(tmp_path, monkeypatch):
    import lora_fx.compare

    seen = []

    def fake_compare(cfg):  # what the CLI hands over, without training
        seen.append((cfg.export, cfg.latency_runs))
        raise ConfigError("stop")

    monkeypatch.setattr(lora_fx.compare, "compare", fake_compare)
    argv = ["compare", "--hf", str(minilm_dir()), "--methods", "lora", "-o", str(tmp_path / "report")]
    for extra in ([], ["--latency-runs", "7"], ["--no-export"]):
        assert main(argv + extra) == 2
    assert seen == [(True, 30), (True, 7), (False, 30)]
    assert main(argv + ["--no-export", "--latency-runs", "30"]) == 2  # even the default count, given, is refused
    assert len(seen) == 3


# ---- the model folder's tokenizer and the inputs its model takes ------------------------------------------------

def _tiny_distilbert(path, tokenizer_inputs):
    """A tiny DistilBERT from a config, with MiniLM's tokenizer saved beside it returning ``tokenizer_inputs``."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    model = DistilBertModel(DistilBertConfig(vocab_size=30522, dim=32, hidden_dim=64, n_layers=2, n_heads=4)).eval()
    model.save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    tokenizer.model_input_names = list(tokenizer_inputs)
    tokenizer.save_pretrained(path)
    return model


@pytest.mark.parametrize("tokenizer_inputs", [["input_ids", "attention_mask"], ["input_ids", "token_type_ids", "attention_mask"]],
                         ids=["no-token-type-ids", "token-type-ids"])
def test_the_task_feeds_distilbert_only_the_inputs_its_forward_takes(tmp_path, tokenizer_inputs):
    # Without token_type_ids every method failed with KeyError 'token_type_ids'; with them (a BERT tokenizer beside
    # a DistilBERT) torch.export refused the input DistilBERT's forward does not name.
    import lora_fx
    from lora_fx.tasks import TenseTask, model_inputs

    model = _tiny_distilbert(tmp_path, tokenizer_inputs)
    task = TenseTask.from_model_dir(tmp_path, max_length=16, batch_size=4)
    batch = task.batches("train")[0]
    assert sorted(model_inputs(batch)) == ["attention_mask", "input_ids"] and "labels" in batch
    gm = lora_fx.capture(model, kwargs=task.example())
    with torch.no_grad():
        want = model(**model_inputs(batch)).last_hidden_state
        got = gm(**model_inputs(batch))["last_hidden_state"]
    assert torch.allclose(got, want, atol=1e-5)
    assert 0.0 <= task.accuracy(lambda b: gm(**model_inputs(b))["last_hidden_state"]) <= 1.0


def test_the_task_keeps_token_type_ids_for_a_model_that_takes_them(tiny_bert_dir):
    from lora_fx.tasks import TenseTask, model_inputs

    batch = TenseTask.from_model_dir(tiny_bert_dir, max_length=16, batch_size=4).batches("train")[0]
    assert sorted(model_inputs(batch)) == ["attention_mask", "input_ids", "token_type_ids"]


def test_a_model_folder_without_tokenizer_files_is_refused_before_any_method_trains(tmp_path, capsys):
    # AutoTokenizer built an empty vocabulary there: every method trained on [UNK] tokens and the report said exit 0.
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(tmp_path / "m")
    capsys.readouterr()
    assert main(["compare", "--hf", str(tmp_path / "m"), "--methods", "lora", "--steps", "1", "--no-export",
                 "-o", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer files: none of tokenizer.json, vocab.txt" in err and "[1/1]" not in err, err
    assert f"tokenizer.save_pretrained({str(tmp_path / 'm')!r})" in err
    assert not (tmp_path / "report").exists()


def test_a_tokenizer_that_reads_every_word_as_unknown_is_refused(tmp_path):
    # transformers 5 builds BertTokenizerFast() (and DistilBertTokenizerFast(vocab_file=...)) with a 5-token
    # vocabulary; saved beside a model it has a tokenizer.json, yet every word is [UNK].
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from lora_fx.compare import CompareConfig, check_config

    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(tmp_path / "m")
    BertTokenizerFast().save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "tokenizer.json").is_file()  # the file check alone would pass it
    cfg = CompareConfig(hf_dir=str(tmp_path / "m"), out_dir=str(tmp_path / "report"), methods=[Method.LORA], steps=1)
    with pytest.raises(ConfigError, match=r"reads every word as \[UNK\] \(its vocabulary has 5 tokens\).*tokenizer\.save_pretrained"):
        check_config(cfg)


@pytest.mark.parametrize("prompts, match", [
    (["past", "", "future"], r"label prompt 1 of \['past', '', 'future'\] is empty"),
    (("past", "\t", "future"), "label prompt 1 of .* is only whitespace"),
    (["past", "future", "past"], r"label prompts 0 and 2 are the same \('past'\)"),
    ("past|future", "label_prompts must be a list of prompts, one per label .*got str"),
    ([], r"label prompts \[\]: .* two or more"),
    (["past", 3], r"label prompt 1 is int \(3\), not a string"),
])
def test_the_api_refuses_the_label_prompts_the_cli_refuses(tmp_path, prompts, match):
    from lora_fx.compare import CompareConfig, check_config, compare

    cfg = CompareConfig(hf_dir=str(minilm_dir()), out_dir=str(tmp_path / "report"), methods=[Method.LORA], steps=1,
                        label_prompts=prompts)
    with pytest.raises(ConfigError, match=match):
        compare(cfg)
    assert not (tmp_path / "report").exists()
    cfg.label_prompts = ["past", "present", "future"]  # distinct prompts, one per label of the tense set, pass
    check_config(cfg)


def test_the_task_itself_refuses_prompts_labels_cannot_be_told_apart_by(tiny_bert_dir):
    from lora_fx.tasks import TenseTask

    with pytest.raises(ConfigError, match=r"label prompts 0 and 1 are the same \('past'\)"):
        TenseTask.from_model_dir(tiny_bert_dir, label_prompts=("past", "past ", "future"))
    assert TenseTask.from_model_dir(tiny_bert_dir, label_prompts=("past", "present", "future")).label_prompts[1] == "present"
