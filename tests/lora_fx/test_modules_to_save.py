"""``modules_to_save`` and the classifier head PEFT trains with ``task_type="SEQ_CLS"``, against PEFT.

Adapters cross in both directions by file (PEFT-trained or perturbed head + adapters -> lora_fx, lora_fx-trained
-> PEFT), and the outputs must agree; the FX front end must train the head and only the head beside the adapters.
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch

import lora_fx
from lora_fx.config import LoraConfig
from lora_fx.errors import AdapterError, ConfigError, TargetNotFoundError, UnsupportedError
from lora_fx.passes.fx.freeze_base import saved_base
from tests.models import VOCAB, inputs, main_output, peft_lora_modules
from tests.shared_exports import captured_from

TOL = 1e-5


def _bert_cls():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return tf.BertForSequenceClassification(cfg).eval()


def _llama_cls():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_labels=3,
                         pad_token_id=0)
    return tf.LlamaForSequenceClassification(cfg).eval()


MODELS = {"bert": (_bert_cls, "classifier", ["query", "value"]), "llama": (_llama_cls, "score", ["q_proj", "v_proj"])}


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(**batch)).float()


def _perturb_peft(pm) -> None:
    """Random lora_B and head copies, so a load that drops either changes the outputs."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_B." in name or ".modules_to_save." in name:
                p.add_(torch.randn_like(p) * 0.5)


# ---- config ----------------------------------------------------------------------------------------


def test_seq_cls_adds_the_heads_as_peft_and_round_trips(tmp_path):
    import peft

    ours = LoraConfig(task_type="SEQ_CLS", target_modules=["query"], modules_to_save=["pooler"])
    theirs = peft.get_peft_model(_bert_cls(), peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"],
                                                               modules_to_save=["pooler"])).peft_config["default"]
    assert ours.modules_to_save == theirs.modules_to_save == ["pooler", "classifier", "score"]
    assert LoraConfig.from_json(ours.to_json()) == ours
    assert json.loads(ours.to_json())["modules_to_save"] == ["pooler", "classifier", "score"]
    # PEFT's own to_dict, before and after its model added the heads: the same config here, heads once.
    plain = peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"])
    assert LoraConfig.from_dict(plain.to_dict()).modules_to_save == ["classifier", "score"]
    assert LoraConfig.from_dict(theirs.to_dict()) == ours
    assert LoraConfig(target_modules=["query"], modules_to_save=("b", "a")).modules_to_save == ["a", "b"]
    assert LoraConfig(target_modules=["query"]).modules_to_save is None


@pytest.mark.parametrize("bad", ["classifier", [""], [3], ["*x"]])
def test_malformed_modules_to_save_is_refused_by_name(bad):
    with pytest.raises(ConfigError, match="modules_to_save"):
        LoraConfig(target_modules=["query"], modules_to_save=bad)


# ---- FX front end ----------------------------------------------------------------------------------


def _peft_names(pm) -> set[str]:
    """PEFT's trainable parameters by the names lora_fx gives them."""
    out = set()
    for name, p in pm.named_parameters():
        if p.requires_grad:
            out.add(name.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
                    .replace(".default.", "."))
    return out


