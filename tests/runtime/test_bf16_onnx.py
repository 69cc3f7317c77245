"""bfloat16 ONNX files through the ONNX front end: a tiny Llama exported in bfloat16 by
``torch.onnx.export(dynamo=True)`` is rewritten, trained and folded, and each step is compared with PEFT on the
same model in bfloat16 (and float32) or with W + scale * B @ A.

The LoRA branch of a bfloat16 ONNX graph computes in bfloat16 (its A and B are bfloat16 initializers), while
PEFT keeps bfloat16 models' adapters in float32 (``autocast_adapter_dtype``): the two agree to bfloat16
rounding, not bit for bit. Training keeps float32 masters of A and B (``OnnxModule._compute_dtype``) and
writes them back rounded to bfloat16.

ONNX Runtime's CPU provider has bfloat16 kernels for few ops (not Mul, not MatMul), so the ORT half of the
path is checked for a clear refusal naming bfloat16 and the ways out, not numbers; bfloat16 feeds and outputs
are checked on a graph the CPU provider does run (Cast). The adapter files (``.onnx_adapter``, the PEFT
directory) hold bfloat16 tensors bit for bit.
"""

from __future__ import annotations

import collections
import copy
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
import torch

import lora_fx
from lora_fx.cli import main
from lora_fx.errors import ModelLoadError
from lora_fx.passes.onnx.lora_layout import read_records
from lora_fx.runtime.onnx_torch import OnnxModule
from tests import models

TARGETS = ["q_proj", "v_proj", "down_proj"]
# bfloat16 keeps 8 significant bits (2**-8 = 0.4% per rounding); two layers of rounded matmuls, norms and
# softmax, computed in another order by the exported graph than by eager torch, stay within a few of those.
BF16_TOL = 3e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return models.max_rel(a.float(), b.float())


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """The tiny Llama in bfloat16 and its dynamo export (bfloat16 weights, inputs int64, logits bfloat16)."""
    model = models.build("llama").to(torch.bfloat16)
    model.config.use_cache = False
    path = tmp_path_factory.mktemp("bf16") / "llama-bf16.onnx"
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    example = models.inputs(2, 8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), str(path), kwargs=example, dynamo=True, input_names=list(example),
                          output_names=["logits"], dynamic_shapes={k: {0: batch, 1: seq} for k in example}, verbose=False)
    assert lora_fx.load(path).graph.outputs[0].dtype == ir.DataType.BFLOAT16
    return model, path


