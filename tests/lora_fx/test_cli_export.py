"""lora-fx export (--merge / --adapters) and lora-fx run, on a LoRA ONNX model, checked against ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

import lora_fx
from lora_fx.cli import main
from tests.exported import lora_onnx, ort_run, rel
from tests.onnx_corpus import corpus

ENTRY = "gemm-mlp"


@pytest.fixture()
def lora_file(tmp_path):
    path = tmp_path / "lora.onnx"
    lora_fx.save(lora_onnx(ENTRY), path)
    feeds = corpus().get(ENTRY).feeds()
    np.savez(tmp_path / "feeds.npz", **feeds)
    return path, feeds, ort_run(path, feeds)


def _files(directory):
    return sorted(p.name for p in directory.rglob("*"))


def test_merge_writes_a_plain_model_with_the_lora_outputs(lora_file, tmp_path, capsys):
    path, feeds, want = lora_file
    assert main(["export", str(path), "-o", str(tmp_path / "merged.onnx"), "--merge", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mode"] == "merged" and summary["sites"] == ["fc1", "fc2", "head"]
    assert rel(ort_run(tmp_path / "merged.onnx", feeds), want) <= 1e-5
    merged = ir.load(str(tmp_path / "merged.onnx"))
    assert [n.op_type for n in merged.graph] == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]


def test_adapters_then_run_with_the_adapter_and_merge_it_back(lora_file, tmp_path, capsys):
    path, feeds, want = lora_file
    served = tmp_path / "served.onnx"
    assert main(["export", str(path), "-o", str(served), "--adapters", "--name", "legal"]) == 0
    adapter = tmp_path / "served.adapters" / "legal.onnx_adapter"
    assert adapter.is_file() and (tmp_path / "served.adapters" / "legal" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert main(["run", str(served), "--adapter", str(adapter), "--inputs", str(tmp_path / "feeds.npz"),
                 "-o", str(tmp_path / "out.npz"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["providers"][-1] == "CPUExecutionProvider"
    with np.load(tmp_path / "out.npz", allow_pickle=False) as out:
        assert rel(out["y"], want) <= 1e-5
    assert summary["outputs"]["y"]["shape"] == list(want.shape)
    # Without --adapter: the base model.
    assert main(["run", str(served), "--inputs", str(tmp_path / "feeds.npz"), "-o", str(tmp_path / "base.npz")]) == 0
    with np.load(tmp_path / "base.npz") as out:
        np.testing.assert_array_equal(out["y"], ort_run(corpus().get(ENTRY).path, feeds))
    # Fold the adapter file into the served model: the LoRA model as a plain model.
    assert main(["export", str(served), "-o", str(tmp_path / "m.onnx"), "--merge", "--adapter", str(adapter)]) == 0
    assert rel(ort_run(tmp_path / "m.onnx", feeds), want) <= 1e-5


def test_errors_exit_non_zero_with_a_message_and_write_nothing(lora_file, tmp_path, capsys):
    path, feeds, _ = lora_file
    before = _files(tmp_path)
    # NaN in an adapter: the merge is refused and no output appears.
    bad = lora_fx.load(path)
    b = bad.graph.initializers["fc1.lora_B.weight"]
    arr = b.const_value.numpy().copy()
    arr[0, 0] = np.nan
    b.const_value = ir.tensor(arr, name=b.name)
    lora_fx.save(bad, tmp_path / "nan.onnx")
    before = _files(tmp_path)
    assert main(["export", str(tmp_path / "nan.onnx"), "-o", str(tmp_path / "out.onnx"), "--merge"]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert _files(tmp_path) == before
    assert main(["export", str(tmp_path / "nan.onnx"), "-o", str(tmp_path / "out.onnx"), "--adapters"]) == 2
    assert "NaN" in capsys.readouterr().err
    assert _files(tmp_path) == before
    # A model without LoRA, a served model merged without an adapter, pickled inputs.
    assert main(["export", str(corpus().get(ENTRY).path), "-o", str(tmp_path / "out.onnx"), "--adapters"]) == 2
    assert "no LoRA adapters" in capsys.readouterr().err
    main(["export", str(path), "-o", str(tmp_path / "served.onnx"), "--adapters"])
    assert main(["export", str(tmp_path / "served.onnx"), "-o", str(tmp_path / "out.onnx"), "--merge"]) == 2
    assert "--merge --adapter" in capsys.readouterr().err
    # Options of --adapters given to --merge would be ignored: refused instead.
    assert main(["export", str(path), "-o", str(tmp_path / "out.onnx"), "--merge", "--name", "legal", "--no-peft"]) == 2
    assert "--name and --no-peft go with --adapters" in capsys.readouterr().err
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "pickled.npz", x=np.array([{"x": 1}], dtype=object))
    assert main(["run", str(tmp_path / "served.onnx"), "--inputs", str(tmp_path / "pickled.npz")]) == 2
    assert "pickle" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "served.onnx"), "--adapter", str(tmp_path / "none.onnx_adapter"), "--inputs", str(tmp_path / "feeds.npz")]) == 2
    assert "no such adapter file" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_run_refuses_to_write_its_outputs_over_an_input(lora_file, tmp_path, capsys):
    path, _, _ = lora_file
    served = tmp_path / "served.onnx"
    assert main(["export", str(path), "-o", str(served), "--adapters"]) == 0
    feeds = tmp_path / "feeds.npz"
    kept = feeds.read_bytes()
    capsys.readouterr()
    # -o feeds.npz used to succeed and replace the inputs with the outputs.
    for out in (feeds, served, tmp_path):
        assert main(["run", str(served), "--inputs", str(feeds), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert "is an input of this command" in err or "is a directory" in err, err
    assert feeds.read_bytes() == kept


def test_adapters_paths_are_checked_before_the_model_is_written(lora_file, tmp_path, capsys):
    path, _, _ = lora_file
    # served.adapters is a file: the adapters could not be written after the model, which used to be left
    # alone (a model without its adapter) with a FileExistsError traceback.
    (tmp_path / "served.adapters").write_text("not a folder")
    before = _files(tmp_path)
    assert main(["export", str(path), "-o", str(tmp_path / "served.onnx"), "--adapters"]) == 2
    err = capsys.readouterr().err
    assert "served.adapters is a file, not a folder" in err and "Traceback" not in err, err
    # A name with a path in it would write outside the adapters folder.
    assert main(["export", str(path), "-o", str(tmp_path / "other.onnx"), "--adapters", "--name", "../escaped"]) == 2
    assert "use a plain name" in capsys.readouterr().err
    assert _files(tmp_path) == before


def test_run_json_is_strict_json_when_outputs_are_nan(lora_file, tmp_path, capsys):
    path, feeds, _ = lora_file
    served = tmp_path / "served.onnx"
    assert main(["export", str(path), "-o", str(served), "--adapters"]) == 0
    x = next(iter(feeds.values())).copy()
    x[0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", **{next(iter(feeds)): x})
    capsys.readouterr()
    assert main(["run", str(served), "--inputs", str(tmp_path / "nan.npz"), "--json"]) == 0

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    # NaN / Infinity tokens (what json.dumps writes by default) break JSON.parse and other strict readers.
    summary = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert summary["outputs"]["y"]["mean"] is None and None in summary["outputs"]["y"]["first"]


@pytest.mark.parametrize("flag", ["--float", "--requantize"])
def test_a_quantization_flag_on_a_float_model_is_said_to_have_no_effect(lora_file, tmp_path, capsys, flag):
    """--merge --float (or --requantize) on a model with no quantized weight was accepted silently."""
    path, feeds, want = lora_file
    assert main(["export", str(path), "-o", str(tmp_path / "plain.onnx"), "--merge"]) == 0
    capsys.readouterr()
    assert main(["export", str(path), "-o", str(tmp_path / "flagged.onnx"), "--merge", flag, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["mode"] == "merged"  # stdout stays the JSON alone
    assert err == (f"lora-fx: warning: {flag} has no effect: no adapter site of lora.onnx has a quantized weight (MatMulBnb4, "
                   "MatMulNBits, DequantizeLinear), so its adapters were merged into its float weights as without it\n"), err
    # What the warning says: the model is the plain merge, which computes the LoRA model.
    np.testing.assert_array_equal(ort_run(tmp_path / "flagged.onnx", feeds), ort_run(tmp_path / "plain.onnx", feeds))
    assert rel(ort_run(tmp_path / "flagged.onnx", feeds), want) <= 1e-5
    # On a quantized model the flag acts, and nothing is said.
    import torch

    torch.manual_seed(0)
    quantized = lora_fx.apply(lora_fx.load(corpus().get(ENTRY).path),
                              lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=".*", init_lora_weights=False),
                              quant=lora_fx.QuantConfig(dtype="int8", target_modules=".*"))
    lora_fx.save(quantized, tmp_path / "q.onnx")
    assert main(["export", str(tmp_path / "q.onnx"), "-o", str(tmp_path / "q-merged.onnx"), "--merge", flag, "--json"]) == 0
    assert capsys.readouterr().err == ""
    tolerance = 1e-5 if flag == "--float" else 2e-2  # requantizing adds int8 rounding
    assert rel(ort_run(tmp_path / "q-merged.onnx", feeds), ort_run(tmp_path / "q.onnx", feeds)) <= tolerance
    # Quantized weights away from the adapter sites: the flag acts on none of them, which is said.
    torch.manual_seed(0)
    apart = lora_fx.apply(lora_fx.load(corpus().get(ENTRY).path),
                          lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"], init_lora_weights=False),
                          quant=lora_fx.QuantConfig(dtype="int8", target_modules=["fc2", "head"]))
    lora_fx.save(apart, tmp_path / "apart.onnx")
    assert main(["export", str(tmp_path / "apart.onnx"), "-o", str(tmp_path / "apart-merged.onnx"), "--merge", flag]) == 0
    assert "has no effect: no adapter site of apart.onnx has a quantized weight" in capsys.readouterr().err
    assert rel(ort_run(tmp_path / "apart-merged.onnx", feeds), ort_run(tmp_path / "apart.onnx", feeds)) <= 1e-5


def test_a_single_adapters_option_given_to_merge_is_refused_in_the_singular(lora_file, tmp_path, capsys):
    path, _, _ = lora_file
    for given, message in ((["--name", "legal"], "--name goes with --adapters"), (["--no-peft"], "--no-peft goes with --adapters"),
                           (["--name", "legal", "--no-peft"], "--name and --no-peft go with --adapters")):
        assert main(["export", str(path), "-o", str(tmp_path / "out.onnx"), "--merge", *given]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


def test_export_names_a_text_file_given_as_adapter_by_its_content(lora_file, tmp_path, capsys):
    path, _, _ = lora_file
    assert main(["export", str(path), "-o", str(tmp_path / "served.onnx"), "--adapters"]) == 0
    (tmp_path / "text.onnx").write_text("not an adapter: a note\n")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "served.onnx"), "-o", str(tmp_path / "m.onnx"), "--merge", "--adapter",
                 str(tmp_path / "text.onnx")]) == 2
    err = capsys.readouterr().err
    assert "text.onnx is not a readable .onnx_adapter file (a text file, not an adapter;" in err, err
    assert "ONNX model" not in err and not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_a_prefix_tuned_onnx_file_exports_as_slots_and_refuses_merge(tmp_path, capsys):
    """`export --adapters` of a prefix-rewritten file was refused as having "no LoRA adapters"; serving prefixes
    worked only from a torch graph. Trained prefixes from the command line now come out as slots and files."""
    import copy

    import torch

    entry = corpus().get("gpt2-dynamo18")
    rewritten, trained = tmp_path / "p.onnx", tmp_path / "t.onnx"
    assert main(["rewrite", str(entry.path), "-o", str(rewritten), "--method", "prefix", "--num-virtual-tokens", "4"]) == 0
    ids = np.random.default_rng(0).integers(0, 50, (16, 6)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    names = {v.name for v in ir.load(str(rewritten)).graph.inputs}
    feeds = {k: v for k, v in feeds.items() if k in names}
    np.savez(tmp_path / "d.npz", **feeds, labels=(ids * 7 + 3) % 50)
    assert main(["train", str(rewritten), "--data", str(tmp_path / "d.npz"), "--steps", "5", "--lr", "5e-2",
                 "-o", str(trained), "--no-progress"]) == 0
    capsys.readouterr()
    want = ort_run(trained, feeds)
    assert rel(want, ort_run(rewritten, feeds)) > 1e-3  # training moved the prefixes: the checks below can fail

    rc = main(["export", str(trained), "-o", str(tmp_path / "m.onnx"), "--merge"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be folded" in err and "--adapters" in err and not (tmp_path / "m.onnx").exists()

    served = tmp_path / "served.onnx"
    assert main(["export", str(trained), "-o", str(served), "--adapters", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mode"] == "adapters" and summary["sites"]
    adapter = summary["adapters"][0]
    assert rel(ort_run(served, feeds, adapter), want) < 1e-5
    assert rel(ort_run(served, feeds), want) < 1e-5  # the slots default to the prefixes trained
    # The untrained prefixes as a second adapter: the same session switches to them.
    other = tmp_path / "other.onnx"
    assert main(["export", str(rewritten), "-o", str(other), "--adapters", "--name", "untrained", "--json"]) == 0
    untrained = json.loads(capsys.readouterr().out)["adapters"][0]
    assert rel(ort_run(served, feeds, untrained), ort_run(rewritten, feeds)) < 1e-5
    # The PEFT directory beside it gives PEFT's model the same logits.
    import peft

    model = peft.PeftModel.from_pretrained(copy.deepcopy(entry.model).eval(), summary["peft_dirs"][0]).eval()
    with torch.no_grad():
        logits = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    assert rel(logits, want) < 1e-4


@pytest.mark.parametrize("mode", ["--merge", "--adapters"])
def test_an_output_that_would_replace_the_inputs_external_data_is_refused(lora_file, tmp_path, capsys, mode):
    # lora.onnx with its weights in model.onnx.data: -o model.onnx beside it wrote the output's weights over them.
    import onnx

    path, feeds, want = lora_file
    vendor = tmp_path / "vendor.onnx"
    onnx.save(onnx.load(str(path)), str(vendor), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    data = tmp_path / "model.onnx.data"
    before, files = data.read_bytes(), _files(tmp_path)
    assert main(["export", str(vendor), "-o", str(tmp_path / "model.onnx"), mode]) == 2
    err = capsys.readouterr().err
    assert "model.onnx.data is the external data file the input model reads its weights from" in err and "Traceback" not in err, err
    assert data.read_bytes() == before and _files(tmp_path) == files
    assert rel(ort_run(vendor, feeds), want) <= 1e-6  # the input still runs as before


def test_base_initializers_listed_as_inputs_are_not_taken_for_adapter_slots(tmp_path, capsys):
    """Files of IR version < 4 (and exporters' keep_initializers_as_inputs) list every initializer as an input;
    only adapter tensors that are inputs make a served file."""
    model = lora_onnx(ENTRY)
    for name, value in model.graph.initializers.items():
        if "lora_" not in name:
            model.graph.inputs.append(value)
    path = tmp_path / "lora.onnx"
    lora_fx.save(model, path)
    feeds = corpus().get(ENTRY).feeds()
    want = ort_run(path, feeds)
    served = tmp_path / "served.onnx"
    assert main(["export", str(path), "-o", str(served), "--adapters", "--name", "a"]) == 0
    assert main(["export", str(served), "-o", str(tmp_path / "m.onnx"), "--merge", "--adapter",
                 str(tmp_path / "served.adapters" / "a.onnx_adapter")]) == 0
    assert rel(ort_run(tmp_path / "m.onnx", feeds), want) <= 1e-5
    assert main(["export", str(path), "-o", str(tmp_path / "merged.onnx"), "--merge"]) == 0
    assert rel(ort_run(tmp_path / "merged.onnx", feeds), want) <= 1e-5


def _prefix_file(tmp_path, capsys, *targets, entry_name="gpt2-torchscript"):
    """The corpus GPT-2 rewritten with 3 prefix tokens at ``targets`` (every attention site when none), its feeds and
    the rewritten file's ORT output."""
    entry = corpus().get(entry_name)
    path = tmp_path / "p.onnx"
    flags = ["--target-modules", ",".join(targets)] if targets else []
    assert main(["rewrite", str(entry.path), "-o", str(path), "--method", "prefix", "--num-virtual-tokens", "3",
                 "--task-type", "CAUSAL_LM", *flags]) == 0
    capsys.readouterr()
    feeds = {k: v for k, v in entry.feeds().items() if k in {i.name for i in ir.load(str(path)).graph.inputs}}
    return entry, path, feeds, ort_run(path, feeds)


def _attention_sites(entry):
    from lora_fx.passes.onnx.find_sites import find_sites
    from lora_fx.sites import SiteKind

    return [s.name for s in find_sites(lora_fx.load(entry.path)) if s.kind is SiteKind.ATTENTION]


def test_prefixes_on_some_layers_export_their_onnx_adapter_and_no_peft_directory(tmp_path, capsys):
    """PEFT's prefix-tuning gives every layer a prefix: a PEFT directory for one of two layers (num_layers 1, plus a
    target_modules key PEFT ignores) crashed PEFT's forward, and export wrote it with exit 0. It is now skipped with a
    warning saying why; the served model and its .onnx_adapter, which hold any subset, are written as before."""
    sites = _attention_sites(corpus().get("gpt2-torchscript"))
    assert len(sites) == 2
    entry, path, feeds, want = _prefix_file(tmp_path, capsys, sites[0])
    served = tmp_path / "served.onnx"
    # The CLI prints it as a "lora-fx: warning:" line.
    with pytest.warns(UserWarning, match="^p.onnx: no PEFT directory written") as caught:
        assert main(["export", str(path), "-o", str(served), "--adapters", "--json"]) == 0
    said = str(caught[0].message)
    assert "no per-layer targets" in said and "1 of the model's 2 attention layers" in said and sites[1] in said
    assert "--no-peft" in said and "without --target-modules" in said
    summary = json.loads(capsys.readouterr().out)
    assert "peft_dirs" not in summary and "no per-layer targets" in summary["peft_skipped"]
    assert _files(tmp_path / "served.adapters") == ["default.onnx_adapter", "default.onnx_adapter.json"]
    assert summary["sites"] == [sites[0]]
    # The served model, without and with its adapter, computes what the rewritten file computes.
    assert rel(ort_run(served, feeds), want) < 1e-5
    assert rel(ort_run(served, feeds, summary["adapters"][0]), want) < 1e-5
    assert rel(want, ort_run(entry.path, feeds)) > 1e-3  # the prefixes change the outputs: the checks above can fail
    # --no-peft asks for what was done: no warning.
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["export", str(path), "-o", str(tmp_path / "quiet.onnx"), "--adapters", "--no-peft"]) == 0
    assert not [w for w in caught if "PEFT" in str(w.message)]


