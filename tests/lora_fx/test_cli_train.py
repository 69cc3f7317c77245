"""``lora-fx train``: trains an ONNX model's adapters from .npz / JSON lines, writes the tuned model,
resumes a run killed with SIGKILL on the same loss curve, and writes nothing on bad input."""

from __future__ import annotations

import json
import os
import re
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


def _jsonl_rows(n: int = 8) -> list[dict]:
    d = _data(n)
    return [{"x": x.tolist(), "labels": int(y)} for x, y in zip(d["x"], d["labels"])]


@pytest.mark.parametrize("key,value,match", [
    ("x", None, "'x' holds null;"),
    ("x", [0.5] * 7 + [None], r"'x' holds null at \[7\];"),
    ("x", {"values": [0.5] * 8}, "'x' holds an object;"),
    ("x", [[0.5]] * 7 + [[{"a": 1}]], r"'x' holds an object at \[7\]\[0\];"),
    ("labels", None, "'labels' holds null;"),
    ("labels", "1", "'labels' holds the string '1';"),
    ("labels", 2**70, r"'labels' holds the integer 1180591620717411303424 \(beyond 64 bits\);"),
])
def test_jsonl_values_that_are_no_numbers_are_named_with_their_line(tmp_path: Path, capsys, key, value, match) -> None:
    # A null or an object used to reach the graph input check as an array of objects: "array 'x' has shape (8,),
    # but graph input 'x' is ('batch', 8)". The line counts blank lines, as an editor does.
    model, _ = _files(tmp_path)
    rows = [json.dumps(r) for r in _jsonl_rows()]
    rows[2] = json.dumps(dict(json.loads(rows[2]), **{key: value}))
    (tmp_path / "bad.jsonl").write_text(rows[0] + "\n\n" + "\n".join(rows[1:]) + "\n")
    out = tmp_path / "t.onnx"
    assert main(["train", str(model), "--data", str(tmp_path / "bad.jsonl"), "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"bad.jsonl line 4: {match} each value must be a number or a list of numbers", err), err
    assert "shape" not in err and "Traceback" not in err and not out.exists()


def test_jsonl_keys_the_run_does_not_feed_may_hold_anything(tmp_path: Path, capsys) -> None:
    # Only the graph inputs and the target must be numbers: an example's text or a null note stays beside them.
    model, _ = _files(tmp_path)
    plain, extra = tmp_path / "plain.jsonl", tmp_path / "extra.jsonl"
    plain.write_text("\n".join(json.dumps(r) for r in _jsonl_rows()))
    extra.write_text("\n".join(json.dumps(dict(r, text="a b c", note=None, meta={"i": i}))
                               for i, r in enumerate(_jsonl_rows())))
    runs = [_run_json(capsys, ["train", str(model), "--data", str(path), "--steps", "2", "--batch-size", "4",
                               "-o", str(tmp_path / f"{path.stem}.onnx"), "--json", "--no-progress"])["losses"]
            for path in (plain, extra)]
    assert runs[0] == runs[1] and len(runs[0]) == 2


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


VOCAB = 10


def _embedding_classifier(path: Path, ids_type: int = 7) -> Path:
    """ids [batch, seq] -> Gather over a 10-row embedding -> mean -> Gemm with LoRA on it (zero B): the shape of a
    token classifier, tiny. ``ids_type``: the ONNX type of the ids input (7: int64, 6: int32)."""
    from onnx import TensorProto, numpy_helper

    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.5  # noqa: E731
    inits = {"embed": f(VOCAB, 8), "axes": np.array([1], np.int64), "w": f(3, 8), "b": f(3),
             "fc.lora_A.weight": f(8, 2), "fc.lora_B.weight": np.zeros((2, 3), np.float32)}
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["e"], name="embed_lookup"),
             helper.make_node("ReduceMean", ["e", "axes"], ["m"], keepdims=0),
             helper.make_node("Gemm", ["m", "w", "b"], ["h"], transB=1),
             helper.make_node("MatMul", ["m", "fc.lora_A.weight"], ["ma"]),
             helper.make_node("MatMul", ["ma", "fc.lora_B.weight"], ["mab"]),
             helper.make_node("Add", ["h", "mab"], ["logits"])]
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", ids_type, ["batch", "seq"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    ir.save(ir.serde.deserialize_model(model), str(path))
    return path


def _ids_data(path: Path, ids: np.ndarray) -> Path:
    np.savez(path, ids=ids, labels=(ids[:, 0] % 3).astype(np.int64))
    return path


def _ids(n: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (n, 6))


def _train_argv(model: Path, data: Path, out: Path, steps: int = 3) -> list[str]:
    return ["train", str(model), "--data", str(data), "--steps", str(steps), "--lr", "1e-2", "-o", str(out),
            "--no-progress", "--json"]