def _tiny_bf16_graph() -> ir.Model:
    """y = x @ fc.weight in bfloat16: the smallest graph with one linear site."""
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", shape=ir.Shape(["batch", 8]), type=ir.TensorType(ir.DataType.BFLOAT16))
    w = ir.Value(name="fc.weight", shape=ir.Shape([8, 4]), type=ir.TensorType(ir.DataType.BFLOAT16),
                 const_value=ir.Tensor(rng.standard_normal((8, 4)).astype(ml_dtypes.bfloat16), name="fc.weight"))
    y = ir.Value(name="y", shape=ir.Shape(["batch", 4]), type=ir.TensorType(ir.DataType.BFLOAT16))
    graph = ir.Graph([x], [y], nodes=[ir.node("MatMul", [x, w], outputs=[y])], initializers=[w], opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


def test_write_back_rounds_the_float32_masters_to_bfloat16() -> None:
    """Trained bfloat16 adapters go back into the graph as their float32 masters rounded once to bfloat16, in
    the initializer's shape: the graph then computes what training computed."""
    model = lora_fx.apply(_tiny_bf16_graph(), lora_fx.LoraConfig(r=2, target_modules=["fc"]))
    module = OnnxModule(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.named_adapters().values():
            assert p.dtype == torch.float32
            p.copy_(torch.randn_like(p) / 3)  # float32 values that bfloat16 cannot hold exactly
    x = torch.randn(5, 8).to(torch.bfloat16)
    trained = module(x=x)["y"].detach()
    module.write_back()
    for name, p in module.named_adapters().items():
        value = model.graph.initializers[name]
        stored = value.const_value.numpy()
        assert value.const_value.dtype == ir.DataType.BFLOAT16 and stored.dtype == ml_dtypes.bfloat16
        assert stored.shape == tuple(p.shape) == tuple(value.shape)
        expect = p.detach().to(torch.bfloat16).view(torch.uint16).numpy()
        np.testing.assert_array_equal(stored.view(np.uint16), expect)
    assert torch.equal(OnnxModule(model)(x=x)["y"], trained)


@pytest.mark.slow
def test_lora_on_a_bf16_export_gives_peft_outputs_and_gradients(llama) -> None:
    hf, path = llama
    batch = models.inputs(2, 8, pad=3)
    base_module = OnnxModule(lora_fx.load(path))
    with torch.no_grad():
        eager = hf(**batch).logits
        base = base_module(**batch)["logits"]
        assert base.dtype == torch.bfloat16
        assert _rel(base, eager) <= BF16_TOL
        # A fresh adapter (B = 0) changes nothing, bit for bit.
        fresh = lora_fx.apply(lora_fx.load(path), lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        assert torch.equal(OnnxModule(fresh)(**batch)["logits"], base)

    torch.manual_seed(0)
    model = lora_fx.apply(lora_fx.load(path), lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    records = read_records(model)
    module = OnnxModule(model)
    ours = module.named_adapters()
    pm = models.peft_wrap(hf, r=4, lora_alpha=8, target_modules=TARGETS)
    wrapped = models.peft_lora_modules(pm)
    assert set(wrapped) == set(records)
    with torch.no_grad():
        for site, rec in records.items():  # deployment layout [in, r], [r, out] * scale -> PEFT's [r, in], [out, r]
            wrapped[site].lora_A["default"].weight.copy_(ours[f"{site}.lora_A.weight"].t())
            wrapped[site].lora_B["default"].weight.copy_(ours[f"{site}.lora_B.weight"].t() / rec["scale"])
    pm32 = copy.deepcopy(pm).float()
    labels = torch.randint(0, models.VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))

    def step(forward) -> tuple[torch.Tensor, torch.Tensor]:
        logits = forward(**batch)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        loss.backward()
        return logits.detach(), loss.detach()

    got, loss = step(lambda **b: module(**b)["logits"])
    want, want_loss = step(lambda **b: pm(**b).logits)
    with torch.no_grad():
        want32 = pm32(**batch).logits
    assert _rel(got, base) > 0.1  # the adapter really changes the output
    assert _rel(got, want) <= BF16_TOL
    assert _rel(got, want32) <= BF16_TOL
    assert abs(float(loss) - float(want_loss)) <= 1e-3 * float(want_loss)
    for site, rec in records.items():
        grad_a = ours[f"{site}.lora_A.weight"].grad.t()
        grad_b = ours[f"{site}.lora_B.weight"].grad.t() * rec["scale"]  # d/dB_peft = scale * d/dB_deployment
        assert _rel(grad_a, wrapped[site].lora_A["default"].weight.grad) <= 2 * BF16_TOL, site
        assert _rel(grad_b, wrapped[site].lora_B["default"].weight.grad) <= 2 * BF16_TOL, site


def _site_weights(path: Path) -> dict[str, str]:
    """Site -> the name of the initializer its MatMul reads ([in, out]: the exporter folded W's transpose)."""
    return {s.name: s.handle.inputs[1].name for s in lora_fx.find_sites(lora_fx.load(path)) if s.kind.value == "linear"}


def _bf16(value: ir.Value) -> torch.Tensor:
    return torch.from_numpy(value.const_value.numpy().view(np.uint16).copy()).view(torch.bfloat16)


@pytest.mark.slow
def test_cli_rewrite_train_and_merge_a_bf16_export(llama, tmp_path) -> None:
    _, path = llama
    rewritten, trained, merged = tmp_path / "lora.onnx", tmp_path / "trained.onnx", tmp_path / "merged.onnx"
    gen = torch.Generator().manual_seed(0)
    data = tmp_path / "train.npz"
    np.savez(data, input_ids=torch.randint(1, models.VOCAB, (8, 8), generator=gen).numpy(),
             attention_mask=np.ones((8, 8), np.int64), labels=torch.randint(0, models.VOCAB, (8, 8), generator=gen).numpy())
    assert main(["rewrite", str(path), "-o", str(rewritten), "--r", "4", "--lora-alpha", "8",
                 "--target-modules", ",".join(TARGETS)]) == 0
    assert main(["train", str(rewritten), "--data", str(data), "--steps", "3", "--lr", "1e-2", "--batch-size", "4",
                 "-o", str(trained), "--no-progress"]) == 0
    assert main(["export", str(trained), "--merge", "-o", str(merged)]) == 0

    before, after = lora_fx.load(rewritten), lora_fx.load(trained)
    records = read_records(after)
    for site in records:
        for part in ("A", "B"):
            name = f"{site}.lora_{part}.weight"
            value = after.graph.initializers[name]
            # the trained matrix keeps its declared shape and dtype
            assert value.const_value.dtype == ir.DataType.BFLOAT16
            assert value.const_value.shape == value.shape == before.graph.initializers[name].shape
        assert _bf16(after.graph.initializers[f"{site}.lora_B.weight"]).abs().max() > 0

    # The fold: W' = W + scale * B @ A, computed in float32 and rounded once to bfloat16 (the fold sums in float64;
    # the two could round apart only where the float32 and float64 sums straddle a bfloat16 rounding boundary).
    folded, weights = lora_fx.load(merged), _site_weights(path)
    base = lora_fx.load(path)
    for site in records:
        a_dep, b_dep = (_bf16(after.graph.initializers[f"{site}.lora_{p}.weight"]).float() for p in "AB")
        a, b = lora_fx.adapters.from_deployment_layout(a_dep, b_dep, records[site]["scale"])
        w = _bf16(base.graph.initializers[weights[site]]).float()  # [in, out]
        expect = (w.t() + records[site]["scale"] * (b @ a)).to(torch.bfloat16).t()
        got = _bf16(folded.graph.initializers[weights[site]])
        assert torch.equal(got, expect), site
        assert not torch.equal(got, w.to(torch.bfloat16))  # the adapter moved W
    counts = collections.Counter
    assert counts(n.op_type for n in folded.graph) == counts(n.op_type for n in base.graph)
    assert folded.graph.outputs[0].dtype == ir.DataType.BFLOAT16

    batch = models.inputs(3, 6, pad=2)
    with torch.no_grad():
        unfolded = OnnxModule(lora_fx.load(trained))(**batch)["logits"]
        got = OnnxModule(folded)(**batch)["logits"]
        plain = OnnxModule(base)(**batch)["logits"]
    assert _rel(got, unfolded) <= BF16_TOL
    assert not torch.equal(got, plain)


@pytest.mark.slow
def test_export_adapters_of_a_bf16_model_writes_bf16_slots_and_a_peft_dir(llama, tmp_path) -> None:
    import peft

    from lora_fx.commands.export import export_file
    from lora_fx.onnx_adapter import read_onnx_adapter

    hf, path = llama
    torch.manual_seed(0)
    model = lora_fx.apply(lora_fx.load(path), lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    tuned = lora_fx.save(model, tmp_path / "tuned.onnx")
    summary = export_file(tuned, tmp_path / "served.onnx", merge=False)
    served = lora_fx.load(summary["model"])
    adapter = read_onnx_adapter(summary["adapters"][0])
    for name, arr in adapter.tensors.items():
        slot = served.graph.initializers[name]
        assert slot.const_value.dtype == ir.DataType.BFLOAT16
        np.testing.assert_array_equal(np.asarray(arr).view(np.uint16),
                                      model.graph.initializers[name].const_value.numpy().view(np.uint16))
    batch = models.inputs(2, 8, pad=3)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), summary["peft_dirs"][0]).eval()
    with torch.no_grad():
        assert _rel(pm(**batch).logits, OnnxModule(lora_fx.load(tuned))(**batch)["logits"]) <= BF16_TOL


def test_save_adapter_of_a_bf16_onnx_model_writes_peft_layout(tmp_path) -> None:
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = lora_fx.apply(_tiny_bf16_graph(), lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=["fc"], init_lora_weights=False))
    folder = lora_fx.save_adapter(model, tmp_path / "peft")
    saved = load_file(str(folder / "adapter_model.safetensors"))
    a_dep, b_dep = (_bf16(model.graph.initializers[f"fc.lora_{p}.weight"]) for p in "AB")
    a, b = lora_fx.adapters.from_deployment_layout(a_dep.double(), b_dep.double(), read_records(model)["fc"]["scale"])
    assert torch.equal(saved["base_model.model.fc.lora_A.weight"].double(), a)
    assert _rel(saved["base_model.model.fc.lora_B.weight"], b) <= 2.0 ** -8


def test_a_peft_adapter_goes_back_onto_a_bf16_onnx_model_bit_for_bit(tmp_path) -> None:
    """save_adapter's PEFT directory loads onto a fresh bfloat16 graph (load_adapter) and converts into an
    .onnx_adapter for the served model (peft_dir_to_onnx_adapter), both in bfloat16, the model's slot dtype;
    with scale 2 the layout conversions are exact, so the bits come back unchanged."""
    from lora_fx.commands.export import export_file
    from lora_fx.onnx_adapter import peft_dir_to_onnx_adapter, read_onnx_adapter

    torch.manual_seed(0)
    model = lora_fx.apply(_tiny_bf16_graph(), lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=["fc"], init_lora_weights=False))
    folder = lora_fx.save_adapter(model, tmp_path / "peft")
    fresh = lora_fx.load_adapter(_tiny_bf16_graph(), folder)
    names = ["fc.lora_A.weight", "fc.lora_B.weight"]
    for name in names:
        value = fresh.graph.initializers[name].const_value
        assert value.dtype == ir.DataType.BFLOAT16
        np.testing.assert_array_equal(value.numpy().view(np.uint16), model.graph.initializers[name].const_value.numpy().view(np.uint16))
    x = torch.randn(3, 8).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(OnnxModule(fresh)(x=x)["y"], OnnxModule(model)(x=x)["y"])

    tuned = lora_fx.save(model, tmp_path / "tuned.onnx")
    summary = export_file(tuned, tmp_path / "served.onnx", merge=False, peft_dir=False)
    converted = read_onnx_adapter(peft_dir_to_onnx_adapter(folder, summary["model"], tmp_path / "converted.onnx_adapter"))
    exported = read_onnx_adapter(summary["adapters"][0])
    for name in names:
        np.testing.assert_array_equal(_bits(converted.tensors[name]), _bits(exported.tensors[name]))
        np.testing.assert_array_equal(_bits(exported.tensors[name]), model.graph.initializers[name].const_value.numpy().view(np.uint16))
    # Folded from the served model and the .onnx_adapter, or from the LoRA model itself: the same W'.
    export_file(Path(summary["model"]), tmp_path / "m1.onnx", merge=True, adapter=str(tmp_path / "converted.onnx_adapter"))
    export_file(tuned, tmp_path / "m2.onnx", merge=True)
    w1, w2 = (lora_fx.load(tmp_path / m).graph.initializers["fc.weight"].const_value.numpy() for m in ("m1.onnx", "m2.onnx"))
    np.testing.assert_array_equal(_bits(w1), _bits(w2))
    assert not np.array_equal(_bits(w1), _tiny_bf16_graph().graph.initializers["fc.weight"].const_value.numpy().view(np.uint16))


