"""Training through an ONNX graph: loss goes down, written-back models run in ONNX Runtime with the
same predictions, the loss curve equals the FX graph's, checkpoints resume exactly."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import helper

import lora_fx
from lora_fx.errors import ConfigError, UnsupportedError
from lora_fx.runtime.onnx_torch import OnnxModule
from tests.runtime import onnx_models as om

SITES = ["query", "value"]


def _mlp_batches(n: int = 6) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(16, 8, generator=gen)
        out.append({"x": x, "labels": (x[:, 0] > 0).long() + (x[:, 1] > 0).long()})
    return out


def test_training_an_onnx_model_writes_adapters_back(tmp_path: Path) -> None:
    model = om.mlp()
    before = {n: model.graph.initializers[n].const_value.numpy().copy() for n in ("fc1.lora_A.weight", "fc1.lora_B.weight", "w1")}
    result = lora_fx.train(model, _mlp_batches(), lora_fx.runtime.train.cross_entropy_on("logits"), steps=40, lr=1e-2, progress=False)
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    after = {n: model.graph.initializers[n].const_value.numpy() for n in before}
    assert not np.array_equal(after["fc1.lora_B.weight"], before["fc1.lora_B.weight"])
    np.testing.assert_array_equal(after["w1"], before["w1"])  # the base stays frozen
    # the saved file carries the trained adapter: ORT reproduces the trained torch module's loss
    path = tmp_path / "tuned.onnx"
    ir.save(model, str(path))
    batch = _mlp_batches()[0]
    logits = torch.from_numpy(om.ort_run(path, {"x": batch["x"]})[0])
    torch_logits = OnnxModule(ir.load(str(path)))(x=batch["x"])["logits"].detach()
    torch.testing.assert_close(logits, torch_logits, rtol=1e-5, atol=1e-6)


def test_no_adapters_and_unsupported_ops_are_refused_before_training() -> None:
    with pytest.raises(ConfigError, match="no adapter"):
        lora_fx.train(om.mlp(lora=False), _mlp_batches(), lambda o, b: o["logits"].sum(), steps=1, progress=False)
    model = om.mlp(extra_node=helper.make_node("Hardmax", ["logits"], ["hm"], name="vendor_hardmax"))
    b_before = model.graph.initializers["fc1.lora_B.weight"].const_value
    with pytest.raises(UnsupportedError, match="Hardmax.*vendor_hardmax"):
        lora_fx.train(model, _mlp_batches(), lambda o, b: o["logits"].sum(), steps=1, progress=False)
    assert model.graph.initializers["fc1.lora_B.weight"].const_value is b_before  # nothing written


def test_checkpoint_resume_continues_the_same_loss_curve(tmp_path: Path) -> None:
    loss = lora_fx.runtime.train.cross_entropy_on("logits")
    full = lora_fx.train(om.mlp(), _mlp_batches(), loss, steps=12, lr=1e-2, progress=False)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Stop):  # a crash after step 7: the last checkpoint is the one of step 5
        lora_fx.train(om.mlp(), _mlp_batches(), loss, steps=12, lr=1e-2, progress=False, checkpoint_dir=str(ckpt),
                      checkpoint_every=5, on_step=_stop_after(7))
    ran: list[int] = []
    resumed = lora_fx.train(om.mlp(), _mlp_batches(), loss, steps=12, lr=1e-2, progress=False,
                            checkpoint_dir=str(ckpt), checkpoint_every=5, resume=True, on_step=lambda s, v: ran.append(s))
    assert ran == list(range(5, 12))  # it really resumed at the checkpoint of step 5
    assert resumed.losses == full.losses  # bit-identical: adapters, AdamW moments, step and data position restored
    assert (ckpt / "checkpoint.safetensors").is_file() and (ckpt / "checkpoint.json").is_file()
    assert not list(ckpt.glob(".*.tmp"))


class _Stop(Exception):
    pass


def _stop_after(n: int):
    def on_step(step: int, value: float) -> None:
        if step + 1 >= n:
            raise _Stop

    return on_step


# ---- the bundled MiniLM ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> dict:
    """MiniLM exported once with the dynamo exporter, plus the task and the captured FX graph."""
    from lora_fx.hf import load_hf_model, minilm_dir
    from lora_fx.tasks import TenseTask

    root = tmp_path_factory.mktemp("minilm")
    task = TenseTask.from_model_dir(minilm_dir(), max_length=16, batch_size=8)
    model = load_hf_model(minilm_dir())
    example = task.example()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    path = root / "minilm.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (), str(path), kwargs=example, dynamo=True, opset_version=18,
                          input_names=list(example), output_names=["last_hidden_state", "pooler_output"],
                          dynamic_shapes={k: {0: batch, 1: seq} for k in example}, verbose=False)
    return {"path": path, "task": task, "model": model}


def _onnx_lora(path: Path, r: int, alpha: float) -> ir.Model:
    return om.add_lora(ir.load(str(path)), r=r, alpha=alpha, targets=SITES)


@pytest.mark.slow
def test_minilm_onnx_training_lowers_loss_and_ort_agrees(minilm: dict, tmp_path: Path) -> None:
    task = minilm["task"]
    model = _onnx_lora(minilm["path"], r=4, alpha=8)
    batches = task.batches("train")[:6]
    result = lora_fx.train(model, batches, task.loss_fn, steps=12, lr=3e-3, progress=False)
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3]) - 0.05, result.losses
    out = om.save(model, tmp_path / "tuned.onnx")
    module = OnnxModule(ir.load(str(out)))
    agree = total = 0
    for batch in task.batches("test")[:3]:
        feeds = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden_ort = torch.from_numpy(om.ort_run(out, feeds)[0])
        hidden_torch = module(**feeds)["last_hidden_state"].detach()
        torch.testing.assert_close(hidden_torch, hidden_ort, rtol=1e-4, atol=1e-4)
        pred_ort = task.logits(hidden_ort, batch["attention_mask"]).argmax(-1)
        pred_torch = task.logits(hidden_torch, batch["attention_mask"]).argmax(-1)
        agree += int((pred_ort == pred_torch).sum())
        total += len(pred_ort)
    assert agree == total
    # and the adapters in the file are the trained ones, not the zero B it started with
    b_names = [n for n in model.graph.initializers if n.endswith("lora_B.weight")]
    assert any(np.abs(ir.load(str(out)).graph.initializers[n].const_value.numpy()).max() > 0 for n in b_names)
    # the PEFT-format export reads the written-back initializers too
    from safetensors.torch import load_file

    from lora_fx.adapters import from_deployment_layout, peft_key

    peft_dir = lora_fx.save_adapter(model, tmp_path / "peft")
    tensors = load_file(str(Path(peft_dir) / "adapter_model.safetensors"))
    site = b_names[0].removesuffix(".lora_B.weight")
    inits = model.graph.initializers
    a, b = from_deployment_layout(torch.from_numpy(inits[f"{site}.lora_A.weight"].const_value.numpy()),
                                  torch.from_numpy(inits[f"{site}.lora_B.weight"].const_value.numpy()), 8 / 4)
    torch.testing.assert_close(tensors[peft_key(site, "B")], b)
    torch.testing.assert_close(tensors[peft_key(site, "A")], a)


@pytest.mark.slow
def test_minilm_loss_curve_equals_fx_graph(minilm: dict) -> None:
    from lora_fx.adapters import to_deployment_layout

    task = minilm["task"]
    r = 4
    # the ONNX graph was exported in eval mode (no dropout); train() switches the FX graph's dropout on,
    # so the FX side gets a copy of the model whose dropout probabilities are zero
    fx_model = copy.deepcopy(minilm["model"])
    for module in fx_model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    gm = lora_fx.capture(fx_model, kwargs=task.example())
    # alpha == r: scale 1, so Adam sees the same parameters in both layouts (it is not scale-invariant)
    lora_fx.apply(gm, lora_fx.LoraConfig(r=r, lora_alpha=r, target_modules=SITES, lora_dropout=0.0))
    model = _onnx_lora(minilm["path"], r=r, alpha=r)
    sites = [n.removesuffix(".lora_A.weight") for n in model.graph.initializers if n.endswith(".lora_A.weight")]
    assert len(sites) == 12
    torch.manual_seed(5)
    for site in sites:
        sub = gm.get_submodule(site)
        with torch.no_grad():
            sub.lora_B.weight.normal_(0, 0.02)  # a non-trivial start: both sides see the same B
        a, b = to_deployment_layout(sub.lora_A.weight.detach(), sub.lora_B.weight.detach(), 1.0)
        for name, t in ((f"{site}.lora_A.weight", a), (f"{site}.lora_B.weight", b)):
            model.graph.initializers[name].const_value = ir.Tensor(t.numpy(), name=name)
    batches = task.batches("train")[:5]
    kw = dict(steps=20, lr=1e-3, seed=0, progress=False)
    fx_result = lora_fx.train(gm, batches, task.loss_fn, **kw)
    onnx_result = lora_fx.train(model, batches, task.loss_fn, **kw)
    diffs = np.abs(np.array(fx_result.losses) - np.array(onnx_result.losses))
    assert diffs.max() <= 1e-4, diffs
    assert fx_result.losses[-1] < fx_result.losses[0]  # the curve moved: the comparison is not of two constants


def test_lora_dropout_drops_on_the_branch_in_training_only(tmp_path: Path) -> None:
    from tests.exported import lora_onnx
    from tests.onnx_corpus import corpus

    x = torch.from_numpy(corpus().get("gemm-mlp").feeds()["x"])
    model = lora_onnx("gemm-mlp", dropout=0.5)
    module = OnnxModule(model)
    want = torch.from_numpy(om.ort_run(om.save(model, tmp_path / "dropout.onnx"), {"x": x})[0])
    torch.testing.assert_close(module(x=x)["y"].detach(), want, rtol=1e-5, atol=1e-6)  # eval: the identity
    module.set_training_mode(True)
    torch.manual_seed(0)
    first, second = module(x=x)["y"].detach(), module(x=x)["y"].detach()
    assert not torch.equal(first, second) and not torch.allclose(first, want, atol=1e-3)
    # Dropout sits on the branch alone: with B = 0 the branch adds nothing and training changes no output.
    for rec in json.loads(model.metadata_props["lora_fx.lora"]).values():
        with torch.no_grad():
            module.tensor(rec["b"]).zero_()
    base = torch.from_numpy(om.ort_run(corpus().get("gemm-mlp").path, {"x": x})[0])
    torch.testing.assert_close(module(x=x)["y"].detach(), base, rtol=1e-5, atol=1e-6)


def test_training_an_onnx_model_with_lora_dropout_lowers_the_loss() -> None:
    model = om.mlp(lora=False)
    lora_fx.apply(model, lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", lora_dropout=0.1))
    loss = lora_fx.runtime.train.cross_entropy_on("logits")

    def eval_loss() -> float:  # over every batch, dropout off
        module = OnnxModule(model)
        return float(np.mean([loss(module(x=b["x"]), b).item() for b in _mlp_batches()]))

    before = eval_loss()
    lora_fx.train(model, _mlp_batches(), loss, steps=60, lr=1e-2, progress=False)
    assert eval_loss() < 0.9 * before
    assert any(n.op_type == "Dropout" for n in model.graph)


# ---- exports with Conv (ViT) and sequence ops (Phi3, unoptimized) ---------------------------------------


def _dynamo_export(model: torch.nn.Module, kwargs: dict, dynamic: dict, path: Path, outputs: list[str], optimize: bool = True) -> Path:
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), str(path), kwargs=kwargs, dynamo=True, optimize=optimize, opset_version=18,
                          input_names=list(kwargs), output_names=outputs, dynamic_shapes=dynamic, verbose=False)
    return path


def _op_types(model: ir.Model) -> set[str]:
    return {n.op_type for n in model.graph}


def _vit_batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        px = torch.randn(8, 3, 32, 32, generator=gen)
        out.append({"pixel_values": px, "labels": px.mean(dim=(2, 3)).argmax(-1)})  # the brightest channel
    return out


@pytest.mark.slow
def test_vit_with_conv_patch_embedding_matches_onnxruntime_and_trains(tmp_path: Path) -> None:
    """A tiny ViT (32x32 images, 8x8 patches, 2 layers) exported with dynamo: its patch embedding is a Conv.
    With LoRA on q_proj and v_proj the torch forward equals ONNX Runtime's before and after training, and
    training lowers the loss."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64, num_labels=3)
    vit = tf.ViTForImageClassification(config).eval()
    path = _dynamo_export(vit, {"pixel_values": torch.randn(2, 3, 32, 32)}, {"pixel_values": {0: torch.export.Dim("batch")}},
                          tmp_path / "vit.onnx", ["logits"])
    model = lora_fx.apply(lora_fx.load(path), lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights=False))
    assert "Conv" in _op_types(model)
    batches = _vit_batches()

    def assert_matches_ort() -> None:
        saved = om.save(model, tmp_path / f"vit-lora-{len(list(tmp_path.iterdir()))}.onnx")
        module = OnnxModule(ir.load(str(saved)))
        for px in (batches[0]["pixel_values"], batches[1]["pixel_values"][:3]):
            want = torch.from_numpy(om.ort_run(saved, {"pixel_values": px})[0])
            torch.testing.assert_close(module(pixel_values=px)["logits"].detach(), want, rtol=1e-4, atol=1e-4)

    assert_matches_ort()
    result = lora_fx.train(model, batches, lora_fx.runtime.train.cross_entropy_on("logits"), steps=16, lr=1e-2, progress=False)
    assert np.mean(result.losses[-4:]) < np.mean(result.losses[:4]) - 0.02, result.losses
    assert_matches_ort()