@pytest.mark.parametrize("ids_type, dtype, shift, match", [
    (7, np.float32, 0.9, r"array 'ids' is float32, but graph input 'ids' takes int64: casting would truncate"),
    (7, np.float64, 0.0, r"array 'ids' is float64, but graph input 'ids' takes int64: casting would truncate"),
    (6, np.int64, 2**31, r"array 'ids' holds values from 2147483648 to 2147483657, but graph input 'ids' is int32"),
])
def test_data_the_input_dtype_cannot_hold_is_refused(tmp_path: Path, capsys, ids_type: int, dtype, shift: float,
                                                     match: str) -> None:
    """Float ids used to be truncated into the int64 input (3.9 -> 3) and trained on silently, as int64 values
    beyond int32 would wrap; `lora-fx run` refuses such feeds, and train does too, naming the array and the fix."""
    import re

    model = _embedding_classifier(tmp_path / "emb.onnx", ids_type)
    data = _ids_data(tmp_path / "train.npz", (_ids() + shift).astype(dtype))
    out = tmp_path / "t.onnx"
    assert main(_train_argv(model, data, out)) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err, err
    assert not out.exists()
    if dtype is np.float32:  # lora_fx.train on the ONNX model refuses such a batch too
        import lora_fx
        import torch

        from lora_fx.errors import ConfigError

        ids = torch.from_numpy((_ids() + shift).astype(dtype))
        with pytest.raises(ConfigError, match="'ids' is float32, but the graph input 'ids' is int64"):
            lora_fx.train(lora_fx.load(model), [{"ids": ids, "labels": torch.zeros(len(ids), dtype=torch.long)}],
                          lambda o, b: o["logits"].sum(), steps=1, progress=False)


def test_lossless_casts_train_as_the_declared_dtype(tmp_path: Path, capsys) -> None:
    """int32 ids for an int64 input (and int64 ids in int32's range for an int32 input) lose nothing: they train
    on the same loss curve as ids stored in the input's own dtype (the reference)."""
    for ids_type in (7, 6):
        model = _embedding_classifier(tmp_path / f"emb{ids_type}.onnx", ids_type)
        own = np.int64 if ids_type == 7 else np.int32
        other = np.int32 if ids_type == 7 else np.int64
        want = _run_json(capsys, _train_argv(model, _ids_data(tmp_path / "own.npz", _ids().astype(own)), tmp_path / "a.onnx"))
        got = _run_json(capsys, _train_argv(model, _ids_data(tmp_path / "other.npz", _ids().astype(other)), tmp_path / "b.onnx"))
        assert got["losses"] == want["losses"] and want["grad_norms"][0] > 0


def test_integer_data_into_a_float_input_only_where_exact(tmp_path: Path, capsys) -> None:
    """Integers go into a float32 input where float32 holds them exactly (the mlp's x, fed 0/1 as int64: the same
    curve as the float32 data); beyond 2**24 they would change, and are refused."""
    model, _ = _files(tmp_path)
    d = _data()
    bits = (d["x"] > 0).astype(np.int64)
    np.savez(tmp_path / "int.npz", x=bits, labels=d["labels"])
    np.savez(tmp_path / "float.npz", x=bits.astype(np.float32), labels=d["labels"])
    want = _run_json(capsys, _train_argv(model, tmp_path / "float.npz", tmp_path / "a.onnx"))
    assert _run_json(capsys, _train_argv(model, tmp_path / "int.npz", tmp_path / "b.onnx"))["losses"] == want["losses"]
    np.savez(tmp_path / "big.npz", x=bits + 2**24, labels=d["labels"])
    assert main(_train_argv(model, tmp_path / "big.npz", tmp_path / "c.onnx")) == 2
    err = capsys.readouterr().err
    assert "array 'x' holds integers up to 16777217, but graph input 'x' is float32" in err, err


def test_a_token_id_outside_the_vocabulary_is_a_data_error(tmp_path: Path, capsys) -> None:
    """An id >= the vocabulary size used to end in "internal error, IndexError" (exit 1, "a bug in lora-fx"); it is
    a data error (exit 2) naming the Gather node, the ids found and the table size, as ONNX Runtime refuses it."""
    model = _embedding_classifier(tmp_path / "emb.onnx")
    ids = _ids()
    ids[3, 2] = VOCAB
    data = _ids_data(tmp_path / "train.npz", ids)
    with pytest.raises(Exception, match="out of data bounds"):  # the reference: ONNX Runtime refuses these ids
        om.ort_run(model, {"ids": ids})
    out = tmp_path / "t.onnx"
    assert main(_train_argv(model, data, out)) == 2
    err = capsys.readouterr().err
    assert "Gather node 'embed_lookup': indices range from 0 to 10, but axis 0 of its data has size 10" in err, err
    assert "internal error" not in err and not out.exists()


def test_a_served_export_is_refused_naming_what_to_train(tmp_path: Path, capsys) -> None:
    """`lora-fx train served.onnx` (export --adapters: slots defaulting to zero A and B) used to exit 0 having
    trained nothing (every gradient zero). Refused before training; the rewritten file it came from trains."""
    import lora_fx
    from tests.exported import lora_onnx
    from tests.onnx_corpus import corpus

    lora = tmp_path / "lora.onnx"
    lora_fx.save(lora_onnx("gemm-mlp"), lora)
    assert main(["export", str(lora), "-o", str(tmp_path / "served.onnx"), "--adapters"]) == 0
    x = corpus().get("gemm-mlp").feeds()["x"]
    np.savez(tmp_path / "train.npz", x=x, labels=np.zeros((len(x), 5), np.float32))
    argv = ["--data", str(tmp_path / "train.npz"), "--loss", "mse", "--output", "y", "--steps", "2", "--no-progress"]
    capsys.readouterr()
    assert main(["train", str(tmp_path / "served.onnx"), "-o", str(tmp_path / "t.onnx"), *argv]) == 2
    err = capsys.readouterr().err
    assert "has adapter slots" in err and "Train the rewritten model it was exported from" in err, err
    assert not (tmp_path / "t.onnx").exists()
    result = _run_json(capsys, ["train", str(lora), "-o", str(tmp_path / "t.onnx"), *argv, "--json"])
    assert min(result["grad_norms"]) > 0
