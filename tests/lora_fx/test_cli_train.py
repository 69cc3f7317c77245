"""``lora-fx train``: trains an ONNX model's adapters from .npz / JSON lines, writes the tuned model,
resumes a run killed with SIGKILL on the same loss curve, and writes nothing on bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from lora_fx.cli import main
from tests.runtime import onnx_models as om


def _data(n: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    return {"x": x, "labels": ((x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0))}


def _files(tmp_path: Path, hidden: int = 16, **kw) -> tuple[Path, Path]:
    model = tmp_path / "lora.onnx"
    ir.save(om.mlp(hidden=hidden, **kw), str(model))
    data = tmp_path / "train.npz"
    np.savez(data, **_data())
    return model, data


def _run_json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_train_npz_writes_the_tuned_model(tmp_path: Path, capsys) -> None:
    model, data = _files(tmp_path)
    out = tmp_path / "tuned.onnx"
    result = _run_json(capsys, ["train", str(model), "--data", str(data), "--target", "labels", "--output", "logits",
                                "--loss", "cross_entropy", "--steps", "60", "--lr", "1e-2", "--batch-size", "16",
                                "-o", str(out), "--json", "--no-progress"])
    assert result["steps"] == 60 and len(result["losses"]) == 60
    assert np.mean(result["losses"][-8:]) < np.mean(result["losses"][:8])
    tuned = ir.load(str(out)).graph.initializers
    assert np.abs(tuned["fc1.lora_B.weight"].const_value.numpy()).max() > 0  # B started at zero
    original = ir.load(str(model)).graph.initializers
    np.testing.assert_array_equal(tuned["w1"].const_value.numpy(), original["w1"].const_value.numpy())
    # ORT on the written file: the trained model's loss on the data is the curve's end, not its start
    d = _data()
    logits = om.ort_run(out, {"x": d["x"]})[0]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ort_loss = -logp[np.arange(len(d["labels"])), d["labels"]].mean()
    assert ort_loss < result["losses"][0]


def test_train_jsonl(tmp_path: Path, capsys) -> None:
    model, _ = _files(tmp_path)
    d = _data(32)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"x": x.tolist(), "labels": int(y)}) for x, y in zip(d["x"], d["labels"])))
    result = _run_json(capsys, ["train", str(model), "--data", str(data), "--steps", "5", "-o", str(tmp_path / "t.onnx"),
                                "--json", "--no-progress"])
    assert len(result["losses"]) == 5 and (tmp_path / "t.onnx").is_file()


def test_unsupported_op_names_it_and_writes_nothing(tmp_path: Path, capsys) -> None:
    model, data = _files(tmp_path, extra_node=helper.make_node("Hardmax", ["logits"], ["hm"], name="odd_node"))
    out = tmp_path / "tuned.onnx"
    code = main(["train", str(model), "--data", str(data), "--steps", "3", "-o", str(out),
                 "--checkpoint-dir", str(tmp_path / "ck")])
    err = capsys.readouterr().err
    assert code != 0 and "Hardmax" in err and "odd_node" in err
    assert not out.exists() and not (tmp_path / "ck").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.onnx", "train.npz"]


def test_bad_data_is_explained(tmp_path: Path, capsys) -> None:
    model, _ = _files(tmp_path)
    data = tmp_path / "bad.npz"
    np.savez(data, inputs=np.zeros((4, 8), np.float32), labels=np.zeros(4, np.int64))
    assert main(["train", str(model), "--data", str(data), "-o", str(tmp_path / "t.onnx")]) != 0
    err = capsys.readouterr().err
    assert "graph inputs ['x']" in err
    np.savez(data, x=np.zeros((4, 8), np.float32), y=np.zeros(4, np.int64))
    assert main(["train", str(model), "--data", str(data), "-o", str(tmp_path / "t.onnx")]) != 0
    assert "--target" in capsys.readouterr().err
    assert not (tmp_path / "t.onnx").exists()


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_curve(tmp_path: Path, capsys) -> None:
    # a checkpoint after every step: each step then costs a file write, so even on a fast machine the run
    # lasts long enough to be killed mid-run, and the kill may land inside a write (atomicity is tested too)
    model, data = _files(tmp_path, hidden=256)
    steps, every = 300, 1
    common = ["train", str(model), "--data", str(data), "--steps", str(steps), "--lr", "1e-3", "--batch-size", "64",
              "--checkpoint-every", str(every), "--json", "--no-progress"]
    reference = _run_json(capsys, common + ["-o", str(tmp_path / "ref.onnx"), "--checkpoint-dir", str(tmp_path / "ref_ck")])

    ck = tmp_path / "ck"
    out = tmp_path / "tuned.onnx"
    argv = [sys.executable, "-m", "lora_fx.cli"] + common + ["-o", str(out), "--checkpoint-dir", str(ck)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONHASHSEED": "0"})
    summary = ck / "checkpoint.json"
    deadline = time.monotonic() + 300
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        if summary.is_file():
            try:
                step = json.loads(summary.read_text())["step"]
            except (json.JSONDecodeError, OSError):
                step = 0
            if step >= 100:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not out.exists()  # a killed run leaves no output model
    saved_step = json.loads(summary.read_text())["step"]
    assert 100 <= saved_step < steps

    resumed = _run_json(capsys, common + ["-o", str(out), "--checkpoint-dir", str(ck), "--resume"])
    assert resumed["losses"] == reference["losses"]
    ref_b = ir.load(str(tmp_path / "ref.onnx")).graph.initializers["fc1.lora_B.weight"].const_value.numpy()
    got_b = ir.load(str(out)).graph.initializers["fc1.lora_B.weight"].const_value.numpy()
    np.testing.assert_array_equal(got_b, ref_b)


def _bad_npz(kind: str) -> dict[str, np.ndarray]:
    d = _data(16)
    if kind == "x_width":
        d["x"] = d["x"][:, :7]
    elif kind == "x_rank":
        d["x"] = d["x"][:, None, :]
    elif kind == "class_range":
        d["labels"][3] = 5
    elif kind == "target_shape":
        d["labels"] = np.stack([d["labels"], d["labels"]], 1)
    elif kind == "nan":
        d["x"][2, 1] = np.nan
    elif kind == "empty":
        d = {k: v[:0] for k, v in d.items()}
    elif kind == "scalar":
        d = {k: v[0] for k, v in d.items()}
    return d


@pytest.mark.parametrize("kind,match", [
    ("x_width", "store it as (examples, 8)"), ("x_rank", "has shape (16, 1, 8), but graph input 'x' is ('batch', 8)"),
    ("class_range", "holds class 5, but the output has 3 classes"), ("target_shape", "one class index per row"),
    ("nan", "NaN or inf (first in example 2)"), ("empty", "hold no examples"), ("scalar", "are single values"),
])
def test_data_that_does_not_fit_the_graph_is_named(tmp_path: Path, capsys, kind: str, match: str) -> None:
    # Each of these used to end in a torch traceback (or "batches is empty") from inside the graph or the loss.
    model, _ = _files(tmp_path)
    data = tmp_path / "bad.npz"
    np.savez(data, **_bad_npz(kind))
    out = tmp_path / "t.onnx"
    assert main(["train", str(model), "--data", str(data), "--steps", "2", "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("text,match", [(b"[1, 2, 3]\n", "line 1 is a JSON list"), (b"\xff\xfe{}\n", "is not UTF-8 text")])
def test_jsonl_that_is_not_objects_of_text_is_named(tmp_path: Path, capsys, text: bytes, match: str) -> None:
    model, _ = _files(tmp_path)
    (tmp_path / "bad.jsonl").write_bytes(text)
    assert main(["train", str(model), "--data", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "t.onnx")]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("extra,match", [
    (["--lr", "-1"], "--lr must be a positive, finite number"), (["--lr", "0"], "--lr must be a positive, finite number"),
    (["--lr", "nan"], "--lr must be a positive, finite number"), (["--lr", "inf"], "--lr must be a positive, finite number"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number of at least 0"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number of at least 0"),
    (["--warmup-steps", "-1"], "--warmup-steps must be a finite number of at least 0"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be at least 0"), (["--max-grad-norm", "-1"], "--max-grad-norm must be at least 0"),
    (["--steps", "0"], "--steps must be at least 1"), (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--seed", str(2**64)], "--seed must be in"),
    (["--checkpoint-dir", "{tmp}/train.npz"], "is a file; name a folder"),
    (["--checkpoint-dir", "{tmp}/ck", "--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
    (["--checkpoint-dir", "{tmp}/t.onnx"], "the checkpoints need a folder of their own"),
    (["-o", "{tmp}/lora.onnx"], "is an input of this command"), (["-o", "{tmp}"], "is a directory"),
    (["-o", "{tmp}/train.npz/t.onnx"], "is a file, not a folder"),
])
def test_bad_options_and_outputs_are_refused_before_training(tmp_path: Path, capsys, extra: list[str], match: str) -> None:
    # Before the first step: a negative warmup used to train with a negative learning rate, -o lora.onnx to
    # overwrite the input, and a bad output or checkpoint path to fail only after the last step.
    model, data = _files(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    argv = ["train", str(model), "--data", str(data), "--steps", "2", "-o", str(tmp_path / "t.onnx"), "--no-progress"]
    assert main(argv + [a.format(tmp=tmp_path) for a in extra]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err, err
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("lr,clip,step", [("1e20", "0", 2), ("1e38", "1", 1)])
def test_diverging_training_is_one_line_and_writes_nothing(tmp_path: Path, capsys, lr: str, clip: str, step: int) -> None:
    # runtime.train stops a run whose loss, gradients or update are no longer finite with TrainingDivergedError,
    # naming the step, its loss and the way out. --lr 1e38 used to end in torch's overflow traceback from inside
    # AdamW (its first step size, 10 * lr, does not fit a float32), 1e20 in a FloatingPointError traceback.
    model, data = _files(tmp_path)
    out = tmp_path / "t.onnx"
    assert main(["train", str(model), "--data", str(data), "--steps", "5", "--lr", lr, "--max-grad-norm", clip,
                 "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lora-fx: error: training diverged at step {step} of 5 (loss "), err
    assert "Lower the learning rate" in err and "check the data" in err and f"{out} was not written" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["lora.onnx", "train.npz"]


def test_big_endian_data_trains_as_the_same_numbers(tmp_path: Path, capsys) -> None:
    # torch.from_numpy refuses non-native byte order: an .npz written on a big-endian machine (or with '>f4')
    # used to end in a ValueError traceback. It must give the same run as the native arrays.
    model, data = _files(tmp_path)
    swapped = tmp_path / "be.npz"
    np.savez(swapped, **{k: v.astype(v.dtype.newbyteorder(">")) for k, v in _data().items()})
    runs = []
    for path, out in ((data, "native.onnx"), (swapped, "swapped.onnx")):
        runs.append(_run_json(capsys, ["train", str(model), "--data", str(path), "--steps", "3", "-o", str(tmp_path / out),
                                       "--no-progress", "--json"])["losses"])
    assert runs[0] == runs[1] and len(runs[0]) == 3


def _npz_bytes(kind: str, tmp_path: Path) -> bytes:
    import io
    import zipfile

    if kind == "npy":  # np.save's single array under an .npz name
        buf = io.BytesIO()
        np.save(buf, _data()["x"])
        return buf.getvalue()
    if kind == "truncated":
        np.savez(tmp_path / "whole.npz", **_data())
        return (tmp_path / "whole.npz").read_bytes()[:900]
    if kind == "not_npy_entries":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("x.npy", b"not an array")
            z.writestr("labels.npy", b"not an array")
        return buf.getvalue()
    return {"empty": b"", "text": b"x,labels\n1,0\n"}[kind]


@pytest.mark.parametrize("kind,match", [
    ("npy", "is a single .npy array, not an .npz of named arrays"), ("empty", "is not an .npz file"),
    ("text", "is not an .npz file"), ("truncated", "is not a readable .npz of arrays"),
    ("not_npy_entries", "entries ['labels', 'x'] are not .npy arrays"),
])
def test_npz_that_is_no_npz_is_named(tmp_path: Path, capsys, kind: str, match: str) -> None:
    # A .npy ended in "TypeError: 'numpy.ndarray' object does not support the context manager protocol", an empty
    # file in EOFError, a truncated one in BadZipFile; a text file was refused as "pickled data ... load it unsafely
    # using allow_pickle" (np.load takes what is neither zip nor .npy for a pickle).
    model, _ = _files(tmp_path)
    (tmp_path / "bad.npz").write_bytes(_npz_bytes(kind, tmp_path))
    out = tmp_path / "t.onnx"
    assert main(["train", str(model), "--data", str(tmp_path / "bad.npz"), "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert match in err and "np.savez(path, <input name>=array" in err and "allow_pickle" not in err, err
    assert not out.exists()


def test_output_onto_the_models_external_data_is_refused_before_training(tmp_path: Path, capsys) -> None:
    # It trained, then wrote the tuned model over lora.onnx.data, the file lora.onnx reads its weights from.
    (tmp_path / "ext").mkdir()
    ir.save(om.mlp(hidden=16), str(tmp_path / "ext" / "lora.onnx"), external_data="lora.onnx.data", size_threshold_bytes=0)
    np.savez(tmp_path / "train.npz", **_data())
    data = tmp_path / "ext" / "lora.onnx.data"
    before = data.read_bytes()
    argv = ["train", str(tmp_path / "ext" / "lora.onnx"), "--data", str(tmp_path / "train.npz"), "--steps", "2",
            "-o", str(data), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is the external data file the input model reads its weights from" in err, err
    assert data.read_bytes() == before


def test_resume_past_the_asked_steps_says_so_and_writes_the_checkpoint_model(tmp_path: Path, capsys) -> None:
    # It used to print "trained 4 steps" for a call that trained none, with no word about the checkpoint.
    model, data = _files(tmp_path)
    common = ["train", str(model), "--data", str(data), "--batch-size", "16", "--checkpoint-dir", str(tmp_path / "ck"),
              "--no-progress"]
    four = _run_json(capsys, common + ["--steps", "4", "-o", str(tmp_path / "four.onnx"), "--json"])
    assert (four["steps"], four["steps_this_run"], four["resumed_from_step"]) == (4, 4, 0)
    with pytest.warns(UserWarning, match="already at step 4, past the 2 steps asked for: nothing was trained"):
        assert main(common + ["--steps", "2", "--resume", "-o", str(tmp_path / "two.onnx")]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("trained 0 steps (resumed at step 4; 4 in all): loss "), captured.out
    weights = [ir.load(str(tmp_path / f"{n}.onnx")).graph.initializers["fc1.lora_B.weight"].const_value.numpy()
               for n in ("four", "two")]
    np.testing.assert_array_equal(weights[1], weights[0])
    six = _run_json(capsys, common + ["--steps", "6", "--resume", "-o", str(tmp_path / "six.onnx"), "--json"])
    assert (six["steps"], six["steps_this_run"], six["resumed_from_step"]) == (6, 2, 4)
    assert six["losses"][:4] == four["losses"]


@pytest.mark.slow
def test_prefix_rewritten_onnx_file_trains_from_the_command_line(tmp_path: Path, capsys) -> None:
    """`rewrite --method prefix` then `train`: the prefix initializers were never trainable on ONNX files (the
    trainable set read the prefix record's top level, where its sites are not), so train refused the model."""
    from tests.onnx_corpus import corpus

    entry = corpus().get("gpt2-dynamo18")
    rewritten = tmp_path / "p.onnx"
    assert main(["rewrite", str(entry.path), "-o", str(rewritten), "--method", "prefix", "--num-virtual-tokens", "4"]) == 0
    ids = np.random.default_rng(0).integers(0, 50, (32, 6)).astype(np.int64)
    data = tmp_path / "lm.npz"
    feeds = {"input_ids": ids, "labels": (ids[:, :] * 7 + 3) % 50}  # a fixed token map: learnable through the prefixes
    names = {v.name for v in ir.load(str(rewritten)).graph.inputs}
    if "attention_mask" in names:
        feeds["attention_mask"] = np.ones_like(ids)
    np.savez(data, **feeds)
    out = tmp_path / "tuned.onnx"
    result = _run_json(capsys, ["train", str(rewritten), "--data", str(data), "--steps", "30", "--lr", "3e-2",
                                "--batch-size", "8", "-o", str(out), "--json", "--no-progress"])
    assert np.mean(result["losses"][-5:]) < np.mean(result["losses"][:5])
    before, after = ir.load(str(rewritten)).graph.initializers, ir.load(str(out)).graph.initializers
    prefixes = [n for n in before if "prefix" in n]
    assert prefixes and all(not np.array_equal(before[n].const_value.numpy(), after[n].const_value.numpy())
                            for n in prefixes)
