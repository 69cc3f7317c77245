"""``lora-fx rewrite`` and ``lora-fx sites`` on ONNX files: outputs, JSON, and bad input with no file written."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import lora_fx
from lora_fx.cli import main
from lora_fx.passes.onnx.insert_lora import lora_metadata
from lora_fx.sites import SiteKind
from tests.onnx_corpus import corpus


def _ort(path, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_rewrite_writes_a_model_with_unchanged_outputs(tmp_path, capsys):
    entry = corpus().get("gemm-mlp")
    out = tmp_path / "lora.onnx"
    rc = main(["rewrite", str(entry.path), "-o", str(out), "--method", "lora", "--r", "2", "--lora-alpha", "4",
               "--target-modules", "fc1,fc2", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "lora" and sorted(summary["sites"]) == ["fc1", "fc2"]
    assert summary["sites"]["fc1"]["scale"] == 2.0
    model = lora_fx.load(out)
    assert sorted(lora_metadata(model)) == ["fc1", "fc2"]
    onnx.checker.check_model(str(out), full_check=True)
    np.testing.assert_array_equal(_ort(out, entry.feeds())[0], _ort(entry.path, entry.feeds())[0])


def test_rewrite_text_output_and_regex_targets(tmp_path, capsys):
    entry = corpus().get("gemm-mlp")
    rc = main(["rewrite", str(entry.path), "-o", str(tmp_path / "l.onnx"), "--target-modules", "fc.*"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "2 sites adapted with lora" in text and "fc1  r=8" in text


def _expect_failure(argv, out, capsys, match: str) -> None:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    assert match in err, err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "no temporary file left"


def test_unknown_target_is_an_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    _expect_failure(["rewrite", str(corpus().get("gemm-mlp").path), "-o", str(out), "--target-modules", "fc9"], out, capsys,
                    "matches no linear site")


def test_truncated_input_is_an_error_and_writes_nothing(tmp_path, capsys):
    src = corpus().get("gemm-mlp").path
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(src.read_bytes()[:300])
    out = tmp_path / "o.onnx"
    _expect_failure(["rewrite", str(bad), "-o", str(out), "--target-modules", "fc1"], out, capsys, "trunc.onnx")


def test_unreadable_input_is_an_error(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    _expect_failure(["rewrite", str(tmp_path / "absent.onnx"), "-o", str(out), "--target-modules", "fc1"], out, capsys, "no such file")


def test_model_without_linear_sites_is_an_error(tmp_path, capsys):
    f = TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", f, [2])], [helper.make_tensor_value_info("y", f, [2])])
    src = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    out = tmp_path / "o.onnx"
    _expect_failure(["rewrite", str(src), "-o", str(out), "--target-modules", "all-linear"], out, capsys, "no linear site")


def test_second_rewrite_is_an_error_and_writes_nothing(tmp_path, capsys):
    first = tmp_path / "first.onnx"
    assert main(["rewrite", str(corpus().get("gemm-mlp").path), "-o", str(first), "--target-modules", "fc1"]) == 0
    capsys.readouterr()
    out = tmp_path / "second.onnx"
    _expect_failure(["rewrite", str(first), "-o", str(out), "--target-modules", "fc1"], out, capsys, "already has a LoRA adapter")


def test_missing_target_modules_and_same_output_are_errors(tmp_path, capsys):
    src = corpus().get("gemm-mlp").path
    out = tmp_path / "o.onnx"
    _expect_failure(["rewrite", str(src), "-o", str(out)], out, capsys, "--target-modules")
    rc = main(["rewrite", str(src), "-o", str(src), "--target-modules", "fc1"])
    assert rc != 0 and "is the input file" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["rewrite", "sites"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: lora-fx " + command in capsys.readouterr().out


def _help_text(argv, capsys) -> str:
    """``lora-fx ... --help`` with argparse's line wrapping undone, so that phrases match across lines."""
    with pytest.raises(SystemExit) as info:
        main(argv + ["--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_rewrite_help_says_what_quant_selects_and_when_outputs_change(capsys):
    # --quant said "every frozen linear weight", but the output layer and the --exclude-modules ones stay float; the
    # description said outputs are unchanged until training, untrue with --quant, --init random and --method prefix.
    text = _help_text(["rewrite"], capsys)
    assert "every linear layer but the output layer (lm_head) and the --exclude-modules ones" in text
    assert "nf4 runs them with MatMulBnb4, int4 with MatMulNBits, int8 with DequantizeLinear" in text
    assert "to leave out of the LoRA targets and, with --quant, out of quantization (kept in float)" in text
    assert "With --init kaiming (the default) or gaussian, B starts at zero, so the LoRA branches add nothing until " \
           "trained; the quantized weights of --quant, --init random and the prefixes of --method prefix change the " \
           "outputs at once." in text
    assert "every frozen linear weight" not in text and "outputs are unchanged until training" not in text


@pytest.mark.parametrize("dtype, op", [("nf4", "MatMulBnb4"), ("int4", "MatMulNBits"), ("int8", "DequantizeLinear")])
def test_quant_leaves_the_output_layer_and_excluded_modules_in_float_as_the_help_says(tmp_path, capsys, dtype, op):
    entry = corpus().get("llama-dynamo18")
    out = tmp_path / "q.onnx"
    assert main(["rewrite", str(entry.path), "-o", str(out), "--target-modules", "q_proj", "--quant", dtype,
                 "--exclude-modules", "down_proj", "--json"]) == 0
    quantized = sorted(s.split(":")[0] for s in json.loads(capsys.readouterr().out)["quant"]["sites"])
    linear = sorted(s.name for s in lora_fx.find_sites(lora_fx.load(entry.path)) if s.kind is SiteKind.LINEAR)
    assert "lm_head" in linear and quantized == [n for n in linear if n != "lm_head" and not n.endswith(".down_proj")]
    ops = [n.op_type for n in lora_fx.load(out).graph]
    assert ops.count(op) == len(quantized)


def test_a_quantized_classification_head_is_refused_with_the_cli_way_out(tmp_path, capsys):
    # --task-type SEQ_CLS trains the head in full; --quant packed it and the LoRA pass refused it in the Python API's
    # words ("QuantConfig(exclude_modules=['classifier']) or start from the float model", for a float input).
    from tests.lora_fx.test_onnx_modules_to_save import _bert
    from tests.shared_exports import user_export

    src = str(user_export(_bert, "torchscript"))
    argv = ["rewrite", src, "--target-modules", "query", "--quant", "nf4", "--task-type", "SEQ_CLS"]
    for given, way in ((None, "--exclude-modules classifier"), ("key", "--exclude-modules key,classifier"),
                       (".*key", "an --exclude-modules regex that also matches classifier")):
        out = tmp_path / "o.onnx"
        extra = ["--exclude-modules", given] if given else []
        assert main(argv + ["-o", str(out)] + extra) == 2
        err = capsys.readouterr().err
        assert ("--task-type SEQ_CLS trains classifier in full (as PEFT does), which needs float weights, but --quant "
                f"nf4 would store classifier quantized; keep it in float with {way}") in err, err
        assert "QuantConfig" not in err and "float model" not in err and not out.exists()
    # The way out it names works: the head stays float and is trained in full, the other layers are quantized.
    assert main(argv + ["-o", str(out), "--exclude-modules", "key,classifier", "--json"]) == 0
    quantized = [s.split(":")[0] for s in json.loads(capsys.readouterr().out)["quant"]["sites"]]
    assert quantized and not any(n.startswith("classifier") or n.endswith(".key") for n in quantized)
    assert lora_fx.load(out).graph.initializers["classifier.weight"].const_value.dtype.name == "FLOAT"


@pytest.mark.slow
def test_sites_json_reports_heads(capsys):
    entry = corpus().get("llama-dynamo18")
    assert main(["sites", str(entry.path), "--json"]) == 0
    sites = json.loads(capsys.readouterr().out)
    att = [s for s in sites if s["kind"] == "attention"]
    assert [(s["name"], s["num_heads"], s["kv_heads"], s["head_dim"]) for s in att] == [
        ("model.layers.0.self_attn", 4, 2, 8), ("model.layers.1.self_attn", 4, 2, 8)]
    lin = [s for s in sites if s["kind"] == "linear"]
    assert len(lin) == 15 and {"name", "in_features", "out_features"} <= set(lin[0])


def test_lora_dropout_reaches_the_graph_and_a_bad_rate_writes_nothing(tmp_path, capsys):
    entry = corpus().get("gemm-mlp")
    out = tmp_path / "d.onnx"
    assert main(["rewrite", str(entry.path), "-o", str(out), "--target-modules", "fc1", "--lora-dropout", "0.1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["config"]["lora_dropout"] == 0.1 and summary["sites"]["fc1"]["dropout"] == 0.1
    assert [n.op_type for n in lora_fx.load(out).graph].count("Dropout") == 1
    np.testing.assert_array_equal(_ort(out, entry.feeds())[0], _ort(entry.path, entry.feeds())[0])
    bad = tmp_path / "bad.onnx"
    _expect_failure(["rewrite", str(entry.path), "-o", str(bad), "--target-modules", "fc1", "--lora-dropout", "1.5"],
                    bad, capsys, "lora_dropout must be in [0, 1)")


@pytest.mark.parametrize("extra,match", [
    (["--method", "prefix", "--quant", "nf4"], "goes with --method lora"),
    (["--target-modules", "fc1", "--double-quant"], "--double-quant only apply with --quant"),
    (["--target-modules", "fc1", "--quant-block-size", "32"], "--quant-block-size only apply with --quant"),
])
def test_options_the_method_would_ignore_are_refused(tmp_path, capsys, extra, match):
    # Asked-for quantization that silently did not happen would be found out only in the file sizes.
    out = tmp_path / "o.onnx"
    _expect_failure(["rewrite", str(corpus().get("gemm-mlp").path), "-o", str(out)] + extra, out, capsys, match)


def test_a_block_size_int8_would_ignore_is_refused_and_nf4_int4_take_it(tmp_path, capsys):
    # int8 stores one scale per output channel: --quant-block-size 32 was accepted, recorded and silently ignored.
    src = str(corpus().get("gemm-mlp").path)
    out = tmp_path / "o.onnx"
    argv = ["rewrite", src, "-o", str(out), "--target-modules", "fc1", "--quant-block-size", "32", "--json"]
    assert main(argv + ["--quant", "int8"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not out.exists()
    assert ("--quant-block-size: --quant int8 stores one scale per output channel (DequantizeLinear on axis 0), not per "
            "block; drop --quant-block-size or use --quant nf4|int4") in captured.err
    for dtype in ("nf4", "int4"):
        assert main(argv + ["--quant", dtype]) == 0
        assert json.loads(capsys.readouterr().out)["quant"]["config"]["block_size"] == 32
        out.unlink()


def test_unwritable_output_is_refused_before_the_rewrite(tmp_path, capsys):
    src = str(corpus().get("gemm-mlp").path)
    (tmp_path / "a_file").write_text("x")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    # The output names a folder, or a folder that is a file: one line naming the path, not our temporary file.
    for out, match in ((tmp_path, "is a directory"), (tmp_path / "a_file" / "o.onnx", "a_file is a file, not a folder")):
        assert main(["rewrite", src, "-o", str(out), "--target-modules", "fc1"]) == 2
        err = capsys.readouterr().err
        assert match in err and ".tmp" not in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("extra,match", [
    (["--method", "prefix", "--exclude-modules", "fc1"], "--exclude-modules: options of --method lora, not of prefix"),
    (["--method", "prefix", "--r", "4", "--use-rslora"], "--r, --use-rslora: options of --method lora"),
    (["--target-modules", "fc1", "--num-virtual-tokens", "4"], "--num-virtual-tokens: options of --method prefix"),
])
def test_options_of_the_other_method_are_refused(tmp_path, capsys, extra, match):
    # --method prefix --exclude-modules X used to adapt X anyway.
    out = tmp_path / "o.onnx"
    _expect_failure(["rewrite", str(corpus().get("gemm-mlp").path), "-o", str(out)] + extra, out, capsys, match)


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf"])
def test_a_non_finite_lora_alpha_is_refused_and_writes_nothing(tmp_path, capsys, alpha):
    # --lora-alpha nan wrote a model whose adapted sites output NaN once B left zero, and exited 0.
    out = tmp_path / "o.onnx"
    _expect_failure(["rewrite", str(corpus().get("gemm-mlp").path), "-o", str(out), "--target-modules", "fc1",
                     f"--lora-alpha={alpha}"], out, capsys, "lora_alpha must be a finite number")


def test_external_data_outside_the_model_folder_is_refused_and_writes_nothing(tmp_path, capsys):
    # The rewrite ran and then failed inside onnx_ir's save with a ValueError traceback ("may indicate a path
    # traversal attack"); a location that onnx_ir did not check would have copied another file into the weights.
    src = corpus().get("gemm-mlp").path
    (tmp_path / "model").mkdir()
    proto = onnx.load(str(src))
    onnx.save(proto, str(tmp_path / "model" / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    (tmp_path / "model" / "m.onnx.data").rename(tmp_path / "elsewhere.data")
    proto = onnx.load(str(tmp_path / "model" / "m.onnx"), load_external_data=False)
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../elsewhere.data"
    onnx.save(proto, str(tmp_path / "model" / "m.onnx"))
    out = tmp_path / "o.onnx"
    _expect_failure(["rewrite", str(tmp_path / "model" / "m.onnx"), "-o", str(out), "--target-modules", "fc1"], out,
                    capsys, "outside the model's folder")


def test_an_output_that_is_a_pipe_is_refused_and_left_as_it_is(tmp_path, capsys):
    # "-o /dev/null" (as root) replaced the device with the model file; a FIFO stands in for the device.
    import os
    import stat

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert main(["rewrite", str(corpus().get("gemm-mlp").path), "-o", str(fifo), "--target-modules", "fc1"]) == 2
    assert "is not a regular file" in capsys.readouterr().err
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


@pytest.mark.parametrize("name, task_type, expected", [
    ("gpt2-dynamo18", None, "CAUSAL_LM"),  # from the model class the dynamo export records
    ("gpt2-torchscript", "CAUSAL_LM", "CAUSAL_LM"),  # TorchScript records none: given
    ("gpt2-torchscript", None, None),
])
def test_prefix_rewrite_saves_a_task_type_peft_applies_the_prefixes_with(tmp_path, capsys, name, task_type, expected):
    """A prefix adapter saved from an ONNX file had task_type None, and PeftModel.from_pretrained then runs the base
    model without the prefixes (PEFT injects them only through a task's PeftModel): 0.83 off the file's outputs."""
    import copy
    import warnings

    import peft
    import torch

    entry = corpus().get(name)
    out = tmp_path / "p.onnx"
    argv = ["rewrite", str(entry.path), "-o", str(out), "--method", "prefix", "--num-virtual-tokens", "3", "--json"]
    assert main(argv + (["--task-type", task_type] if task_type else [])) == 0
    assert json.loads(capsys.readouterr().out)["config"]["task_type"] == expected
    model = lora_fx.load(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora_fx.save_adapter(model, tmp_path / "peft")
    said = [str(w.message) for w in caught if "no task_type" in str(w.message)]
    assert bool(said) == (expected is None)
    if expected is None:
        return
    ids = np.random.default_rng(3).integers(0, 50, (2, 5)).astype(np.int64)
    feeds = {i.name: (ids if i.name == "input_ids" else np.ones_like(ids))
             for i in __import__("onnxruntime").InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()}
    want = _ort(out, feeds)[0]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(entry.model).eval(), tmp_path / "peft").eval()
    with torch.no_grad():
        got = pm(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    with torch.no_grad():
        base = entry.model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    assert np.abs(base - want).max() / np.abs(want).max() > 1e-3  # the prefixes matter: the comparison can fail


def test_an_output_that_would_replace_the_inputs_external_data_is_refused_before_the_rewrite(tmp_path, capsys, monkeypatch):
    # vendor.onnx reads its weights from model.onnx.data; -o model.onnx beside it wrote its own weights there
    # (exit 0), and the input model was lost.
    from lora_fx.commands import rewrite

    entry = corpus().get("gemm-mlp")
    folder = tmp_path / "vendor"
    folder.mkdir()
    onnx.save(onnx.load(str(entry.path)), str(folder / "vendor.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    data = folder / "model.onnx.data"
    before = data.read_bytes()

    def no_rewrite(model, args):
        raise AssertionError("the rewrite ran although the output was to be refused before it")

    monkeypatch.setitem(rewrite.METHODS, rewrite.Method.LORA, no_rewrite)
    for extra in (["--external-data"], []):  # without the flag the input's external weights go to a data file too
        assert main(["rewrite", str(folder / "vendor.onnx"), "-o", str(folder / "model.onnx"), "--target-modules", "fc1"] + extra) == 2
        err = capsys.readouterr().err
        assert "model.onnx.data is the external data file the input model reads its weights from" in err, err
        assert "Traceback" not in err
    assert data.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["model.onnx.data", "vendor.onnx"]
    monkeypatch.undo()
    # Written elsewhere, the same rewrite works and keeps the input's outputs (B starts at zero).
    out = tmp_path / "out" / "model.onnx"
    assert main(["rewrite", str(folder / "vendor.onnx"), "-o", str(out), "--target-modules", "fc1", "--external-data"]) == 0
    np.testing.assert_array_equal(_ort(out, entry.feeds())[0], _ort(entry.path, entry.feeds())[0])
