"""Prefix-tuning with ``task_type="SEQ_CLS"`` / ``modules_to_save``: the head trains in full beside the prefixes.

PEFT's ``PrefixTuningConfig(task_type="SEQ_CLS")`` trains the classification head in full beside the prefixes and
saves it as ``base_model.<head>.<param>`` beside ``prompt_embeddings``. Every number here is compared with PEFT on
the same tiny BertForSequenceClassification / LlamaForSequenceClassification: the trainable parameters, the logits
and one step's gradients (FX and ONNX front ends), a few training steps' losses, adapters crossing by file in both
directions, and the served export in ONNX Runtime.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import lora_fx
from lora_fx.config import PrefixConfig
from lora_fx.errors import AdapterError, ConfigError, TargetNotFoundError, UnsupportedError
from lora_fx.onnx_adapter import read_onnx_adapter, read_saved
from lora_fx.passes.fx.capture import meta
from lora_fx.passes.fx.freeze_base import saved_base
from lora_fx.prefix_adapters import to_peft_blocks
from lora_fx.runtime.onnx_torch import OnnxModule
from tests.models import VOCAB, inputs
from tests.shared_exports import captured_from

T = 4
TOL = 1e-5


def _bert(num_labels: int = 3):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    return tf.BertForSequenceClassification(cfg).eval()


def _llama():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_labels=3,
                         pad_token_id=0, use_cache=False)
    return tf.LlamaForSequenceClassification(cfg).eval()


# arch -> (builder, head module, its parameters)
ARCHS = {"bert": (_bert, "classifier", ["classifier.bias", "classifier.weight"]),
         "llama": (_llama, "score", ["score.weight"])}


def _peft(model, seed: int = 1, **extra):
    """PEFT's prefix-tuning SEQ_CLS model on a copy of ``model``, prefixes and head moved as training moves them."""
    import peft

    pm = peft.get_peft_model(copy.deepcopy(model), peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=T, **extra))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".modules_to_save." in name or "prompt_encoder" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return pm.eval()


