"""``modules_to_save`` / ``task_type="SEQ_CLS"`` on the ONNX front end: an exported classifier's head trains in full.

A tiny BertForSequenceClassification (head: Gemm, its zero bias dropped by the dynamo exporter's optimizer) and a
LlamaForSequenceClassification (head: MatMul on a transposed, unnamed constant), exported by both exporters, rewritten
by ``lora_fx.apply`` with ``task_type="SEQ_CLS"``; every number is compared with PEFT on the same torch model: the
head's parameters under their model names in torch's layout, one step's gradients, a few steps' losses, the saved
adapter in PEFT, a PEFT adapter loaded onto the file, and the merged and served exports in ONNX Runtime.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import lora_fx
from lora_fx.config import LoraConfig
from lora_fx.errors import AdapterError, ConfigError, TargetNotFoundError, UnsupportedError
from lora_fx.onnx_adapter import SAVED_KEY, read_onnx_adapter, read_saved
from lora_fx.passes.onnx.freeze_base import SAVED_BASE_KEY, saved_base
from lora_fx.passes.onnx.lora_layout import read_records
from lora_fx.runtime.onnx_torch import OnnxModule
from tests.exported import ort_run
from tests.models import VOCAB, inputs

TOL = 1e-5
R = 2


def _bert():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return tf.BertForSequenceClassification(cfg).eval()


def _llama():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_labels=3,
                         pad_token_id=0, use_cache=False)
    return tf.LlamaForSequenceClassification(cfg).eval()


# arch -> (builder, head module, its parameters, LoRA targets)
ARCHS = {
    "bert": (_bert, "classifier", ["classifier.bias", "classifier.weight"], ["query", "value"]),
    "llama": (_llama, "score", ["score.weight"], ["q_proj", "v_proj"]),
}
CASES = [(arch, exporter) for arch in ARCHS for exporter in ("dynamo", "torchscript")]
# dynamo-noopt: as lora_fx's own FX export writes it, every weight named and read through a Transpose node.
WEIGHT_FORMS = CASES + [(arch, "dynamo-noopt") for arch in ARCHS]


def _export(model, path, exporter: str) -> None:
    """As a user exports it: dynamo with its default optimizer (or without), or TorchScript on the model itself."""
    kw = inputs(2, 8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter.startswith("dynamo"):
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
            torch.onnx.export(model, (), str(path), kwargs=kw, dynamo=True, opset_version=18, input_names=list(kw),
                              output_names=["logits"], dynamic_shapes={k: {0: batch, 1: seq} for k in kw}, verbose=False,
                              optimize=exporter == "dynamo")
        else:
            torch.onnx.export(model, (kw["input_ids"], kw["attention_mask"]), str(path), dynamo=False, opset_version=17,
                              input_names=list(kw), output_names=["logits"],
                              dynamic_axes={k: {0: "batch", 1: "seq"} for k in kw})


@pytest.fixture(scope="module")
def exported():
    """The file of (arch, exporter), exported once per process (test_head_slots and test_onnx_head_forms read them too)."""
    from tests.shared_exports import user_export

    return lambda arch, exporter: user_export(ARCHS[arch][0], exporter)


def _config(arch: str, **extra) -> LoraConfig:
    return LoraConfig(r=R, lora_alpha=R, task_type="SEQ_CLS", target_modules=ARCHS[arch][3], **extra)


def _peft(model, arch: str, seed: int = 1, **extra):
    """PEFT's SEQ_CLS model on a copy of ``model``, lora_B and head moved as training moves them."""
    import peft

    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=R, lora_alpha=R, task_type="SEQ_CLS", target_modules=ARCHS[arch][3], **extra))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_B." in name or ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return pm.eval()


def _logits(model, batch) -> np.ndarray:
    with torch.no_grad():
        out = model(**batch)
    return (out["logits"] if isinstance(out, dict) else out.logits).float().numpy()


def _feeds(batch) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in batch.items()}


@pytest.mark.parametrize("arch,exporter", WEIGHT_FORMS)
def test_apply_makes_the_head_trainable_under_its_model_names_in_torch_layout(exported, arch, exporter, tmp_path):
    build, head, params, _ = ARCHS[arch]
    model = build()
    onnx_model = lora_fx.load(exported(arch, exporter))
    lora_fx.apply(onnx_model, _config(arch))
    assert read_saved(onnx_model.metadata_props) == {p: head for p in params}
    torch_params = dict(model.named_parameters())
    graph = onnx_model.graph
    for name in params:  # the module's own values, [out, in] as PEFT saves them; the base kept beside
        np.testing.assert_array_equal(graph.initializers[name].const_value.numpy(), torch_params[name].detach().numpy())
        np.testing.assert_array_equal(saved_base(onnx_model)[name][1], torch_params[name].detach().numpy())
    module = OnnxModule(onnx_model)
    assert set(params) <= set(module.trainable_names)
    assert all(module.tensor(p).requires_grad for p in params)
    batch = inputs(2, 8, pad=2)
    want = _logits(model, batch)
    np.testing.assert_allclose(module(**batch)["logits"].detach().numpy(), want, atol=TOL)
    lora_fx.save(onnx_model, tmp_path / "lora.onnx")
    np.testing.assert_allclose(ort_run(tmp_path / "lora.onnx", _feeds(batch)), want, atol=TOL)