def test_non_finite_bf16_adapter_tensors_are_found(tmp_path) -> None:
    """NaN/inf in bfloat16 adapter tensors (numpy kind 'V', not 'f') are refused where an adapter is written and
    where one is read."""
    from lora_fx.errors import AdapterError
    from lora_fx.onnx_adapter import OnnxAdapter, export_tensors, non_finite, read_onnx_adapter, write_onnx_adapter

    bad = np.array([[1.0, np.nan], [np.inf, 2.0]], np.float32).astype(ml_dtypes.bfloat16)
    assert non_finite({"fc.lora_B.weight": bad}) == ("fc.lora_B.weight", 2, 4)
    assert non_finite({"fc.lora_B.weight": np.where(np.isfinite(bad), bad, 0).astype(ml_dtypes.bfloat16)}) is None
    good = np.ones((2, 2), ml_dtypes.bfloat16)
    with pytest.raises(AdapterError, match="fc.lora_B.weight holds NaN or inf"):
        write_onnx_adapter(tmp_path / "bad.onnx_adapter", OnnxAdapter({"fc.lora_A.weight": good, "fc.lora_B.weight": bad}))
    assert list(tmp_path.iterdir()) == []
    # A file from another writer, which checked nothing.
    export_tensors(tmp_path / "other.onnx_adapter", {"fc.lora_A.weight": good, "fc.lora_B.weight": bad})
    with pytest.raises(AdapterError, match="fc.lora_B.weight holds 2 NaN or inf values of 4"):
        read_onnx_adapter(tmp_path / "other.onnx_adapter")