@pytest.mark.parametrize("case", [
    dict(task_type="SEQ_CLS", target_modules=["query", "value"]),
    dict(task_type="SEQ_CLS", target_modules="all-linear"),
    # PEFT keeps LoRA off a module trained in full and off everything inside it.
    dict(target_modules=["dense"], modules_to_save=["pooler", "classifier"]),
])
def test_trainable_parameters_and_lora_sites_equal_peft(case):
    import peft

    model = _bert_cls()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, **copy.deepcopy(case)))
    gm = captured_from(_bert_cls)  # the capture of the same seeded model at inputs(2, 8), made once per process
    lora_fx.apply(gm, LoraConfig(r=2, **case))
    ours = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert ours == _peft_names(pm)
    assert set(lora_fx.passes.fx.capture.meta(gm)["lora_sites"]) == set(peft_lora_modules(pm))


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_peft_seq_cls_adapter_loads_with_its_head(name, tmp_path):
    import peft

    build, head, targets = MODELS[name]
    model = _bert_cls() if name == "bert" else _llama_cls()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, task_type="SEQ_CLS", target_modules=targets))
    _perturb_peft(pm)
    pm.eval().save_pretrained(tmp_path / "peft")
    batch = inputs(2, 8)
    want = _logits(pm, batch)
    base = _logits(model, batch)

    gm = captured_from(build)  # at inputs(2, 8), as batch
    lora_fx.load_adapter(gm, tmp_path / "peft")
    got = _logits(gm, batch)
    assert (got - want).abs().max() < TOL
    assert (want - base).abs().max() > 1e-2  # the head and adapters moved the outputs

    # Without its head the same adapter would not match: the head really came from the file.
    params = dict(gm.named_parameters())
    with torch.no_grad():
        params[f"{head}.weight"].copy_(saved_base(gm)[f"{head}.weight"])
    assert (_logits(gm, batch) - want).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_lora_fx_trained_head_loads_in_peft(name, tmp_path):
    import peft

    build, head, targets = MODELS[name]
    model = build()
    batch = inputs(4, 8)
    labels = torch.tensor([0, 1, 2, 1])
    gm = captured_from(build)
    lora_fx.apply(gm, LoraConfig(r=4, task_type="SEQ_CLS", target_modules=targets))
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}

    def loss_fn(out, b):
        return torch.nn.functional.cross_entropy(main_output(out), b["labels"])

    lora_fx.train(gm, [{**batch, "labels": labels}], loss_fn, steps=5, lr=1e-1, progress=False)
    moved = {n for n, p in gm.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == {n for n, p in gm.named_parameters() if p.requires_grad}
    assert {f"{head}.weight"} <= moved and all(".lora_" in n or n.startswith(f"{head}.") for n in moved)
    # The base head is kept, as PEFT keeps original_module.
    assert torch.equal(saved_base(gm)[f"{head}.weight"], before[f"{head}.weight"])

    lora_fx.save_adapter(gm, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier", "score"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    assert type(pm).__name__ == "PeftModelForSequenceClassification"
    assert (_logits(pm, batch) - _logits(gm, batch)).abs().max() < TOL
    assert (_logits(pm, batch) - _logits(model, batch)).abs().max() > 1e-3


def test_loading_an_adapter_without_the_head_restores_and_freezes_the_base_head(tmp_path):
    import peft

    model = _bert_cls()
    with_head = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, task_type="SEQ_CLS", target_modules=["query"]))
    _perturb_peft(with_head)
    with_head.save_pretrained(tmp_path / "head")
    plain = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["query"]))
    _perturb_peft(plain)
    plain.save_pretrained(tmp_path / "plain")
    batch = inputs(2, 8)

    gm = captured_from(_bert_cls)
    lora_fx.load_adapter(gm, tmp_path / "head")
    lora_fx.load_adapter(gm, tmp_path / "plain")
    assert (_logits(gm, batch) - _logits(plain.eval(), batch)).abs().max() < TOL
    assert not dict(gm.named_parameters())["classifier.weight"].requires_grad
    lora_fx.load_adapter(gm, tmp_path / "head")
    assert (_logits(gm, batch) - _logits(with_head.eval(), batch)).abs().max() < TOL
    assert dict(gm.named_parameters())["classifier.weight"].requires_grad


def test_head_of_another_shape_is_refused_and_leaves_the_model_as_it_was(tmp_path):
    import peft
    import transformers as tf

    torch.manual_seed(0)
    other = tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=5)).eval()
    peft.get_peft_model(other, peft.LoraConfig(r=2, task_type="SEQ_CLS", target_modules=["query"])).save_pretrained(tmp_path / "p")
    gm = captured_from(_bert_cls)
    with pytest.raises(AdapterError, match=r"base_model.model.classifier.(weight|bias) has shape \(5.*this model.s classifier.(weight|bias) is \(3"):
        lora_fx.load_adapter(gm, tmp_path / "p")
    assert not lora_fx.passes.fx.capture.meta(gm).get("lora_sites")


def test_a_module_to_save_that_matches_nothing_is_refused_before_any_change():
    gm = captured_from(_bert_cls)
    with pytest.raises(TargetNotFoundError, match=r"modules_to_save entry 'clasifier'.*closest: classifier"):
        lora_fx.apply(gm, LoraConfig(target_modules=["query"], modules_to_save=["clasifier"]))
    assert not lora_fx.passes.fx.capture.meta(gm).get("lora_sites")


# ---- export and the ONNX front end ---------------------------------------------------------------------