@pytest.mark.parametrize("arch,exporter", WEIGHT_FORMS)
def test_a_peft_adapter_loads_onto_the_file_and_one_step_has_peft_gradients(exported, arch, exporter, tmp_path):
    """load_adapter sets LoRA and the head from PEFT's SEQ_CLS directory; the same loss then gives the head and the
    LoRA matrices PEFT's gradients (deployment layout: A transposed, B transposed with the scale folded in)."""
    build, head, params, _ = ARCHS[arch]
    model = build()
    pm = _peft(model, arch)
    pm.save_pretrained(tmp_path / "peft")
    onnx_model = lora_fx.load(exported(arch, exporter))
    lora_fx.load_adapter(onnx_model, tmp_path / "peft")
    batch, labels = inputs(4, 8, pad=3, seed=2), torch.tensor([0, 2, 1, 2])
    np.testing.assert_allclose(_logits(OnnxModule(onnx_model), batch), _logits(pm, batch), atol=TOL)

    module = OnnxModule(onnx_model)
    torch.nn.functional.cross_entropy(module(**batch)["logits"], labels).backward()
    pm.zero_grad()
    torch.nn.functional.cross_entropy(pm(**batch).logits, labels).backward()
    theirs = dict(pm.named_parameters())
    for name in params:
        peft_name = f"base_model.model.{head}.modules_to_save.default.{name.rpartition('.')[2]}"
        torch.testing.assert_close(module.tensor(name).grad, theirs[peft_name].grad, atol=TOL, rtol=1e-4)
    for site, rec in read_records(onnx_model).items():
        scale = rec["scale"]
        a, b = (theirs[f"base_model.model.{site}.lora_{w}.default.weight"].grad for w in "AB")
        torch.testing.assert_close(module.tensor(rec["a"]).grad, a.t(), atol=TOL, rtol=1e-4)
        torch.testing.assert_close(module.tensor(rec["b"]).grad, b.t() / scale, atol=TOL, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("arch,exporter", CASES)
def test_training_follows_peft_and_the_saved_adapter_loads_in_peft(exported, arch, exporter, tmp_path):
    """lora_fx.train on the ONNX file and AdamW on PEFT's model from the same start lose the same; the trained
    head and adapter, saved in PEFT's format, give PeftModel.from_pretrained our ONNX model's logits."""
    import peft

    build, head, params, _ = ARCHS[arch]
    model = build()
    pm = _peft(model, arch)
    pm.save_pretrained(tmp_path / "start")
    onnx_model = lora_fx.load(exported(arch, exporter))
    lora_fx.load_adapter(onnx_model, tmp_path / "start")
    batches = [{**inputs(6, 8, pad=2, seed=4), "labels": torch.tensor([0, 1, 2, 2, 1, 0])}]

    def loss_fn(out, batch):
        return torch.nn.functional.cross_entropy(out["logits"], batch["labels"])

    steps, lr = 8, 3e-2
    ours = lora_fx.train(onnx_model, batches, loss_fn, steps=steps, lr=lr, max_grad_norm=None, progress=False).losses
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    theirs = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = loss_fn(pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        theirs.append(float(loss.detach()))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=TOL)
    assert ours[-1] < ours[0] - 0.1  # one batch, learnt
    trained = {name: onnx_model.graph.initializers[name].const_value.numpy() for name in params}
    assert not any(np.array_equal(trained[n], saved_base(onnx_model)[n][1]) for n in params)  # the head moved

    lora_fx.save_adapter(onnx_model, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    batch = inputs(2, 8, pad=2, seed=5)
    want = _logits(OnnxModule(onnx_model), batch)
    np.testing.assert_allclose(_logits(loaded, batch), want, atol=TOL)
    np.testing.assert_allclose(_logits(pm, batch), want, atol=1e-4)


@pytest.fixture(scope="module")
def trained_files(exported, tmp_path_factory):
    """Per case: lora.onnx whose LoRA and head hold a PEFT adapter's (as training leaves them), its logits, and both
    exports of it (export_file, the work of ``lora-fx export``)."""
    from lora_fx.commands.export import export_file

    tmp = tmp_path_factory.mktemp("onnx_mts_export")
    cache = {}

    def get(arch: str, exporter: str):
        if (arch, exporter) in cache:
            return cache[arch, exporter]
        model = ARCHS[arch][0]()
        pm = _peft(model, arch, seed=3)
        folder = tmp / f"{arch}-{exporter}"
        pm.save_pretrained(folder / "peft")
        onnx_model = lora_fx.load(exported(arch, exporter))
        lora_fx.load_adapter(onnx_model, folder / "peft")
        lora_fx.save(onnx_model, folder / "lora.onnx")
        merged = export_file(folder / "lora.onnx", folder / "merged.onnx", merge=True)
        served = export_file(folder / "lora.onnx", folder / "served.onnx", merge=False)
        cache[arch, exporter] = dict(folder=folder, model=model, pm=pm, merged=merged, served=served,
                                     head={n: onnx_model.graph.initializers[n].const_value.numpy() for n in ARCHS[arch][2]})
        return cache[arch, exporter]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("arch,exporter", CASES)
def test_export_merges_the_trained_head_or_serves_it_as_slots_defaulting_to_the_base(trained_files, arch, exporter):
    import onnx_ir as ir
    import peft

    files = trained_files(arch, exporter)
    folder, params = files["folder"], ARCHS[arch][2]
    batch = inputs(2, 8, pad=2, seed=7)
    feeds = _feeds(batch)
    want, base = _logits(files["pm"], batch), _logits(files["model"], batch)
    assert np.abs(want - base).max() > 0.1
    np.testing.assert_allclose(ort_run(folder / "lora.onnx", feeds), want, atol=TOL)

    merged = ir.load(str(folder / "merged.onnx"))
    assert not any(k in merged.metadata_props for k in (SAVED_KEY, SAVED_BASE_KEY))
    assert not any(".original_module." in n for n in merged.graph.initializers)
    np.testing.assert_allclose(ort_run(folder / "merged.onnx", feeds), want, atol=TOL)

    served = ir.load(str(folder / "served.onnx"))
    inputs_by_name = {v.name: v for v in served.graph.inputs}
    torch_params = dict(files["model"].named_parameters())
    for name in params:  # slots whose defaults are the base head
        assert name in inputs_by_name
        np.testing.assert_array_equal(served.graph.initializers[name].const_value.numpy(), torch_params[name].detach().numpy())
    assert not any(".original_module." in n for n in served.graph.initializers)
    adapter_path = folder / "served.adapters" / "default.onnx_adapter"
    adapter = read_onnx_adapter(adapter_path)
    for name in params:  # the trained head, in torch's layout
        np.testing.assert_array_equal(adapter.tensors[name], files["head"][name])
    assert adapter.fingerprint == files["served"]["fingerprint"] == served.metadata_props["lora_fx.base_fingerprint"]
    np.testing.assert_allclose(ort_run(folder / "served.onnx", feeds), base, atol=TOL)
    np.testing.assert_allclose(ort_run(folder / "served.onnx", feeds, adapter=adapter_path), want, atol=TOL)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(files["model"]), folder / "served.adapters" / "default").eval()
    np.testing.assert_allclose(_logits(loaded, batch), want, atol=TOL)


@pytest.mark.slow
def test_cli_export_carries_the_head(trained_files, tmp_path):
    from lora_fx.cli import main

    files = trained_files("llama", "torchscript")
    feeds = _feeds(inputs(2, 8, pad=2, seed=7))
    want = ort_run(files["folder"] / "merged.onnx", feeds)
    assert main(["export", str(files["folder"] / "lora.onnx"), "-o", str(tmp_path / "m.onnx"), "--merge"]) == 0
    np.testing.assert_allclose(ort_run(tmp_path / "m.onnx", feeds), want, atol=TOL)
    assert main(["export", str(files["folder"] / "lora.onnx"), "-o", str(tmp_path / "s.onnx"), "--adapters"]) == 0
    adapter = tmp_path / "s.adapters" / "default.onnx_adapter"
    np.testing.assert_allclose(ort_run(tmp_path / "s.onnx", feeds, adapter=adapter), want, atol=TOL)


def test_an_adapter_without_the_head_puts_the_base_head_back(exported, tmp_path):
    """As in PEFT: an adapter whose config does not train the head runs the base head, and the head stops training."""
    import peft

    model = _llama()
    _peft(model, "llama").save_pretrained(tmp_path / "cls")
    plain = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=R, lora_alpha=R, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if ".lora_B." in name:
                p.add_(torch.randn_like(p))
    plain.eval().save_pretrained(tmp_path / "plain")
    onnx_model = lora_fx.load(exported("llama", "torchscript"))
    lora_fx.load_adapter(onnx_model, tmp_path / "cls")
    lora_fx.load_adapter(onnx_model, tmp_path / "plain")
    batch = inputs(2, 8, pad=2)
    np.testing.assert_allclose(_logits(OnnxModule(onnx_model), batch), _logits(plain, batch), atol=TOL)
    assert not read_saved(onnx_model.metadata_props) and SAVED_BASE_KEY not in onnx_model.metadata_props
    assert "score.weight" not in OnnxModule(onnx_model).trainable_names
    assert not any(".original_module." in n for n in onnx_model.graph.initializers)


def test_refusals_name_the_problem_before_any_change(exported, tmp_path):
    import peft

    from lora_fx.config import QuantConfig
    from lora_fx.passes.onnx.quantize_weights import quantize_weights

    path = exported("bert", "torchscript")
    # A typo matches no module of the file (TorchScript records no Linear in the module tree: the sites stand in).
    onnx_model = lora_fx.load(path)
    with pytest.raises(TargetNotFoundError, match="'clasifier'"):
        lora_fx.apply(onnx_model, LoraConfig(r=R, target_modules=["query"], modules_to_save=["clasifier"]))
    assert not read_records(onnx_model)
    # QLoRA would pack the head: refused before quantizing.
    with pytest.raises(ConfigError, match=r"QuantConfig\(exclude_modules=\['classifier'\]\)"):
        lora_fx.apply(onnx_model, _config("bert"), quant=QuantConfig())
    assert not read_records(onnx_model) and not any(n.op_type == "DequantizeLinear" for n in onnx_model.graph)
    # A head the file already stores quantized cannot train in full.
    quantize_weights(onnx_model, QuantConfig(dtype="int8"))
    with pytest.raises(UnsupportedError, match=r"classifier is stored quantized.*exclude_modules=\['classifier'\]"):
        lora_fx.apply(onnx_model, _config("bert"))
    assert not read_records(onnx_model) and SAVED_KEY not in onnx_model.metadata_props
    # An adapter trained for another number of labels.
    other = _bert()
    other.classifier = torch.nn.Linear(32, 5)
    peft.get_peft_model(other, peft.LoraConfig(r=R, task_type="SEQ_CLS", target_modules=["query", "value"])).save_pretrained(tmp_path / "p5")
    onnx_model = lora_fx.load(path)
    with pytest.raises(AdapterError, match=r"classifier\.bias has shape \(5,\), but this model's classifier\.bias is \(3,\)"):
        lora_fx.load_adapter(onnx_model, tmp_path / "p5")
    assert not read_records(onnx_model) and SAVED_KEY not in onnx_model.metadata_props


@pytest.mark.slow
def test_cli_train_then_export_gives_peft_the_trained_head(exported, tmp_path, capsys):
    """``lora-fx train`` on the rewritten file trains the head with the adapters; ``lora-fx export --adapters``
    writes it under PEFT's keys, and PEFT on the torch model computes what the trained file computes."""
    import json

    import peft

    from lora_fx.cli import main

    model = _bert()
    onnx_model = lora_fx.load(exported("bert", "dynamo"))
    lora_fx.apply(onnx_model, _config("bert"))
    lora_fx.save(onnx_model, tmp_path / "lora.onnx")
    data = {**_feeds(inputs(8, 8, pad=2, seed=9)), "labels": np.array([0, 1, 2, 0, 1, 2, 0, 1])}
    np.savez(tmp_path / "data.npz", **data)
    capsys.readouterr()
    assert main(["train", str(tmp_path / "lora.onnx"), "--data", str(tmp_path / "data.npz"), "-o", str(tmp_path / "trained.onnx"),
                 "--steps", "6", "--lr", "0.03", "--no-progress", "--json"]) == 0
    losses = json.loads(capsys.readouterr().out)["losses"]
    assert losses[-1] < losses[0]
    trained = lora_fx.load(tmp_path / "trained.onnx")
    torch_params = dict(model.named_parameters())
    for name in ("classifier.weight", "classifier.bias"):  # moved from the base, which stays kept beside
        assert not np.allclose(trained.graph.initializers[name].const_value.numpy(), torch_params[name].detach().numpy())
        np.testing.assert_array_equal(saved_base(trained)[name][1], torch_params[name].detach().numpy())
    assert main(["export", str(tmp_path / "trained.onnx"), "-o", str(tmp_path / "served.onnx"), "--adapters"]) == 0
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "served.adapters" / "default").eval()
    batch = inputs(2, 8, pad=2, seed=7)
    np.testing.assert_allclose(_logits(loaded, batch), ort_run(tmp_path / "trained.onnx", _feeds(batch)), atol=TOL)