def _peft_logits(pm, batch) -> torch.Tensor:
    """What PeftModelForSequenceClassification computes for prefix tuning: the model run with ``get_prompt`` as its
    past key values and T always-visible mask columns in front. PEFT 0.21 refuses that call itself on transformers 5,
    whose forward signatures no longer list ``past_key_values`` (they take it through ``**kwargs``); this is the branch
    it takes when they do."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    mask = torch.cat([torch.ones(ids.shape[0], T, dtype=mask.dtype), mask], dim=1)
    return pm.base_model(input_ids=ids, attention_mask=mask, past_key_values=pm.get_prompt(ids.shape[0])).logits


def _logits(model, batch) -> torch.Tensor:
    out = model(**batch)
    return out["logits"] if isinstance(out, dict) else out[0]


def _head_grads(pm, head: str) -> dict[str, torch.Tensor]:
    return {f"{head}.{n.rpartition('.')[2]}": p.grad for n, p in pm.named_parameters() if f"{head}.modules_to_save." in n}


def _prompt_grad(pm) -> torch.Tensor:
    return pm.prompt_encoder["default"].embedding.weight.grad


BATCH = dict(batch=3, seq=7, pad=2, seed=3)
LABELS = torch.tensor([0, 2, 1])


# ---- config ----------------------------------------------------------------------------------------------


def test_seq_cls_adds_the_heads_as_peft_and_round_trips(tmp_path):
    import peft

    ours = PrefixConfig(task_type="SEQ_CLS", num_virtual_tokens=T, modules_to_save=["pooler"])
    assert ours.modules_to_save == ["pooler", "classifier", "score"]
    assert PrefixConfig.from_json(ours.to_json()) == ours
    assert json.loads(ours.to_json())["modules_to_save"] == ["pooler", "classifier", "score"]
    # PEFT's config after get_peft_model holds the heads twice (added per adapter set up): here once.
    pm = peft.get_peft_model(_bert(), peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=T))
    theirs = pm.peft_config["default"]
    assert theirs.modules_to_save.count("classifier") == 2
    assert PrefixConfig.from_dict(theirs.to_dict()).modules_to_save == ["classifier", "score"]
    # Ours in PEFT: its prefix-tuning config reads the field.
    ours.save_pretrained(tmp_path)
    assert peft.PrefixTuningConfig.from_pretrained(tmp_path).modules_to_save == ["pooler", "classifier", "score"]
    assert PrefixConfig(num_virtual_tokens=T).modules_to_save is None
    assert PrefixConfig(modules_to_save=("b", "a")).modules_to_save == ["a", "b"]


@pytest.mark.parametrize("bad", ["classifier", [1], [""], ["("]])
def test_malformed_modules_to_save_is_refused_by_name(bad):
    with pytest.raises(ConfigError, match="modules_to_save"):
        PrefixConfig(modules_to_save=bad)


# ---- FX front end ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_apply_trains_the_head_beside_the_prefixes_as_peft(arch):
    build, head, params = ARCHS[arch]
    model = build()
    pm = _peft(model)
    gm = lora_fx.apply(captured_from(build), PrefixConfig(task_type="SEQ_CLS", num_virtual_tokens=T))
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    prefixes = {n for n in trainable if ".prefix_" in n}
    assert trainable - prefixes == set(params)
    assert len(prefixes) == 2 * 2  # key and value of two layers: PEFT's prompt_embeddings
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == {
        "prompt_encoder.default.embedding.weight", *(f"base_model.{head}.modules_to_save.default.{p.rpartition('.')[2]}" for p in params)}
    # The base head is kept, as PEFT keeps original_module.
    torch_params = dict(model.named_parameters())
    for name in params:
        assert torch.equal(saved_base(gm)[name], torch_params[name])
    assert meta(gm)["adapters"]["default"].modules_to_save == ["classifier", "score"]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_peft_adapter_loads_with_its_head_and_one_step_has_peft_gradients(arch, tmp_path):
    from safetensors.torch import load_file

    build, head, params = ARCHS[arch]
    model = build()
    pm = _peft(model)
    pm.save_pretrained(tmp_path / "peft")
    assert set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))) == {
        "prompt_embeddings", *(f"base_model.{p}" for p in params)}
    gm = lora_fx.load_adapter(captured_from(build), tmp_path / "peft")
    batch = inputs(**BATCH)
    want = _peft_logits(pm, batch)
    got = _logits(gm, batch)
    torch.testing.assert_close(got, want, atol=TOL, rtol=1e-4)
    # Both halves came from the file: the base head, or the model without prefixes, gives other logits.
    with torch.no_grad():
        assert (_logits(model, batch) - want).abs().max() > 1e-2

    torch.nn.functional.cross_entropy(got, LABELS).backward()
    torch.nn.functional.cross_entropy(_peft_logits(pm, batch), LABELS).backward()
    ours = dict(gm.named_parameters())
    for name, grad in _head_grads(pm, head).items():
        torch.testing.assert_close(ours[name].grad, grad, atol=TOL, rtol=1e-4)
    rec = meta(gm)["prefix"]
    grads = {site: (gm.get_submodule(site).prefix_key.grad, gm.get_submodule(site).prefix_value.grad) for site in rec["sites"]}
    torch.testing.assert_close(to_peft_blocks(rec, grads), _prompt_grad(pm), atol=TOL, rtol=1e-4)

    # The head really came from the file: the base head gives other logits.
    with torch.no_grad():
        for name in params:
            ours[name].copy_(saved_base(gm)[name])
        assert (_logits(gm, batch) - want).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_the_trained_head_is_saved_under_peft_keys_and_loads_in_peft(arch, tmp_path):
    import peft
    from safetensors.torch import load_file

    build, head, params = ARCHS[arch]
    model = build()
    gm = lora_fx.apply(captured_from(build), PrefixConfig(task_type="SEQ_CLS", num_virtual_tokens=T))
    batch = {**inputs(**BATCH), "labels": LABELS}

    def loss_fn(out, b):
        return torch.nn.functional.cross_entropy(out["logits"] if isinstance(out, dict) else out[0], b["labels"])

    losses = lora_fx.train(gm, [batch], loss_fn, steps=6, lr=5e-2, progress=False).losses
    assert losses[-1] < losses[0] - 0.1
    moved = [n for n in params if not torch.equal(dict(gm.named_parameters())[n], saved_base(gm)[n])]
    assert moved == params  # the head learnt

    lora_fx.save_adapter(gm, tmp_path / "ours")
    assert set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))) == {
        "prompt_embeddings", *(f"base_model.{p}" for p in params)}
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier", "score"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    assert type(loaded).__name__ == "PeftModelForSequenceClassification"
    b = inputs(2, 9, pad=3, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(_peft_logits(loaded, b), _logits(gm, b), atol=TOL, rtol=1e-4)


def test_a_classifier_without_task_type_trains_its_head_as_the_saved_seq_cls_config_says(tmp_path):
    """apply finds task_type SEQ_CLS from the model class and writes it into the saved config, with which PEFT trains
    the head: so does lora_fx (a freshly initialised head that never learns was the silent alternative)."""
    import peft

    model = _bert()
    gm = lora_fx.apply(captured_from(_bert), PrefixConfig(num_virtual_tokens=T))
    assert {n for n, p in gm.named_parameters() if p.requires_grad and ".prefix_" not in n} == {"classifier.weight", "classifier.bias"}
    with torch.no_grad():
        dict(gm.named_parameters())["classifier.weight"].add_(1.0)
    lora_fx.save_adapter(gm, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["classifier", "score"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    b = inputs(**BATCH)
    with torch.no_grad():
        torch.testing.assert_close(_peft_logits(loaded, b), _logits(gm, b), atol=TOL, rtol=1e-4)


def test_a_seq_cls_file_without_a_head_from_an_earlier_lora_fx_loads_with_the_base_head(tmp_path):
    """Written before lora_fx trained the head: task SEQ_CLS, modules_to_save unset, no head tensor (PEFT cannot load it).
    It loads with the base head it was trained with, and saved again it holds that head and loads in PEFT."""
    import peft
    from safetensors.torch import load_file, save_file

    model = _bert()
    pm = _peft(model)
    pm.save_pretrained(tmp_path / "peft")
    old = tmp_path / "old"
    old.mkdir()
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (old / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": None}))
    emb = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))["prompt_embeddings"]
    save_file({"prompt_embeddings": emb}, str(old / "adapter_model.safetensors"))
    wrapper = pm.base_model.classifier
    wrapper.modules_to_save["default"].load_state_dict(wrapper.original_module.state_dict())
    b = inputs(**BATCH)
    with torch.no_grad():
        want = _peft_logits(pm, b)
        gm = lora_fx.load_adapter(captured_from(_bert), old)
        torch.testing.assert_close(_logits(gm, b), want, atol=TOL, rtol=1e-4)
        assert (_logits(model, b) - want).abs().max() > 1e-3  # the prefixes were loaded
    lora_fx.save_adapter(gm, tmp_path / "again")
    assert "base_model.classifier.weight" in load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(_peft_logits(again, b), want, atol=TOL, rtol=1e-4)
    # The ONNX front end reads it the same way (the user's export of the same base, as the ONNX tests below read it).
    from tests.shared_exports import user_export

    onnx_model = lora_fx.load_adapter(lora_fx.load(user_export(_bert, "dynamo")), old)
    with torch.no_grad():
        torch.testing.assert_close(OnnxModule(onnx_model)(**b)["logits"], want, atol=TOL, rtol=1e-4)


def test_refusals_name_the_problem_and_leave_the_model_as_it_was(tmp_path):
    from safetensors.torch import load_file, save_file

    _peft(_bert(num_labels=2)).save_pretrained(tmp_path / "two")
    gm = captured_from(_bert)
    code, trainable = gm.code, [p.requires_grad for p in gm.parameters()]
    with pytest.raises(AdapterError, match=r"base_model\.classifier\.(weight|bias) has shape \(2.*another number of labels"):
        lora_fx.load_adapter(gm, tmp_path / "two")
    assert gm.code == code and not meta(gm).get("prefix")
    with pytest.raises(TargetNotFoundError, match="'clasifier' matches no module"):
        lora_fx.apply(gm, PrefixConfig(num_virtual_tokens=T, modules_to_save=["clasifier"]))
    assert gm.code == code and not meta(gm).get("prefix")
    assert [p.requires_grad for p in gm.parameters()] == trainable and not saved_base(gm)

    # A tensor that is neither the prefixes nor a head PEFT would save.
    _peft(_bert()).save_pretrained(tmp_path / "odd")
    tensors = load_file(str(tmp_path / "odd" / "adapter_model.safetensors"))
    save_file({**tensors, "bert.pooler.dense.weight": torch.zeros(32, 32)}, str(tmp_path / "odd" / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="neither prompt_embeddings nor a parameter of a module trained in full"):
        lora_fx.load_adapter(gm, tmp_path / "odd")
    # A head file whose config does not train it.
    save_file(tensors, str(tmp_path / "odd" / "adapter_model.safetensors"))
    cfg = json.loads((tmp_path / "odd" / "adapter_config.json").read_text())
    (tmp_path / "odd" / "adapter_config.json").write_text(json.dumps({**cfg, "task_type": "FEATURE_EXTRACTION", "modules_to_save": None}))
    with pytest.raises(AdapterError, match="neither a prefix nor a parameter of a module"):
        lora_fx.load_adapter(gm, tmp_path / "odd")
    assert gm.code == code and not meta(gm).get("prefix")


def test_qlora_refuses_to_quantize_the_head_before_changing_the_model():
    gm = captured_from(_bert)
    code = gm.code
    # The task type found from the model class (SEQ_CLS) trains the head too.
    with pytest.raises(ConfigError, match=r"would store classifier quantized.*QuantConfig\(exclude_modules=\['classifier'\]\)"):
        lora_fx.apply(gm, PrefixConfig(num_virtual_tokens=T), quant=lora_fx.QuantConfig())
    assert gm.code == code and not meta(gm).get("quant") and not meta(gm).get("prefix")
    lora_fx.apply(gm, PrefixConfig(num_virtual_tokens=T), quant=lora_fx.QuantConfig(exclude_modules=["classifier"]))
    assert {n for n, p in gm.named_parameters() if p.requires_grad and ".prefix_" not in n} == {"classifier.weight", "classifier.bias"}


def test_merged_export_stays_refused_with_the_way_out(tmp_path):
    from lora_fx.export import export_onnx

    gm = lora_fx.apply(captured_from(_bert), PrefixConfig(task_type="SEQ_CLS", num_virtual_tokens=T))
    with pytest.raises(UnsupportedError, match="cannot be folded into weights; export with mode='adapters'"):
        export_onnx(gm, tmp_path / "m.onnx", kwargs=inputs(2, 8), mode="merged")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_served_export_makes_head_slots_and_the_adapter_carries_the_trained_head(arch, tmp_path):
    import onnxruntime as ort
    import peft

    from lora_fx.export import export_onnx

    build, head, params = ARCHS[arch]
    model = build()
    pm = _peft(model)
    pm.save_pretrained(tmp_path / "peft")
    gm = lora_fx.load_adapter(captured_from(build), tmp_path / "peft")
    result = export_onnx(gm, tmp_path / "served.onnx", kwargs=inputs(2, 8), mode="adapters")
    sess = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    slots = {i.name for i in sess.get_overridable_initializers()}
    assert set(params) <= slots and len(slots - set(params)) == 2 * 2
    assert read_saved(sess.get_modelmeta().custom_metadata_map) == {p: head for p in params}
    adapter = read_onnx_adapter(result.adapter_paths[0])
    assert set(adapter.tensors) == slots
    b = inputs(**BATCH)
    feeds = {k: v.numpy() for k, v in b.items()}
    with torch.no_grad():
        trained = _logits(gm, b).numpy()
        np.testing.assert_allclose(trained, _peft_logits(pm, b).numpy(), atol=TOL)
    loaded = ort.LoraAdapter()
    loaded.Load(str(result.adapter_paths[0]))
    opts = ort.RunOptions()
    opts.add_active_adapter(loaded)
    np.testing.assert_allclose(sess.run(None, feeds, opts)[0], trained, atol=1e-5)
    # lora_fx's own session (lora-fx run) checks the adapter against the slots and switches the head with it.
    from lora_fx.runtime.ort import Session

    served = Session(result.model_path)
    assert not served.add_adapter("trained", result.adapter_paths[0]).default_sites
    np.testing.assert_allclose(served.run(feeds, adapter="trained")[0], trained, atol=1e-5)
    # Without an adapter: the prefixes the file was exported with (their defaults) and the base head (its default),
    # as PEFT runs an adapter that does not train the head.
    with torch.no_grad():
        ours = dict(gm.named_parameters())
        for name in params:
            ours[name].copy_(saved_base(gm)[name])
        base_head = _logits(gm, b).numpy()
    assert np.abs(base_head - trained).max() > 1e-3
    np.testing.assert_allclose(sess.run(None, feeds)[0], base_head, atol=1e-5)
    # The PEFT directory written beside it holds the trained head too.
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), result.peft_dirs[0]).eval()
    with torch.no_grad():
        np.testing.assert_allclose(_peft_logits(theirs, b).numpy(), trained, atol=TOL)


# ---- ONNX front end ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported():
    """The file of (arch, exporter), exported once per process."""
    from tests.shared_exports import user_export

    return lambda arch, exporter: user_export(ARCHS[arch][0], exporter)


CASES = [(arch, exporter) for arch in ARCHS for exporter in ("dynamo", "torchscript")]


@pytest.mark.parametrize("arch,exporter", CASES)
def test_onnx_apply_trains_the_head_and_a_peft_adapter_loads_with_peft_gradients(exported, arch, exporter, tmp_path):
    from lora_fx.passes.onnx.insert_prefix import prefix_metadata

    build, head, params = ARCHS[arch]
    model = build()
    applied = lora_fx.apply(lora_fx.load(exported(arch, exporter)), PrefixConfig(task_type="SEQ_CLS", num_virtual_tokens=T))
    assert read_saved(applied.metadata_props) == {p: head for p in params}
    assert set(params) <= set(OnnxModule(applied).trainable_names)

    pm = _peft(model)
    pm.save_pretrained(tmp_path / "peft")
    onnx_model = lora_fx.load_adapter(lora_fx.load(exported(arch, exporter)), tmp_path / "peft")
    module = OnnxModule(onnx_model)
    batch = inputs(**BATCH)
    got = module(**batch)["logits"]
    want = _peft_logits(pm, batch)
    torch.testing.assert_close(got, want, atol=TOL, rtol=1e-4)
    torch.nn.functional.cross_entropy(got, LABELS).backward()
    torch.nn.functional.cross_entropy(_peft_logits(pm, batch), LABELS).backward()
    for name, grad in _head_grads(pm, head).items():
        torch.testing.assert_close(module.tensor(name).grad, grad, atol=TOL, rtol=1e-4)
    rec = prefix_metadata(onnx_model)
    grads = {site: (module.tensor(r["key"]).grad, module.tensor(r["value"]).grad) for site, r in rec["sites"].items()}
    torch.testing.assert_close(to_peft_blocks(rec, grads), _prompt_grad(pm), atol=TOL, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("arch,exporter", [("bert", "dynamo"), ("llama", "torchscript")])
def test_onnx_training_follows_peft_and_the_saved_adapter_loads_in_peft(exported, arch, exporter, tmp_path):
    import peft

    from lora_fx.passes.onnx.freeze_base import saved_base as onnx_saved_base

    build, head, params = ARCHS[arch]
    model = build()
    pm = _peft(model)
    pm.save_pretrained(tmp_path / "start")
    onnx_model = lora_fx.load_adapter(lora_fx.load(exported(arch, exporter)), tmp_path / "start")
    batches = [{**inputs(**BATCH), "labels": LABELS}]

    def loss_fn(out, b):
        return torch.nn.functional.cross_entropy(out["logits"], b["labels"])

    steps, lr = 6, 3e-2
    ours = lora_fx.train(onnx_model, batches, loss_fn, steps=steps, lr=lr, max_grad_norm=None, progress=False).losses
    pm.train(False)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    theirs = []
    for _ in range(steps):
        loss = loss_fn({"logits": _peft_logits(pm, batches[0])}, batches[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        theirs.append(float(loss.detach()))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=TOL)
    assert ours[-1] < ours[0] - 0.1
    assert not any(np.array_equal(onnx_model.graph.initializers[n].const_value.numpy(), onnx_saved_base(onnx_model)[n][1])
                   for n in params)  # the head moved

    lora_fx.save_adapter(onnx_model, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    b = inputs(2, 9, pad=3, seed=7)
    with torch.no_grad():
        want = OnnxModule(onnx_model)(**b)["logits"]
        torch.testing.assert_close(_peft_logits(loaded, b), want, atol=TOL, rtol=1e-4)
        torch.testing.assert_close(_peft_logits(pm, b), want, atol=1e-4, rtol=1e-4)