@pytest.mark.slow
def test_merged_export_writes_the_trained_head_and_the_onnx_front_end_trains_it(tmp_path):
    """mode='merged' carries the trained head into ONNX Runtime (mode='adapters': tests/lora_fx/test_head_slots.py);
    the exported base, rewritten by apply on the ONNX file, trains the head too and takes PEFT's SEQ_CLS adapter
    (the ONNX front end's own tests: tests/lora_fx/test_onnx_modules_to_save.py)."""
    import peft

    from lora_fx.runtime.onnx_torch import OnnxModule
    from tests.exported import ort_run

    model = _bert_cls()
    batch = inputs(2, 8)
    gm = captured_from(_bert_cls)
    lora_fx.apply(gm, LoraConfig(r=2, task_type="SEQ_CLS", target_modules=["query"]))
    params = dict(gm.named_parameters())
    with torch.no_grad():  # a trained head and adapter, as lora_fx.train leaves them
        params["classifier.weight"].add_(torch.randn_like(params["classifier.weight"]))
        for name, p in params.items():
            if ".lora_B." in name:
                p.add_(torch.randn_like(p) * 0.5)
    feeds = {k: v.numpy() for k, v in batch.items()}
    want = _logits(gm, batch).numpy()
    lora_fx.export_onnx(gm, tmp_path / "merged.onnx", kwargs=batch)
    np.testing.assert_allclose(ort_run(tmp_path / "merged.onnx", feeds), want, atol=TOL)

    lora_fx.export_onnx(captured_from(_bert_cls), tmp_path / "base.onnx", kwargs=batch)
    onnx_model = lora_fx.load(tmp_path / "base.onnx")
    lora_fx.apply(onnx_model, LoraConfig(r=2, task_type="SEQ_CLS", target_modules=["query"]))
    module = OnnxModule(onnx_model)
    assert {"classifier.weight", "classifier.bias"} <= set(module.trainable_names)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, task_type="SEQ_CLS", target_modules=["query"]))
    _perturb_peft(pm)
    pm.save_pretrained(tmp_path / "p")
    lora_fx.load_adapter(onnx_model, tmp_path / "p")
    np.testing.assert_allclose(_logits(OnnxModule(onnx_model), batch).numpy(), _logits(pm.eval(), batch).numpy(), atol=TOL)


def test_qlora_refuses_to_quantize_the_head_before_changing_the_model():
    from lora_fx.config import QuantConfig

    gm = captured_from(_bert_cls)
    config = LoraConfig(r=2, task_type="SEQ_CLS", target_modules=["query"])
    with pytest.raises(ConfigError, match=r"would store classifier quantized.*QuantConfig\(exclude_modules=\['classifier'\]\)"):
        lora_fx.apply(gm, config, quant=QuantConfig())
    assert not lora_fx.passes.fx.capture.meta(gm).get("quant") and not lora_fx.passes.fx.capture.meta(gm).get("lora_sites")
    lora_fx.apply(gm, config, quant=QuantConfig(exclude_modules=["classifier"]))
    params = dict(gm.named_parameters())
    assert params["classifier.weight"].requires_grad and params["classifier.weight"].dtype == torch.float32
    assert "bert.pooler.dense" in lora_fx.passes.fx.capture.meta(gm)["quant"]


def _distilbert_cls():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=1, n_heads=4, max_position_embeddings=64,
                              num_labels=3)
    return tf.DistilBertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("front_end", ["fx", "onnx"])
def test_a_head_layer_all_linear_also_targets_is_refused_and_exclude_modules_gives_a_peft_adapter(front_end, tmp_path):
    """DistilBERT's ``pre_classifier`` ends with ``classifier`` (a SEQ_CLS head name, matched as a suffix), so PEFT
    trains it in full, while 'all-linear' also targets it (PEFT keeps LoRA off modules to save by a dotted match
    only): PEFT fails with a TypeError. The FX front end used to adapt it and train it in full, saving an adapter
    PEFT cannot load; the ONNX one refused only after inserting LoRA, leaving the model half rewritten."""
    import peft

    from lora_fx.onnx_model import load as load_onnx

    eager = _distilbert_cls()
    batch = {k: v for k, v in inputs(2, 8).items() if k in ("input_ids", "attention_mask")}

    def fresh():
        if front_end == "fx":
            return lora_fx.capture(eager, kwargs=batch)
        path = tmp_path / "base.onnx"
        if not path.exists():
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(eager, (), str(path), kwargs=batch, dynamo=True, opset_version=18,
                                  input_names=list(batch), verbose=False)
        return load_onnx(path)

    model = fresh()
    with pytest.raises(AdapterError, match=r"pre_classifier is trained in full .*exclude_modules=\['pre_classifier'\]"):
        lora_fx.apply(model, LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    # Refused before any change: the same model takes the config that leaves the head layer out.
    torch.manual_seed(2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["pre_classifier"],
                        task_type="SEQ_CLS", init_lora_weights=False)
    model = lora_fx.apply(model, config)
    lora_fx.save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "pre_classifier" not in saved["target_modules"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(eager), tmp_path / "adapter").eval()
    assert {n for n, _ in pm.named_modules() if n.endswith("modules_to_save")} == {
        "base_model.model.pre_classifier.modules_to_save", "base_model.model.classifier.modules_to_save"}
    if front_end == "fx":
        assert {n for n, p in model.named_parameters() if p.requires_grad and "lora" not in n} == {
            "pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"}
        with torch.no_grad():
            ours = main_output(model(**batch)).numpy()
    else:
        from tests.exported import ort_run

        lora_fx.save(model, tmp_path / "lora.onnx")
        ours = ort_run(tmp_path / "lora.onnx", {k: v.numpy() for k, v in batch.items()})
    want = _logits(pm, batch).numpy()
    assert np.abs(want - _logits(eager, batch).numpy()).max() > 1e-3  # the adapter changes the output
    np.testing.assert_allclose(ours, want, rtol=0, atol=TOL * max(1.0, float(np.abs(want).max())))