def test_onnx_runtime_cpu_refuses_bf16_with_a_lora_fx_error(capsys, tmp_path) -> None:
    """ORT's CPU provider has no bfloat16 MatMul (nor Mul) kernel: Session and ``lora-fx run`` refuse the model
    with ModelLoadError naming the node, not ORT's raw NOT_IMPLEMENTED exception."""
    from lora_fx.runtime.ort import Session

    path = lora_fx.save(_tiny_bf16_graph(), tmp_path / "tiny-bf16.onnx")
    with pytest.raises(ModelLoadError, match=r"could not load .*tiny-bf16\.onnx: .*MatMul.*node"):
        Session(path, providers=["CPUExecutionProvider"])
    feeds = tmp_path / "in.npz"
    np.savez(feeds, x=np.ones((2, 8), np.float32))
    capsys.readouterr()
    assert main(["run", str(path), "--inputs", str(feeds), "--cpu"]) == 2
    err = capsys.readouterr().err
    assert "could not load" in err and "MatMul" in err and "Traceback" not in err and "NOT_IMPLEMENTED" not in err


def test_onnx_runtime_cpu_refusal_names_bfloat16_and_the_way_out(tmp_path) -> None:
    from lora_fx.runtime.ort import Session

    path = lora_fx.save(_tiny_bf16_graph(), tmp_path / "tiny-bf16.onnx")
    with pytest.raises(ModelLoadError) as info:
        Session(path, providers=["CPUExecutionProvider"])
    text = str(info.value)
    assert "bfloat16" in text and "CUDA" in text and "float32" in text
    assert "no bfloat16 kernel for MatMul (node " in text and "float16" in text and "trains the bfloat16 file" in text


def test_the_bfloat16_hint_goes_only_with_bfloat16_models(tmp_path) -> None:
    """ORT's "no kernel" refusal gains the bfloat16 explanation only for a model that has bfloat16 tensors."""
    from lora_fx.runtime.ort import _bfloat16_hint

    message = "Could not find an implementation for Mul(14) node with name 'node_Mul_3'"
    bf16 = lora_fx.save(_tiny_bf16_graph(), tmp_path / "bf16.onnx")
    hint = _bfloat16_hint(bf16, message)
    assert "no bfloat16 kernel for Mul (node node_Mul_3)" in hint and "CUDA execution provider" in hint
    assert _bfloat16_hint(bf16, "Load model from x failed: protobuf parsing failed") == ""
    plain = _tiny_bf16_graph()
    for value in [*plain.graph.inputs, *plain.graph.outputs]:
        value.dtype = ir.DataType.FLOAT
    weight = plain.graph.initializers["fc.weight"]
    weight.const_value = ir.tensor(weight.const_value.numpy().astype(np.float32), name="fc.weight")
    weight.dtype = ir.DataType.FLOAT
    assert _bfloat16_hint(lora_fx.save(plain, tmp_path / "f32.onnx"), message) == ""


def _cast_bf16_graph(slots: bool = False) -> ir.Model:
    """x (bfloat16) -> y = Cast(x) to float32, z = Identity(x): ops ORT's CPU provider has bfloat16 kernels for.
    With ``slots``, adapter slots fc.lora_A.weight [8, 2] and fc.lora_B.weight [2, 4] (bfloat16, zero defaults)
    are read out as float32 outputs a and b."""
    def value(name: str, shape: list, dtype: ir.DataType) -> ir.Value:
        return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype))

    x, y, z = value("x", ["batch", 8], ir.DataType.BFLOAT16), value("y", ["batch", 8], ir.DataType.FLOAT), value("z", ["batch", 8], ir.DataType.BFLOAT16)
    nodes = [ir.node("Cast", [x], attributes={"to": ir.DataType.FLOAT}, outputs=[y]), ir.node("Identity", [x], outputs=[z])]
    inputs, outputs, initializers = [x], [y, z], []
    if slots:
        for part, shape, out in (("A", [8, 2], "a"), ("B", [2, 4], "b")):
            name = f"fc.lora_{part}.weight"
            slot = value(name, shape, ir.DataType.BFLOAT16)
            slot.const_value = ir.Tensor(np.zeros(shape, ml_dtypes.bfloat16), name=name)
            read = value(out, shape, ir.DataType.FLOAT)
            nodes.append(ir.node("Cast", [slot], attributes={"to": ir.DataType.FLOAT}, outputs=[read]))
            inputs.append(slot)
            outputs.append(read)
            initializers.append(slot)
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=initializers, opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


def _bits(arr: np.ndarray) -> np.ndarray:
    assert arr.dtype == ml_dtypes.bfloat16
    return arr.view(np.uint16)