@pytest.mark.slow
def test_phi3_unoptimized_export_with_sequence_ops_matches_onnxruntime(tmp_path: Path) -> None:
    """Tiny Phi3 exported by dynamo without the optimizer splits tensors into sequences (SplitToSequence,
    SequenceAt). With LoRA on qkv_proj and o_proj the torch forward equals ONNX Runtime's at two input shapes
    and the loss's gradient reaches every adapter."""
    import transformers as tf

    from tests import models

    torch.manual_seed(0)
    config = tf.Phi3Config(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                           use_cache=False)
    phi3 = tf.Phi3ForCausalLM(config).eval()
    kwargs = models.inputs(2, 8)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    path = _dynamo_export(phi3, kwargs, {k: dims for k in kwargs}, tmp_path / "phi3.onnx", ["logits"], optimize=False)
    model = lora_fx.apply(lora_fx.load(path), lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj"],
                                                                 init_lora_weights=False))
    assert {"SplitToSequence", "SequenceAt"} <= _op_types(model)
    saved = om.save(model, tmp_path / "phi3-lora.onnx")
    module = OnnxModule(ir.load(str(saved)))
    for feeds in (models.inputs(2, 8, pad=2), models.inputs(3, 5, seed=1)):
        want = torch.from_numpy(om.ort_run(saved, feeds)[0])
        got = module(**feeds)["logits"]
        torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-4)
    got.logsumexp(-1).mean().backward()
    assert len(module.trainable_names) == 8
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in module.named_adapters().values())


