"""``lora-fx run``: partial and rank-0 adapters, inputs files that are not an .npz of plain arrays, outputs
that have no mean, and output names np.savez would take for its own parameters; checked against ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import lora_fx
from lora_fx.cli import main
from lora_fx.onnx_adapter import OnnxAdapter, read_onnx_adapter, write_onnx_adapter
from tests.exported import lora_onnx, ort_run, rel
from tests.onnx_corpus import corpus

ENTRY = "gemm-mlp"


@pytest.fixture()
def served(tmp_path):
    """lora-fx export --adapters of a gemm-mlp LoRA model: the served model, its adapter, the feeds file and the
    LoRA model's own output."""
    lora = tmp_path / "lora.onnx"
    lora_fx.save(lora_onnx(ENTRY), lora)
    feeds = corpus().get(ENTRY).feeds()
    np.savez(tmp_path / "feeds.npz", **feeds)
    assert main(["export", str(lora), "-o", str(tmp_path / "served.onnx"), "--adapters", "--name", "legal"]) == 0
    return tmp_path / "served.onnx", tmp_path / "served.adapters" / "legal.onnx_adapter", feeds, ort_run(lora, feeds)


def test_an_adapter_covering_some_sites_is_run_with_a_warning_naming_the_rest(served, tmp_path, capsys):
    model, adapter, feeds, want = served
    good = read_onnx_adapter(adapter)
    partial = write_onnx_adapter(tmp_path / "partial.onnx_adapter", OnnxAdapter(
        {k: v for k, v in good.tensors.items() if k.startswith("fc1.")}, fingerprint=good.fingerprint))
    capsys.readouterr()
    assert main(["run", str(model), "--adapter", str(partial), "--inputs", str(tmp_path / "feeds.npz"),
                 "-o", str(tmp_path / "out.npz"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("lora-fx: warning: ") and "covers 1 of the 3 adapter sites" in err and err.rstrip().endswith("fc2, head"), err
    summary = json.loads(out)
    assert summary["default_sites"] == ["fc2", "head"]
    # What the warning says: fc2 and head ran as the base model. Reference: the LoRA model with their B at zero.
    lora = lora_onnx(ENTRY)
    for site in ("fc2", "head"):
        b = lora.graph.initializers[f"{site}.lora_B.weight"]
        b.const_value = ir.tensor(np.zeros_like(b.const_value.numpy()), name=b.name)
    lora_fx.save(lora, tmp_path / "fc1-only.onnx")
    with np.load(tmp_path / "out.npz", allow_pickle=False) as got:
        assert rel(got["y"], ort_run(tmp_path / "fc1-only.onnx", feeds)) <= 1e-5
    # The whole adapter: no warning, nothing left at the default.
    assert main(["run", str(model), "--adapter", str(adapter), "--inputs", str(tmp_path / "feeds.npz"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and json.loads(out)["default_sites"] == []
    assert main(["run", str(model), "--inputs", str(tmp_path / "feeds.npz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["default_sites"] is None  # no adapter at all


def test_a_rank0_adapter_is_refused_in_one_line(served, tmp_path, capsys):
    import onnxruntime as ort

    model, adapter, _, _ = served
    zero = {k: np.zeros((v.shape[0], 0) if ".lora_A" in k else (0, v.shape[1]), v.dtype)
            for k, v in read_onnx_adapter(adapter).tensors.items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in zero.items()})
    fmt.export_adapter(str(tmp_path / "zero.onnx_adapter"))
    capsys.readouterr()
    assert main(["run", str(model), "--adapter", str(tmp_path / "zero.onnx_adapter"), "--inputs", str(tmp_path / "feeds.npz"),
                 "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "zero-size (rank 0)" in err and "r >= 1" in err, err


def test_inputs_files_that_are_not_an_npz_of_arrays_are_named(served, tmp_path, capsys):
    model, _, feeds, _ = served
    np.save(tmp_path / "x.npy", feeds["x"])
    (tmp_path / "notes.txt").write_text("x = 1, 2, 3")
    np.savez(tmp_path / "pickled.npz", x=np.array([{"x": 1}], dtype=object))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "feeds.npz").read_bytes()[:100])
    (tmp_path / "empty.npz").write_bytes(b"")
    import zipfile

    with zipfile.ZipFile(tmp_path / "raw.npz", "w") as zf:  # a zip of arrays, but not as np.savez writes them
        zf.writestr("x", feeds["x"].tobytes())
    cases = {
        # np.load gives a bare array here: it used to end in "TypeError: ... context manager protocol".
        "x.npy": "is a single .npy array",
        # np.load takes any other file for a pickle, so the message was about pickles.
        "notes.txt": "is not an .npz file (a zip of arrays",
        str(model): "is not an .npz file",
        "empty.npz": "is not an .npz file",
        "pickled.npz": "holds object arrays, which need pickle and are refused",
        "cut.npz": "truncated or corrupt?",
        # np.load hands back such an entry as its raw bytes: run's own reader fed them to the session, which
        # refused input 'x' as "not an array", naming neither the file nor how to write one.
        "raw.npz": "entries ['x'] are not .npy arrays (the zip was not written by np.savez); write it again with np.savez(",
    }
    capsys.readouterr()
    for name, message in cases.items():
        assert main(["run", str(model), "--inputs", str(tmp_path / name), "--json"]) == 2, name
        out, err = capsys.readouterr()
        assert out == "" and message in err and err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert "pickle" not in err or name == "pickled.npz", err


def test_an_empty_batch_runs_and_its_outputs_have_no_mean(served, tmp_path, capsys):
    model, adapter, feeds, _ = served
    np.savez(tmp_path / "empty.npz", x=feeds["x"][:0])
    capsys.readouterr()
    assert main(["run", str(model), "--adapter", str(adapter), "--inputs", str(tmp_path / "empty.npz"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == "", err  # numpy's "Mean of empty slice" warnings used to land here
    assert json.loads(out)["outputs"]["y"] == {"shape": [0, 5], "dtype": "float32", "mean": None, "std": None, "first": []}
    assert main(["run", str(model), "--inputs", str(tmp_path / "empty.npz")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "y: shape (0, 5) float32"


def test_outputs_named_like_savez_parameters_are_saved(tmp_path, capsys):
    # np.savez(f, **outputs) took an output named "file" for its own file argument (a TypeError) and one named
    # allow_pickle for its flag (the output silently lost).
    names = ["file", "allow_pickle", "y"]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["file"]), helper.make_node("Neg", ["x"], ["allow_pickle"]),
         helper.make_node("Abs", ["x"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 3]) for n in names])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), tmp_path / "m.onnx")
    x = np.array([[1.0, -2.0, 3.0]], np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    assert main(["run", str(tmp_path / "m.onnx"), "--inputs", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz")]) == 0
    import onnxruntime as ort

    wants = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(names, {"x": x})
    with np.load(tmp_path / "out.npz", allow_pickle=False) as got:
        assert sorted(got.files) == sorted(names)
        for name, want in zip(names, wants):
            np.testing.assert_array_equal(got[name], want)


def test_merging_a_partial_adapter_gives_what_run_serves(served, tmp_path, capsys):
    """export --merge --adapter folds what the adapter covers and warns about the rest, as run does (it used to
    refuse the adapter that run accepts)."""
    model, adapter, feeds, _ = served
    good = read_onnx_adapter(adapter)
    partial = write_onnx_adapter(tmp_path / "partial.onnx_adapter", OnnxAdapter(
        {k: v for k, v in good.tensors.items() if k.startswith("fc1.")}, fingerprint=good.fingerprint))
    assert main(["run", str(model), "--adapter", str(partial), "--inputs", str(tmp_path / "feeds.npz"),
                 "-o", str(tmp_path / "served_out.npz")]) == 0
    capsys.readouterr()
    assert main(["export", str(model), "-o", str(tmp_path / "merged.onnx"), "--merge", "--adapter", str(partial), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["default_sites"] == ["fc2", "head"]
    assert err.startswith("lora-fx: warning: ") and err.rstrip().endswith("fc2, head"), err
    with np.load(tmp_path / "served_out.npz", allow_pickle=False) as served_out:
        assert rel(ort_run(tmp_path / "merged.onnx", feeds), served_out["y"]) <= 1e-5
    assert rel(ort_run(tmp_path / "merged.onnx", feeds), ort_run(corpus().get(ENTRY).path, feeds)) > 1e-4  # fc1 merged
    # The whole adapter: no warning.
    assert main(["export", str(model), "-o", str(tmp_path / "merged2.onnx"), "--merge", "--adapter", str(adapter)]) == 0
    assert capsys.readouterr().err == ""


def test_a_nan_adapter_is_refused_not_served(served, tmp_path, capsys):
    from lora_fx.onnx_adapter import export_tensors

    model, adapter, _, _ = served
    good = read_onnx_adapter(adapter)
    nan = {k: np.full_like(v, np.nan) for k, v in good.tensors.items()}
    export_tensors(tmp_path / "nan.onnx_adapter", nan, good.short_fingerprint)
    # What run did: exit 0, outputs all NaN (plain ONNX Runtime serves the file as it is).
    assert np.isnan(ort_run(model, corpus().get(ENTRY).feeds(), adapter=tmp_path / "nan.onnx_adapter")).all()
    capsys.readouterr()
    assert main(["run", str(model), "--adapter", str(tmp_path / "nan.onnx_adapter"), "--inputs", str(tmp_path / "feeds.npz"),
                 "-o", str(tmp_path / "out.npz"), "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert "nan.onnx_adapter: adapter tensor" in err and "NaN or inf values" in err and "train again" in err, err
    assert not (tmp_path / "out.npz").exists()
    # Nor folded into a model by export --merge --adapter.
    assert main(["export", str(model), "-o", str(tmp_path / "merged.onnx"), "--merge",
                 "--adapter", str(tmp_path / "nan.onnx_adapter")]) == 2
    assert "NaN or inf values" in capsys.readouterr().err and not (tmp_path / "merged.onnx").exists()


def test_an_empty_output_path_is_refused(served, tmp_path, capsys, monkeypatch):
    # -o "" (an unset shell variable) was taken for no -o: the outputs were printed, saved nowhere, exit 0.
    model, adapter, feeds, want = served
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(["run", str(model), "--adapter", str(adapter), "--inputs", str(tmp_path / "feeds.npz"), "-o", ""]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "-o '' is an empty path; name the .npz file for the outputs, or leave -o out" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # A named path gets the outputs: the LoRA model's own.
    assert main(["run", str(model), "--adapter", str(adapter), "--inputs", str(tmp_path / "feeds.npz"), "-o", "out.npz"]) == 0
    with np.load(tmp_path / "out.npz", allow_pickle=False) as got:
        assert rel(got["y"], want) <= 1e-5


def _run_line(argv: list[str], capsys) -> tuple[str, np.ndarray]:
    """The adapter line ``lora-fx run`` prints and the first output it saved."""
    capsys.readouterr()
    assert main(argv) == 0
    line = capsys.readouterr().out.splitlines()[0]
    out = argv[argv.index("-o") + 1]
    with np.load(out) as saved:
        return line, saved[saved.files[0]]


def test_without_an_adapter_run_says_what_the_file_runs(served, tmp_path, capsys):
    # It said "adapter: none (base model)" for every file, also for a trained file that runs its own LoRA.
    model, _, _, lora_out = served
    base = corpus().get(ENTRY).path
    feeds = str(tmp_path / "feeds.npz")
    want_base = ort_run(base, corpus().get(ENTRY).feeds())
    assert rel(lora_out, want_base) > 1e-3  # the LoRA file is no base model: the checks below can fail

    line, got = _run_line(["run", str(tmp_path / "lora.onnx"), "--inputs", feeds, "-o", str(tmp_path / "a.npz")], capsys)
    assert line.endswith("adapter: none (the file's own weights)"), line
    assert rel(got, lora_out) < 1e-6
    line, got = _run_line(["run", str(model), "--inputs", feeds, "-o", str(tmp_path / "b.npz")], capsys)
    assert line.endswith("adapter: none (slot defaults: the base model)"), line
    assert rel(got, want_base) < 1e-5  # what ONNX Runtime runs at zeroed LoRA slots
    capsys.readouterr()
    assert main(["run", str(model), "--inputs", feeds, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["adapter"] is None and summary["runs"] == "none (slot defaults: the base model)"


@pytest.mark.slow
def test_a_served_prefix_file_without_an_adapter_runs_its_exported_prefixes_and_says_so(tmp_path, capsys):
    # A served prefix file's slots default to the exported prefixes: "none (base model)" was false there.
    entry = corpus().get("gpt2-dynamo18")
    rewritten, served = tmp_path / "p.onnx", tmp_path / "served.onnx"
    assert main(["rewrite", str(entry.path), "-o", str(rewritten), "--method", "prefix", "--num-virtual-tokens", "4"]) == 0
    assert main(["export", str(rewritten), "-o", str(served), "--adapters"]) == 0
    ids = np.random.default_rng(0).integers(0, 50, (2, 6)).astype(np.int64)
    names = {v.name for v in ir.load(str(entry.path)).graph.inputs}
    feeds = {k: v for k, v in {"input_ids": ids, "attention_mask": np.ones_like(ids)}.items() if k in names}
    np.savez(tmp_path / "feeds.npz", **feeds)
    line, got = _run_line(["run", str(served), "--inputs", str(tmp_path / "feeds.npz"), "-o", str(tmp_path / "o.npz")], capsys)
    assert "adapter: none (slot defaults: the exported prefixes at " in line and "not the base model" in line, line
    assert rel(got, ort_run(rewritten, feeds)) < 1e-5
    assert rel(got, ort_run(entry.path, feeds)) > 1e-3  # the prefixes change the output: not the base model