def test_bf16_feeds_and_outputs_run_through_onnx_runtime_on_cpu(tmp_path) -> None:
    """bfloat16 inputs take ml_dtypes arrays, torch bfloat16 tensors and lists; bfloat16 outputs come back as
    ml_dtypes arrays (ORT's numpy interface has neither). Checked against the exact casts and the torch runtime."""
    from lora_fx.runtime.ort import Session

    model = _cast_bf16_graph()
    session = Session(lora_fx.save(model, tmp_path / "cast.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(ml_dtypes.bfloat16)
    with torch.no_grad():
        reference = OnnxModule(model)(x=torch.from_numpy(x.view(np.uint16).copy()).view(torch.bfloat16))
    assert torch.equal(reference["y"], torch.from_numpy(x.astype(np.float32)))
    for feed in (x, torch.from_numpy(x.view(np.uint16).copy()).view(torch.bfloat16), x.astype(np.float32).tolist()):
        y, z = session.run({"x": feed})
        np.testing.assert_array_equal(y, x.astype(np.float32))
        np.testing.assert_array_equal(_bits(z), _bits(x))
    (only_y,) = session.run({"x": x}, output_names="y")
    np.testing.assert_array_equal(only_y, x.astype(np.float32))
    # int8 goes into bfloat16 exactly: cast, as int32 ids are for int64 inputs.
    ints = np.arange(-12, 12, dtype=np.int8).reshape(3, 8)
    np.testing.assert_array_equal(session.run({"x": ints}, output_names=["y"])[0], ints.astype(np.float32))
    # lora-fx run: an .npz keeps bfloat16 feeds as bare 2-byte values ('|V2'); -o writes bfloat16 outputs as float32.
    np.savez(tmp_path / "in.npz", x=x)
    assert main(["run", str(tmp_path / "cast.onnx"), "--inputs", str(tmp_path / "in.npz"), "--cpu", "-o", str(tmp_path / "out.npz")]) == 0
    with np.load(tmp_path / "out.npz", allow_pickle=False) as out:
        np.testing.assert_array_equal(out["y"], x.astype(np.float32))
        assert out["z"].dtype == np.float32
        np.testing.assert_array_equal(out["z"].astype(ml_dtypes.bfloat16).view(np.uint16), _bits(x))
    # The IOBinding path the CUDA provider takes, run on the host.
    session._device = "cpu"
    y, z = session._run_bound({"x": x}, None, None)
    np.testing.assert_array_equal(y, x.astype(np.float32))
    np.testing.assert_array_equal(_bits(z), _bits(x))
    np.testing.assert_array_equal(session._run_bound({"x": x}, None, ["y"])[0], x.astype(np.float32))


class _NoRun:
    """Stands in for the ONNX Runtime session: the refusal must come before ORT is asked to run."""

    def __getattr__(self, name: str):
        raise AssertionError(f"ONNX Runtime was called ({name}) with a feed that should have been refused")


def test_a_float32_feed_to_a_bf16_input_is_refused_before_onnx_runtime_runs(tmp_path, monkeypatch, capsys) -> None:
    from lora_fx.errors import ConfigError
    from lora_fx.runtime.ort import Session

    path = lora_fx.save(_cast_bf16_graph(), tmp_path / "cast.onnx")
    session = Session(path, providers=["CPUExecutionProvider"])
    monkeypatch.setattr(session, "_session", _NoRun())
    for dtype in (np.float32, np.float16, np.float64):
        with pytest.raises(ConfigError, match=rf"input 'x' is {np.dtype(dtype).name} but cast\.onnx takes bfloat16; "
                           r"pass x\.astype\(ml_dtypes\.bfloat16\)"):
            session.run({"x": np.ones((2, 8), dtype)})
    with pytest.raises(ConfigError, match="input 'x' is float32 but cast.onnx takes bfloat16"):
        session.run({"x": torch.ones(2, 8)})
    with pytest.raises(ConfigError, match=r"input 'x' has shape \(2, 7\)"):
        session.run({"x": np.ones((2, 7), ml_dtypes.bfloat16)})
    # The command line: the same words, exit status 2.
    feeds = tmp_path / "in.npz"
    np.savez(feeds, x=np.ones((2, 8), np.float32))
    capsys.readouterr()
    assert main(["run", str(path), "--inputs", str(feeds), "--cpu"]) == 2
    assert "input 'x' is float32 but cast.onnx takes bfloat16" in capsys.readouterr().err


def test_a_bf16_adapter_is_served_by_onnx_runtime_on_cpu(tmp_path) -> None:
    """A bfloat16 .onnx_adapter round-trips bit for bit (file and sidecar), and Session switches it in: the
    slots read out exactly its values with it, the zero defaults without."""
    from lora_fx.onnx_adapter import OnnxAdapter, read_onnx_adapter, write_onnx_adapter
    from lora_fx.runtime.ort import Session

    rng = np.random.default_rng(1)
    tensors = {"fc.lora_A.weight": rng.standard_normal((8, 2)).astype(ml_dtypes.bfloat16),
               "fc.lora_B.weight": rng.standard_normal((2, 4)).astype(ml_dtypes.bfloat16)}
    path = write_onnx_adapter(tmp_path / "t.onnx_adapter", OnnxAdapter(tensors, sites={"fc": {"r": 2, "scale": 1.0}}))
    back = read_onnx_adapter(path)
    assert back.sites == {"fc": {"r": 2, "scale": 1.0}}  # the sidecar's digest matched the tensors read back
    assert set(back.tensors) == set(tensors)
    for name, arr in tensors.items():
        assert back.tensors[name].shape == arr.shape
        np.testing.assert_array_equal(_bits(back.tensors[name]), _bits(arr))

    session = Session(lora_fx.save(_cast_bf16_graph(slots=True), tmp_path / "slots.onnx"), providers=["CPUExecutionProvider"])
    assert {name: slot.dtype for name, slot in session.slots.items()} == dict.fromkeys(tensors, "bfloat16")
    session.add_adapter("t", path)
    x = np.ones((1, 8), ml_dtypes.bfloat16)
    _, _, a, b = session.run({"x": x}, adapter="t")
    np.testing.assert_array_equal(a, tensors["fc.lora_A.weight"].astype(np.float32))
    np.testing.assert_array_equal(b, tensors["fc.lora_B.weight"].astype(np.float32))
    _, _, a, b = session.run({"x": x})
    assert not a.any() and not b.any()


@pytest.mark.slow
def test_export_adapters_of_a_bf16_prefix_model_writes_bf16_slots_and_a_peft_dir(llama, tmp_path) -> None:
    import peft

    from lora_fx.commands.export import export_file
    from lora_fx.onnx_adapter import read_onnx_adapter
    from lora_fx.passes.onnx.insert_prefix import prefix_metadata

    hf, path = llama
    torch.manual_seed(0)
    model = lora_fx.apply(lora_fx.load(path), lora_fx.PrefixConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    tuned = lora_fx.save(model, tmp_path / "tuned.onnx")
    summary = export_file(tuned, tmp_path / "served.onnx", merge=False)
    served = lora_fx.load(summary["model"])
    adapter = read_onnx_adapter(summary["adapters"][0])
    names = {rec[w] for rec in prefix_metadata(model)["sites"].values() for w in ("key", "value")}
    assert set(adapter.tensors) == names
    for name, arr in adapter.tensors.items():
        assert served.graph.initializers[name].const_value.dtype == ir.DataType.BFLOAT16
        np.testing.assert_array_equal(_bits(arr), model.graph.initializers[name].const_value.numpy().view(np.uint16))
    batch = models.inputs(2, 8, pad=3)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), summary["peft_dirs"][0]).eval()
    with torch.no_grad():
        ours = OnnxModule(lora_fx.load(tuned))(**batch)["logits"]
        assert _rel(ours, hf(**batch).logits) > 0.1  # the prefixes really change the output
        assert _rel(pm(**batch).logits, ours) <= BF16_TOL


def test_lora_fx_run_gives_bf16_output_statistics_and_saves_the_outputs_as_float32(tmp_path, capsys) -> None:
    """``lora-fx run`` on bfloat16 outputs: mean and std computed in float64, as for other floats (not None), and -o
    writes them as float32, which holds every bfloat16 value exactly and reads back as numbers without pickle."""
    import json

    path = lora_fx.save(_cast_bf16_graph(), tmp_path / "cast.onnx")
    x = np.random.default_rng(2).standard_normal((3, 8)).astype(ml_dtypes.bfloat16)
    np.savez(tmp_path / "in.npz", x=x)
    out = tmp_path / "out.npz"
    capsys.readouterr()
    assert main(["run", str(path), "--inputs", str(tmp_path / "in.npz"), "--cpu", "--json", "-o", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    exact = x.astype(np.float64)
    z = summary["outputs"]["z"]
    assert z["dtype"] == "bfloat16" and z["shape"] == [3, 8]
    assert z["mean"] == pytest.approx(float(exact.mean()), rel=1e-12, abs=1e-15)
    assert z["std"] == pytest.approx(float(exact.std()), rel=1e-12)
    assert z["first"] == exact.reshape(-1)[:8].tolist()
    with np.load(out, allow_pickle=False) as saved:
        assert saved["z"].dtype == np.float32 and saved["y"].dtype == np.float32
        np.testing.assert_array_equal(saved["z"].astype(ml_dtypes.bfloat16).view(np.uint16), _bits(x))
        np.testing.assert_array_equal(saved["z"], saved["y"])
    assert main(["run", str(path), "--inputs", str(tmp_path / "in.npz"), "--cpu"]) == 0
    assert f"z: shape (3, 8) bfloat16  mean {z['mean']:.6g}  std {z['std']:.6g}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "bfloat16 outputs as float32" in " ".join(capsys.readouterr().out.split())


def _float32_tiny_graph() -> ir.Model:
    model = _tiny_bf16_graph()
    for value in [*model.graph.inputs, *model.graph.outputs]:
        value.dtype = ir.DataType.FLOAT
    weight = model.graph.initializers["fc.weight"]
    weight.const_value = ir.tensor(weight.const_value.numpy().astype(np.float32), name="fc.weight")
    weight.dtype = ir.DataType.FLOAT
    return model


def test_training_on_a_bf16_numpy_batch_equals_the_float32_batch_cast_to_bfloat16() -> None:
    """lora_fx.train takes ml_dtypes.bfloat16 arrays for a bfloat16 graph input as it takes other numpy float
    arrays: the losses and trained adapters are those of the same values as torch bfloat16 tensors (the float32
    batch cast to bfloat16). The dtype must match the input's, as for every ONNX graph input."""
    from lora_fx.errors import ConfigError

    rng = np.random.default_rng(3)
    x32 = rng.standard_normal((6, 8)).astype(np.float32)
    target = rng.standard_normal((6, 4)).astype(np.float32)
    names = ["fc.lora_A.weight", "fc.lora_B.weight"]

    def loss_fn(out, batch):
        return torch.nn.functional.mse_loss(out["y"].float(), torch.as_tensor(batch["t"]))

    def trained(feed) -> tuple[list[float], dict[str, np.ndarray]]:
        torch.manual_seed(0)
        model = lora_fx.apply(_tiny_bf16_graph(), lora_fx.LoraConfig(r=2, target_modules=["fc"], init_lora_weights=False))
        result = lora_fx.train(model, [{"x": feed, "t": target}], loss_fn, steps=3, lr=1e-2, progress=False)
        return result.losses, {n: model.graph.initializers[n].const_value.numpy().view(np.uint16) for n in names}

    reference = torch.from_numpy(x32).to(torch.bfloat16)
    torch.manual_seed(0)
    fresh = lora_fx.apply(_tiny_bf16_graph(), lora_fx.LoraConfig(r=2, target_modules=["fc"], init_lora_weights=False))
    with torch.no_grad():
        first = float(loss_fn(OnnxModule(fresh)(x=reference), {"t": target}))
    losses, weights = trained(x32.astype(ml_dtypes.bfloat16))
    want_losses, want_weights = trained(reference)
    assert losses == want_losses and losses[0] == first
    assert losses[-1] < losses[0]
    for name in names:
        np.testing.assert_array_equal(weights[name], want_weights[name])

    model = lora_fx.apply(_tiny_bf16_graph(), lora_fx.LoraConfig(r=2, target_modules=["fc"]))
    with pytest.raises(ConfigError, match="'x' is float32, but the graph input 'x' is bfloat16"):
        lora_fx.train(model, [{"x": x32, "t": target}], loss_fn, steps=1, progress=False)
    with pytest.raises(ConfigError, match=r"holds \|V2 values.*\.view\(ml_dtypes\.bfloat16\)"):
        lora_fx.train(model, [{"x": x32.astype(ml_dtypes.bfloat16).view("V2"), "t": target}], loss_fn, steps=1, progress=False)
    plain = lora_fx.apply(_float32_tiny_graph(), lora_fx.LoraConfig(r=2, target_modules=["fc"]))
    with pytest.raises(ConfigError, match="'x' is bfloat16, but the graph input 'x' is float32"):
        lora_fx.train(plain, [{"x": x32.astype(ml_dtypes.bfloat16), "t": target}], loss_fn, steps=1, progress=False)


def test_cli_train_casts_float32_data_to_a_bf16_input_and_reads_npz_bfloat16(tmp_path, capsys) -> None:
    """``lora-fx train`` on a bfloat16 model: float32 data arrays are rounded to the bfloat16 input (the adapters come
    out as lora_fx.train makes them from the data cast by torch); the bare 2-byte values np.savez writes for an
    ml_dtypes.bfloat16 array are read as bfloat16 for a bfloat16 input, and refused elsewhere with the way out."""
    from lora_fx.commands.train import Loss, make_loss

    torch.manual_seed(0)
    path = lora_fx.save(lora_fx.apply(_tiny_bf16_graph(), lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=["fc"],
                                                                           init_lora_weights=False)), tmp_path / "lora.onnx")
    rng = np.random.default_rng(4)
    x32 = rng.standard_normal((8, 8)).astype(np.float32)  # not bfloat16 values: the cast rounds them
    labels = rng.standard_normal((8, 4)).astype(np.float32)
    options = ["--steps", "3", "--lr", "1e-2", "--batch-size", "4", "--loss", "mse", "--no-progress"]
    names = ["fc.lora_A.weight", "fc.lora_B.weight"]

    def bits(model: ir.Model) -> dict[str, np.ndarray]:
        return {n: model.graph.initializers[n].const_value.numpy().view(np.uint16) for n in names}

    np.savez(tmp_path / "f32.npz", x=x32, labels=labels)
    assert main(["train", str(path), "--data", str(tmp_path / "f32.npz"), "-o", str(tmp_path / "a.onnx"), *options]) == 0
    reference = lora_fx.load(path)
    xb = torch.from_numpy(x32).to(torch.bfloat16)
    batches = [{"x": xb[i:i + 4], "labels": torch.from_numpy(labels[i:i + 4])} for i in (0, 4)]
    lora_fx.train(reference, batches, make_loss(Loss.MSE, "y", "labels"), steps=3, lr=1e-2, max_grad_norm=1.0, seed=0,
                  progress=False)
    got, want = bits(lora_fx.load(tmp_path / "a.onnx")), bits(reference)
    for name in names:
        np.testing.assert_array_equal(got[name], want[name])
        assert not np.array_equal(got[name], bits(lora_fx.load(path))[name])  # training moved it

    np.savez(tmp_path / "bf16.npz", x=x32.astype(ml_dtypes.bfloat16), labels=labels)
    with np.load(tmp_path / "bf16.npz", allow_pickle=False) as data:
        assert data["x"].dtype.kind == "V"  # what np.savez makes of bfloat16
    assert main(["train", str(path), "--data", str(tmp_path / "bf16.npz"), "-o", str(tmp_path / "b.onnx"), *options]) == 0
    got = bits(lora_fx.load(tmp_path / "b.onnx"))
    for name in names:
        np.testing.assert_array_equal(got[name], want[name])

    np.savez(tmp_path / "bad.npz", x=x32, labels=labels.astype(ml_dtypes.bfloat16))
    capsys.readouterr()
    assert main(["train", str(path), "--data", str(tmp_path / "bad.npz"), "-o", str(tmp_path / "c.onnx"), *options]) == 2
    err = capsys.readouterr().err
    assert "array 'labels' holds bare 2-byte values" in err and "labels.astype(np.float32)" in err and "Traceback" not in err
    assert not (tmp_path / "c.onnx").exists()


class _Branch(torch.nn.Module):
    """Two linear sites with PEFT-layout LoRA branches as the FX graph writes them, y + s * B(A(x)), all in one dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(8, 4, bias=False)
        for fc, (i, o) in ((self.fc1, (16, 8)), (self.fc2, (8, 4))):
            fc.add_module("lora_A", torch.nn.Linear(i, 2, bias=False))
            fc.add_module("lora_B", torch.nn.Linear(2, o, bias=False))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc1(x) + self.fc1.lora_B(self.fc1.lora_A(x)) * 2.0
        return h, self.fc2(h) + self.fc2.lora_B(self.fc2.lora_A(h)) * 0.3


def test_normalize_lora_rewrites_bf16_branches_of_a_torch_export(tmp_path) -> None:
    """A LoRA branch exported in bfloat16 (``torch.onnx.export(dynamo=True, optimize=False)``: its scale is
    ``Cast(float32 constant)`` to bfloat16, its A and B bfloat16 initializers) goes into contract layout: A' = A^T bit
    for bit, B' = (s B)^T with s the bfloat16 scale the graph multiplied by; with s = 2 the rewritten site computes
    the exported one bit for bit. lora_fx's own FX export never writes such a branch (it keeps float32 adapters on a
    bfloat16 base, as PEFT does); a torch model with bfloat16 adapters does."""
    from lora_fx.passes.onnx.normalize_lora import normalize_lora

    torch.manual_seed(0)
    module = _Branch().to(torch.bfloat16).eval()
    x = torch.randn(2, 3, 16).to(torch.bfloat16)
    path = tmp_path / "branch.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=True, optimize=False, input_names=["x"],
                          output_names=["h", "y"], verbose=False)
    model = lora_fx.load(path)
    assert "Cast" in [n.op_type for n in model.graph]
    before = {k: _bf16(model.graph.initializers[f"{s}.lora_{k[-1]}.weight"]) for s in ("fc1", "fc2") for k in (f"{s}A", f"{s}B")}
    with torch.no_grad():
        h0, y0 = (OnnxModule(model)(x=x)[k] for k in ("h", "y"))
    records = {s: {"r": 2, "alpha": 2 * scale, "scale": scale, "in_features": i, "out_features": o}
               for s, scale, i, o in (("fc1", 2.0, 16, 8), ("fc2", 0.3, 8, 4))}
    assert normalize_lora(model, records).changed == ["fc1", "fc2"]
    assert {n.op_type for n in model.graph} <= {"Transpose", "MatMul", "Add", "Constant"}  # no Mul nor Cast left
    assert set(read_records(model)) == {"fc1", "fc2"}
    for site, graph_scale in (("fc1", 2.0), ("fc2", float(np.float32(0.3).astype(ml_dtypes.bfloat16)))):
        a, b = (model.graph.initializers[f"{site}.lora_{p}.weight"] for p in "AB")
        assert a.const_value.dtype == b.const_value.dtype == ir.DataType.BFLOAT16
        assert torch.equal(_bf16(a), before[f"{site}A"].t())
        assert torch.equal(_bf16(b), (before[f"{site}B"].double() * graph_scale).to(torch.bfloat16).t())
    with torch.no_grad():
        h, y = (OnnxModule(model)(x=x)[k] for k in ("h", "y"))
        assert torch.equal(h, h0) and torch.equal(h, module(x)[0])
        assert _rel(y, y0) <= BF16_TOL


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A tiny LlamaForSequenceClassification in bfloat16 and its dynamo export (logits bfloat16)."""
    from tests.lora_fx.test_onnx_modules_to_save import _export
    from tests.lora_fx.test_prefix_modules_to_save import _llama

    model = _llama().to(torch.bfloat16)
    path = tmp_path_factory.mktemp("bf16cls") / "llama-cls-bf16.onnx"
    _export(model, path, "dynamo")
    assert lora_fx.load(path).graph.outputs[0].dtype == ir.DataType.BFLOAT16
    return model, path


def _base_head(path: Path) -> torch.Tensor:
    """The classifier's score.weight as the export holds it (the optimized export names it only once the head is
    trained in full: lora_fx.apply gives it its model name)."""
    from tests.lora_fx.test_prefix_modules_to_save import T

    applied = lora_fx.apply(lora_fx.load(path), lora_fx.PrefixConfig(task_type="SEQ_CLS", num_virtual_tokens=T))
    head = _bf16(applied.graph.initializers["score.weight"])
    assert head.shape == (3, 32)
    return head


@pytest.mark.slow
def test_a_bf16_seq_cls_prefix_adapter_saves_its_bf16_head_and_loads_in_peft(classifier, tmp_path) -> None:
    """Prefix tuning with task_type SEQ_CLS on a bfloat16 ONNX classifier: the trained head (score.weight) is saved in
    bfloat16, bit for bit, beside prompt_embeddings; PEFT loads the directory and computes the ONNX model's logits to
    bfloat16 rounding, and the directory loads back onto the export bit for bit."""
    import peft
    from safetensors.torch import load_file

    from tests.lora_fx.test_prefix_modules_to_save import T, _peft_logits

    hf, path = classifier
    model = lora_fx.apply(lora_fx.load(path), lora_fx.PrefixConfig(task_type="SEQ_CLS", num_virtual_tokens=T))
    batch = {**models.inputs(3, 7, pad=2, seed=3), "labels": torch.tensor([0, 2, 1])}
    lora_fx.train(model, [batch], lambda out, b: torch.nn.functional.cross_entropy(out["logits"].float(), b["labels"]),
                  steps=3, lr=3e-2, progress=False)
    head = _bf16(model.graph.initializers["score.weight"])
    assert not torch.equal(head, _base_head(path))  # the head trained
    folder = lora_fx.save_adapter(model, tmp_path / "peft")
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert saved["base_model.score.weight"].dtype == torch.bfloat16
    assert torch.equal(saved["base_model.score.weight"], head)

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), folder).eval()
    b = models.inputs(2, 9, pad=3, seed=7)
    with torch.no_grad():
        ours = OnnxModule(model)(**b)["logits"]
        assert _rel(ours, hf(**b).logits) > 0.1  # prefixes and head really change the output
        assert _rel(_peft_logits(loaded, b), ours) <= BF16_TOL
        back = lora_fx.load_adapter(lora_fx.load(path), folder)
        assert torch.equal(_bf16(back.graph.initializers["score.weight"]), head)
        assert torch.equal(OnnxModule(back)(**b)["logits"], ours)