def test_prefixes_on_every_layer_named_in_target_modules_give_a_peft_directory_peft_runs(tmp_path, capsys):
    """target_modules naming every attention site is PEFT's layout: the PEFT directory is written, without lora_fx's
    target_modules (not a PEFT field; it named ONNX sites, which a torch capture names otherwise), and PEFT's model
    gives the served model's logits."""
    import copy

    import peft
    import torch

    entry = corpus().get("gpt2-torchscript")
    entry, path, feeds, want = _prefix_file(tmp_path, capsys, *_attention_sites(entry))
    served = tmp_path / "served.onnx"
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["export", str(path), "-o", str(served), "--adapters", "--json"]) == 0
    assert not [w for w in caught if "PEFT" in str(w.message)]
    directory = json.loads(capsys.readouterr().out)["peft_dirs"][0]
    config = json.loads((tmp_path / "served.adapters" / "default" / "adapter_config.json").read_text())
    assert "target_modules" not in config and config["num_layers"] == 2
    model = peft.PeftModel.from_pretrained(copy.deepcopy(entry.model).eval(), directory).eval()
    with torch.no_grad():
        logits = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    assert rel(logits, want) < 1e-5


@pytest.mark.parametrize("order", ["lora-on-prefix", "prefix-on-lora"])
def test_a_file_with_prefixes_and_lora_is_refused_by_export_and_save_adapter(tmp_path, capsys, order):
    """export --adapters of a file holding both took the LoRA path: the prefixes were baked into the served model as
    constants (no slots, not in the adapter files, "no adapter" not the base model), with exit 0. Neither export mode
    nor save_adapter (which wrote the prefixes alone) can serve both kinds: refused, nothing written."""
    entry = corpus().get("gpt2-torchscript")
    first, both = tmp_path / "one.onnx", tmp_path / "both.onnx"
    prefix = ["--method", "prefix", "--num-virtual-tokens", "3"]
    lora = ["--method", "lora", "--r", "2", "--target-modules", "all-linear"]
    steps = (prefix, lora) if order == "lora-on-prefix" else (lora, prefix)
    assert main(["rewrite", str(entry.path), "-o", str(first), *steps[0]]) == 0
    capsys.readouterr()
    # lora-fx rewrite refuses the second method (lora_fx.api.refuse_second_method); a file an earlier version wrote
    # (or the passes called directly) still reaches export, which refuses it too.
    assert main(["rewrite", str(first), "-o", str(both), *steps[1]]) == 2
    held = "prefix-tuning prefixes" if order == "lora-on-prefix" else "LoRA adapters"
    assert f"this model already holds {held}" in capsys.readouterr().err and not both.exists()
    from lora_fx.passes.onnx.insert_lora import apply_lora
    from lora_fx.passes.onnx.insert_prefix import apply_prefix

    model = lora_fx.load(first)
    if order == "lora-on-prefix":
        apply_lora(model, lora_fx.LoraConfig(r=2, target_modules="all-linear"))
    else:
        apply_prefix(model, lora_fx.PrefixConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    lora_fx.save(model, both)
    for mode in ("--adapters", "--merge"):
        assert main(["export", str(both), "-o", str(tmp_path / "out.onnx"), mode]) == 2
        err = capsys.readouterr().err
        assert "holds both prefix-tuning prefixes (at 2 attention sites) and LoRA adapters" in err, err
        assert "cannot be folded" in err and "PEFT has no format for it" in err and "once per method" in err
        assert _files(tmp_path) == ["both.onnx", "one.onnx"]
    from lora_fx.errors import AdapterError

    with pytest.raises(AdapterError, match="holds both prefix-tuning prefixes and LoRA adapters .*PEFT has no adapter"):
        lora_fx.save_adapter(lora_fx.load(both), tmp_path / "peft")
    assert _files(tmp_path) == ["both.onnx", "one.onnx"]