def test_a_served_export_with_adapter_slots_is_refused_and_its_source_trains(tmp_path: Path) -> None:
    """``export --adapters`` output: its adapter initializers are graph inputs defaulting to zero A and B, so every
    gradient is zero and a "trained" file's no-adapter run would stop being the base. Refused, naming what to train
    instead, through the ONNX model and through an OnnxModule of it; the rewritten file it came from trains."""
    from lora_fx.cli import main
    from lora_fx.errors import AdapterError
    from tests.exported import lora_onnx
    from tests.onnx_corpus import corpus

    lora = tmp_path / "lora.onnx"
    lora_fx.save(lora_onnx("gemm-mlp"), lora)
    assert main(["export", str(lora), "-o", str(tmp_path / "served.onnx"), "--adapters"]) == 0
    x = torch.from_numpy(corpus().get("gemm-mlp").feeds()["x"])
    batches = [{"x": x, "t": torch.zeros(len(x), 5)}]
    loss = lambda out, b: ((out["y"] - b["t"]) ** 2).mean()  # noqa: E731
    served = lora_fx.load(tmp_path / "served.onnx")
    before = {n: v.const_value.numpy().copy() for n, v in served.graph.initializers.items()}
    for model in (served, OnnxModule(served)):
        with pytest.raises(AdapterError, match=r"has adapter slots .*export --adapters.*Train the rewritten model it "
                                               r"was exported from.*lora_fx\.load_adapter"):
            lora_fx.train(model, batches, loss, steps=2, progress=False)
    assert all(np.array_equal(v.const_value.numpy(), before[n]) for n, v in served.graph.initializers.items())
    result = lora_fx.train(lora_fx.load(lora), batches, loss, steps=2, progress=False)
    assert min(result.grad_norms) > 0