@pytest.mark.slow
def test_a_bf16_seq_cls_prefix_file_without_its_head_loads_with_the_base_head(classifier, tmp_path) -> None:
    """A SEQ_CLS prefix file with no head and modules_to_save unset (an earlier lora_fx's) loads onto the bfloat16
    classifier with its base head, bit for bit: onto the export itself, and onto a model whose head an adapter moved
    (back to its recorded base). The logits are PEFT's with the base head, to bfloat16 rounding."""
    import json

    from safetensors.torch import load_file, save_file

    from tests.lora_fx.test_prefix_modules_to_save import _peft, _peft_logits

    hf, path = classifier
    pm = _peft(hf)
    pm.save_pretrained(tmp_path / "peft")
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (old / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": None}))
    emb = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))["prompt_embeddings"]
    save_file({"prompt_embeddings": emb}, str(old / "adapter_model.safetensors"))
    wrapper = pm.base_model.score
    wrapper.modules_to_save["default"].load_state_dict(wrapper.original_module.state_dict())
    base_head = _base_head(path)
    b = models.inputs(3, 7, pad=2, seed=3)
    with torch.no_grad():
        want = _peft_logits(pm, b)
        fresh = lora_fx.load_adapter(lora_fx.load(path), old)
        got = OnnxModule(fresh)(**b)["logits"]
        assert torch.equal(_bf16(fresh.graph.initializers["score.weight"]), base_head)
        assert _rel(got, want) <= BF16_TOL
        assert _rel(got, hf(**b).logits) > 0.1  # the prefixes were loaded
        moved = lora_fx.load_adapter(lora_fx.load(path), tmp_path / "peft")
        assert not torch.equal(_bf16(moved.graph.initializers["score.weight"]), base_head)
        lora_fx.load_adapter(moved, old)
        assert torch.equal(_bf16(moved.graph.initializers["score.weight"]), base_head)
        assert torch.equal(OnnxModule(moved)(**b)["logits"], got)
