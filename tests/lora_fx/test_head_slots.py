"""``modules_to_save`` (the SEQ_CLS head) exported as swappable ONNX Runtime slots, against PEFT and the graph.

``export_onnx(mode="adapters")`` of a model whose head trains in full: the head's parameters are slots whose defaults
are the base head, the ``.onnx_adapter`` and the PEFT directory carry the trained head, ``runtime.Session`` switches
heads per call, plain onnxruntime runs the file, a PEFT SEQ_CLS adapter converts and runs as in PEFT, and
``export --merge --adapter`` folds the head in, and an adapter of an export of the same base without head slots
(LoRA only, its base head counted as a base weight) runs on the head-slot model with the base head.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

import lora_fx
from lora_fx.config import LoraConfig
from lora_fx.errors import AdapterError, ModelLoadError
from lora_fx.onnx_adapter import (HEADS_AS_BASE_KEY, OnnxAdapter, SAVED_KEY, model_fingerprints, peft_dir_to_onnx_adapter,
                                  read_onnx_adapter, write_onnx_adapter)
from lora_fx.runtime.ort import Session
from tests.exported import ort_run
from tests.models import VOCAB, inputs, main_output

TARGETS = ["query", "value"]


def _bert_cls(num_labels: int = 3):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    return tf.BertForSequenceClassification(cfg).eval()


def _logits(model, batch) -> np.ndarray:
    with torch.no_grad():
        return main_output(model(**batch)).float().numpy()


def _perturb(named, seed: int) -> None:
    """Random lora_B and heads (PEFT's copies, or ours), as training leaves them; the base bias is all zeros."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named:
            if ".lora_B." in name or ".modules_to_save." in name or name.startswith("classifier."):
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)


def _peft_adapter(model, directory, seed: int, **config):
    """A PEFT adapter (perturbed) saved to ``directory``; returns its model in eval mode."""
    import peft

    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=TARGETS, **config))
    _perturb(pm.named_parameters(), seed)
    pm.eval().save_pretrained(directory)
    return pm


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny BERT classifier trained (perturbed) with task_type SEQ_CLS, exported with slots and merged."""
    tmp = tmp_path_factory.mktemp("head_slots")
    model = _bert_cls()
    batch = inputs(2, 8, pad=2)
    base = _logits(model, batch)
    gm = lora_fx.capture(copy.deepcopy(model), kwargs=batch)
    lora_fx.apply(gm, LoraConfig(r=2, task_type="SEQ_CLS", target_modules=TARGETS))
    _perturb(gm.named_parameters(), seed=1)
    want = _logits(gm, batch)
    result = lora_fx.export_onnx(gm, tmp / "served.onnx", kwargs=batch, mode="adapters")
    lora_fx.export_onnx(gm, tmp / "merged.onnx", kwargs=batch)
    feeds = {k: v.numpy() for k, v in batch.items()}
    return dict(tmp=tmp, model=model, batch=batch, feeds=feeds, base=base, want=want, gm=gm, result=result)


@pytest.mark.slow
def test_head_slots_default_to_the_base_head_and_the_adapter_gives_the_trained_logits(served):
    import onnx_ir as ir

    result, feeds, want, base = served["result"], served["feeds"], served["want"], served["base"]
    assert np.abs(want - base).max() > 1e-1  # the head and the adapters moved the logits
    model = ir.load(str(result.model_path))
    assert json.loads(model.metadata_props[SAVED_KEY]) == {"classifier.bias": "classifier", "classifier.weight": "classifier"}
    inputs_ = {v.name for v in model.graph.inputs}
    base_head = dict(served["model"].named_parameters())
    for name in ("classifier.weight", "classifier.bias"):
        assert name in inputs_  # a slot: a graph input with a same-named initializer, the base head
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), base_head[name].detach().numpy())
    adapter = read_onnx_adapter(result.adapter_paths[0])
    np.testing.assert_array_equal(adapter.tensors["classifier.weight"], dict(served["gm"].named_parameters())["classifier.weight"].detach().numpy())
    # Plain onnxruntime: no adapter is the base model, the .onnx_adapter (LoraAdapter + add_active_adapter) the trained one.
    np.testing.assert_allclose(ort_run(result.model_path, feeds), base, atol=1e-5)
    np.testing.assert_allclose(ort_run(result.model_path, feeds, adapter=result.adapter_paths[0]), want, atol=1e-4)
    np.testing.assert_allclose(ort_run(served["tmp"] / "merged.onnx", feeds), want, atol=1e-4)


@pytest.mark.slow
def test_the_written_peft_dir_holds_the_head_and_gives_our_logits_in_peft(served):
    import peft
    from safetensors.torch import load_file

    directory = served["result"].peft_dirs[0]
    keys = set(load_file(str(directory / "adapter_model.safetensors")))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(served["model"]), directory).eval()
    assert type(pm).__name__ == "PeftModelForSequenceClassification"
    np.testing.assert_allclose(_logits(pm, served["batch"]), served["want"], atol=1e-5)


@pytest.mark.slow
def test_a_peft_seq_cls_adapter_runs_as_in_peft_and_two_heads_switch_call_after_call(served):
    tmp, feeds = served["tmp"], served["feeds"]
    pm = _peft_adapter(served["model"], tmp / "peft_cls", seed=2, task_type="SEQ_CLS")
    theirs = _logits(pm, served["batch"])
    path = peft_dir_to_onnx_adapter(tmp / "peft_cls", served["result"].model_path, tmp / "peft_cls.onnx_adapter")
    assert read_onnx_adapter(path).fingerprint == served["result"].fingerprint

    session = Session(served["result"].model_path, providers=["CPUExecutionProvider"])
    assert session.slot_sites == sorted([*(s for s in served["result"].sites), "classifier"])
    ours_info = session.add_adapter("ours", served["result"].adapter_paths[0])
    session.add_adapter("theirs", path)
    assert "classifier" in ours_info.sites and ours_info.default_sites == []
    assert np.abs(theirs - served["want"]).max() > 1e-1
    for name, want in [("ours", served["want"]), ("theirs", theirs), (None, served["base"]), ("theirs", theirs),
                       ("ours", served["want"]), (None, served["base"])]:
        np.testing.assert_allclose(session.run(feeds, adapter=name)[0], want, atol=1e-4 if name else 1e-5, err_msg=str(name))


@pytest.mark.slow
def test_an_adapter_without_a_head_runs_the_base_head_with_a_warning(served, capsys):
    """PEFT runs the original head for an adapter whose modules_to_save lacks it: so does the slot default."""
    from lora_fx.cli import main

    tmp = served["tmp"]
    pm = _peft_adapter(served["model"], tmp / "peft_plain", seed=3)
    theirs = _logits(pm, served["batch"])
    path = peft_dir_to_onnx_adapter(tmp / "peft_plain", served["result"].model_path, tmp / "plain.onnx_adapter")
    assert not any(k.startswith("classifier.") for k in read_onnx_adapter(path).tensors)
    session = Session(served["result"].model_path, providers=["CPUExecutionProvider"])
    info = session.add_adapter("plain", path)
    assert info.default_sites == ["classifier"]
    np.testing.assert_allclose(session.run(served["feeds"], adapter="plain")[0], theirs, atol=1e-4)
    # Loaded into the served model's weights (the ONNX front end), the head slots keep the base head too.
    onnx_model = lora_fx.load_adapter(lora_fx.load(served["result"].model_path), tmp / "peft_plain")
    lora_fx.save(onnx_model, tmp / "loaded.onnx")
    np.testing.assert_allclose(ort_run(tmp / "loaded.onnx", served["feeds"]), theirs, atol=1e-4)

    np.savez(tmp / "feeds.npz", **served["feeds"])
    capsys.readouterr()
    assert main(["run", str(served["result"].model_path), "--adapter", str(path), "--inputs", str(tmp / "feeds.npz"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["default_sites"] == ["classifier"]
    assert err.startswith("lora-fx: warning: ") and "base head" in err and err.rstrip().endswith("classifier"), err


@pytest.mark.slow
def test_merge_with_an_adapter_writes_its_head_into_the_model(served, capsys):
    import onnx_ir as ir

    from lora_fx.cli import main

    tmp, model_path = served["tmp"], served["result"].model_path
    ours = served["result"].adapter_paths[0]
    assert main(["export", str(model_path), "-o", str(tmp / "folded.onnx"), "--merge", "--adapter", str(ours), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["default_sites"] == []
    folded = ir.load(str(tmp / "folded.onnx"))
    assert [v.name for v in folded.graph.inputs] == ["input_ids", "attention_mask"] and SAVED_KEY not in folded.metadata_props
    np.testing.assert_allclose(ort_run(tmp / "folded.onnx", served["feeds"]), served["want"], atol=1e-4)

    # An adapter without a head merges the base head, with a warning (as run serves it).
    plain = tmp / "plain_only.onnx_adapter"
    good = read_onnx_adapter(ours)
    write_onnx_adapter(plain, OnnxAdapter({k: v for k, v in good.tensors.items() if ".lora_" in k}, fingerprint=good.fingerprint))
    assert main(["export", str(model_path), "-o", str(tmp / "folded_plain.onnx"), "--merge", "--adapter", str(plain)]) == 0
    err = capsys.readouterr().err
    assert "covers 2 of the 3 adapter sites" in err and err.rstrip().endswith("classifier"), err
    session = Session(model_path, providers=["CPUExecutionProvider"])
    session.add_adapter("plain", plain)
    np.testing.assert_allclose(ort_run(tmp / "folded_plain.onnx", served["feeds"]), session.run(served["feeds"], adapter="plain")[0], atol=1e-5)


@pytest.mark.slow
def test_a_head_of_another_shape_or_half_a_head_is_refused_naming_the_expected_shape(served, tmp_path):
    model_path = served["result"].model_path
    _peft_adapter(_bert_cls(num_labels=5), tmp_path / "five", seed=4, task_type="SEQ_CLS")
    with pytest.raises(AdapterError, match=r"classifier.(weight|bias) has shape \(5,?.*expects \(3,?.*another number of labels"):
        peft_dir_to_onnx_adapter(tmp_path / "five", model_path, tmp_path / "five.onnx_adapter")
    assert not (tmp_path / "five.onnx_adapter").exists()

    good = read_onnx_adapter(served["result"].adapter_paths[0])
    session = Session(model_path, providers=["CPUExecutionProvider"])
    wide = dict(good.tensors, **{"classifier.weight": np.zeros((5, 32), np.float32)})
    write_onnx_adapter(tmp_path / "wide.onnx_adapter", OnnxAdapter(wide, fingerprint=good.fingerprint))
    with pytest.raises(AdapterError, match=r"classifier.weight has shape \(5, 32\) but served.onnx expects \(3, 32\)"):
        session.add_adapter("wide", tmp_path / "wide.onnx_adapter")
    half = {k: v for k, v in good.tensors.items() if k != "classifier.bias"}
    write_onnx_adapter(tmp_path / "half.onnx_adapter", OnnxAdapter(half, fingerprint=good.fingerprint))
    with pytest.raises(AdapterError, match=r"only some parameters of classifier.*lacks classifier.bias"):
        session.add_adapter("half", tmp_path / "half.onnx_adapter")
    assert session.adapters == []


def test_a_head_on_a_model_without_head_slots_is_refused_by_name(tmp_path):
    """A LoRA-only export has no head slots: a SEQ_CLS adapter's head is refused, naming how to get them."""
    model = _bert_cls()
    batch = inputs(2, 8)
    gm = lora_fx.capture(copy.deepcopy(model), kwargs=batch)
    lora_fx.apply(gm, LoraConfig(r=2, target_modules=TARGETS))
    result = lora_fx.export_onnx(gm, tmp_path / "plain.onnx", kwargs=batch, mode="adapters", peft_dir=False)
    _peft_adapter(model, tmp_path / "cls", seed=5, task_type="SEQ_CLS")
    with pytest.raises(AdapterError, match=r"classifier.(bias|weight).*no adapter slot.*modules_to_save.*mode='adapters'"):
        peft_dir_to_onnx_adapter(tmp_path / "cls", result.model_path, tmp_path / "cls.onnx_adapter")


@pytest.mark.slow
def test_bundled_minilm_classifier_serves_its_trained_head_as_peft_does(tmp_path):
    import peft
    import transformers as tf

    from lora_fx.hf import minilm_dir

    verbosity = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()  # "classifier newly initialized": the head this test trains
    try:
        torch.manual_seed(0)
        model = tf.BertForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=2).eval()
    finally:
        tf.logging.set_verbosity(verbosity)
    batch = inputs(2, 8, pad=3)
    base = _logits(model, batch)
    gm = lora_fx.capture(copy.deepcopy(model), kwargs=batch)
    lora_fx.apply(gm, LoraConfig(r=4, task_type="SEQ_CLS", target_modules=TARGETS))
    _perturb(gm.named_parameters(), seed=6)
    want = _logits(gm, batch)
    assert np.abs(want - base).max() > 1e-1
    result = lora_fx.export_onnx(gm, tmp_path / "minilm.onnx", kwargs=batch, mode="adapters")
    feeds = {k: v.numpy() for k, v in batch.items()}
    np.testing.assert_allclose(ort_run(result.model_path, feeds), base, atol=1e-5)
    np.testing.assert_allclose(ort_run(result.model_path, feeds, adapter=result.adapter_paths[0]), want, atol=1e-4)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), result.peft_dirs[0]).eval()
    np.testing.assert_allclose(_logits(pm, batch), want, atol=1e-4)


@pytest.mark.slow
def test_llama_score_head_without_bias_read_at_every_position_is_a_slot_too(tmp_path):
    """LlamaForSequenceClassification: ``score`` has no bias and runs on [batch, seq, hidden] before the last
    token is picked (a MatMul with its own Transpose, not BERT's Gemm)."""
    import peft
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForSequenceClassification(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=3, pad_token_id=0)).eval()
    batch = inputs(2, 8)
    base = _logits(model, batch)
    gm = lora_fx.capture(copy.deepcopy(model), kwargs=batch)
    lora_fx.apply(gm, LoraConfig(r=2, task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if ".lora_B." in name or name == "score.weight":
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    want = _logits(gm, batch)
    result = lora_fx.export_onnx(gm, tmp_path / "llama.onnx", kwargs=batch, mode="adapters")
    assert "score.weight" in read_onnx_adapter(result.adapter_paths[0]).tensors
    feeds = {k: v.numpy() for k, v in batch.items()}
    np.testing.assert_allclose(ort_run(result.model_path, feeds), base, atol=1e-5)
    np.testing.assert_allclose(ort_run(result.model_path, feeds, adapter=result.adapter_paths[0]), want, atol=1e-4)
    assert np.abs(want - base).max() > 1e-1
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), result.peft_dirs[0]).eval()
    np.testing.assert_allclose(_logits(pm, batch), want, atol=1e-5)

    # A LoRA-only export of the same base stores score.weight as the optimizer folded its Transpose ([hidden, labels]):
    # its adapter still runs on the head-slot model, with the base head.
    twin = _lora_only_export(model, batch, tmp_path / "twin", ["q_proj", "v_proj"], seed=8)
    ref = ort_run(twin.model_path, feeds, adapter=twin.adapter_paths[0])
    assert twin.fingerprint != result.fingerprint and np.abs(ref - base).max() > 1e-3
    session = Session(result.model_path, providers=["CPUExecutionProvider"])
    assert session.add_adapter("twin", twin.adapter_paths[0]).default_sites == ["score"]
    np.testing.assert_allclose(session.run(feeds, adapter="twin")[0], ref, atol=1e-5)
    np.testing.assert_allclose(ort_run(result.model_path, feeds, adapter=twin.adapter_paths[0]), ref, atol=1e-5)


# ---- adapters of an export of the same base without head slots ---------------------------------------------------
def _lora_only_export(model, batch, directory, targets, seed: int, head=None):
    """``model`` (or a copy whose head weight is ``head``) with LoRA only, lora_B perturbed, exported with slots: its
    head is a plain base weight there, counted in its fingerprint."""
    model = copy.deepcopy(model)
    if head is not None:
        with torch.no_grad():
            model.apply(head)
    gm = lora_fx.capture(model, kwargs=batch)
    lora_fx.apply(gm, LoraConfig(r=2, target_modules=targets))
    _perturb(((n, p) for n, p in gm.named_parameters() if ".lora_B." in n), seed)  # the head stays the base's
    result = lora_fx.export_onnx(gm, directory / "lora_only.onnx", kwargs=batch, mode="adapters", peft_dir=False)
    result.logits = _logits(gm, batch)
    return result


@pytest.fixture(scope="module")
def lora_only(served):
    """The served model's base exported with LoRA only (no modules_to_save), a trained adapter beside it."""
    return _lora_only_export(served["model"], served["batch"], served["tmp"], TARGETS, seed=8)


@pytest.mark.slow
def test_a_lora_only_adapter_of_the_same_base_runs_on_the_head_slot_model_with_the_base_head(served, lora_only, tmp_path, capsys):
    from lora_fx.cli import main

    model_path, feeds = served["result"].model_path, served["feeds"]
    adapter = lora_only.adapter_paths[0]
    assert lora_only.fingerprint != served["result"].fingerprint  # the head counts as a base weight there
    assert not any(k.startswith("classifier.") for k in read_onnx_adapter(adapter).tensors)
    # The reference: the LoRA-only model with its adapter, in plain onnxruntime (and in torch, to the export's tolerance).
    ref = ort_run(lora_only.model_path, feeds, adapter=adapter)
    np.testing.assert_allclose(ref, lora_only.logits, atol=1e-4)
    # The base head is small (std 0.02), so LoRA alone moves the logits little, yet 100x the tolerance below.
    assert np.abs(ref - served["base"]).max() > 1e-3 and np.abs(ref - served["want"]).max() > 1e-1

    session = Session(model_path, providers=["CPUExecutionProvider"])
    assert session.add_adapter("lora_only", adapter).default_sites == ["classifier"]
    session.add_adapter("ours", served["result"].adapter_paths[0])
    for name, want in [("lora_only", ref), ("ours", served["want"]), (None, served["base"]), ("lora_only", ref)]:
        np.testing.assert_allclose(session.run(feeds, adapter=name)[0], want, atol=1e-5 if name != "ours" else 1e-4,
                                   err_msg=str(name))
    # Plain onnxruntime runs the file on the head-slot model as it is.
    np.testing.assert_allclose(ort_run(model_path, feeds, adapter=adapter), ref, atol=1e-5)
    # Without its sidecar only the 31-bit fingerprint in the file's model_version is left: it is recognised too.
    alone = shutil.copy(adapter, tmp_path / "alone.onnx_adapter")
    assert read_onnx_adapter(alone).fingerprint is None
    session.add_adapter("alone", alone)
    np.testing.assert_allclose(session.run(feeds, adapter="alone")[0], ref, atol=1e-5)
    # lora-fx export --merge folds it with the base head.
    capsys.readouterr()
    assert main(["export", str(model_path), "-o", str(tmp_path / "folded.onnx"), "--merge", "--adapter", str(adapter), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["default_sites"] == ["classifier"]
    np.testing.assert_allclose(ort_run(tmp_path / "folded.onnx", feeds), ref, atol=1e-5)
    # The merged model has no head slots, so nothing of theirs stays in its metadata.
    assert not {p.key for p in onnx.load(str(tmp_path / "folded.onnx"), load_external_data=False).metadata_props} & {
        SAVED_KEY, HEADS_AS_BASE_KEY}


@pytest.mark.slow
def test_a_lora_only_adapter_of_a_base_with_another_head_is_refused(served, tmp_path):
    """The head slots' defaults are part of what the LoRA-only fingerprint vouches for: with another base head the
    adapter would run beside a head it was not trained with."""

    def other_head(module):
        if isinstance(module, torch.nn.Linear) and module.out_features == 3:
            module.weight.add_(0.25)

    other = _lora_only_export(served["model"], served["batch"], tmp_path, TARGETS, seed=9, head=other_head)
    session = Session(served["result"].model_path, providers=["CPUExecutionProvider"])
    with pytest.raises(AdapterError, match=r"different base model than served.onnx \(base-weight fingerprint"):
        session.add_adapter("other", other.adapter_paths[0])
    alone = shutil.copy(other.adapter_paths[0], tmp_path / "alone.onnx_adapter")
    with pytest.raises(AdapterError, match=r"different base model than served.onnx \(fingerprint \d+"):
        session.add_adapter("other", alone)
    assert session.adapters == []


@pytest.mark.slow
def test_a_head_slot_model_written_before_takes_its_adapters_and_names_the_way_out_for_lora_only_ones(served, lora_only, tmp_path):
    import onnx_ir as ir

    model = ir.load(str(served["result"].model_path))
    assert model_fingerprints(model.metadata_props) == (served["result"].fingerprint, *json.loads(
        model.metadata_props[HEADS_AS_BASE_KEY])["heads_as_base"])
    del model.metadata_props[HEADS_AS_BASE_KEY]  # as lora_fx wrote head-slot models before
    lora_fx.save(model, tmp_path / "old.onnx")
    session = Session(tmp_path / "old.onnx", providers=["CPUExecutionProvider"])
    session.add_adapter("ours", served["result"].adapter_paths[0])
    np.testing.assert_allclose(session.run(served["feeds"], adapter="ours")[0], served["want"], atol=1e-4)
    with pytest.raises(AdapterError, match=r"different base model than old.onnx.*same base without modules_to_save, "
                                           r"export old.onnx again.*peft_dir_to_onnx_adapter"):
        session.add_adapter("lora_only", lora_only.adapter_paths[0])

    # Recorded beside another fingerprint (the weights were changed after the export), the list vouches for nothing.
    model.metadata_props[HEADS_AS_BASE_KEY] = json.dumps({"base_fingerprint": "0" * 64, "heads_as_base": [lora_only.fingerprint]})
    assert model_fingerprints(model.metadata_props) == (served["result"].fingerprint,)
    model.metadata_props[HEADS_AS_BASE_KEY] = "[1, 2"
    lora_fx.save(model, tmp_path / "bad.onnx")
    with pytest.raises(ModelLoadError, match=f"{HEADS_AS_BASE_KEY} is not the JSON lora_fx writes.*export it again"):
        Session(tmp_path / "bad.onnx", providers=["CPUExecutionProvider"])


@pytest.mark.slow
def test_a_head_onto_the_lora_only_model_is_refused_as_a_missing_head_slot_not_another_base(served, lora_only, capsys):
    """The reverse: the head-slot model's adapter carries the trained head, which a model without head slots cannot
    take; their fingerprints differ too, and the message must say why and where the adapter runs."""
    from lora_fx.cli import main

    ours = served["result"].adapter_paths[0]
    session = Session(lora_only.model_path, providers=["CPUExecutionProvider"])
    want = r"classifier.bias, classifier.weight are parameters of classifier, trained in full \(modules_to_save\), " \
           r"and have no adapter slot in lora_only.onnx.*fingerprints differ too.*mode='adapters'"
    with pytest.raises(AdapterError, match=want) as info:
        session.add_adapter("ours", ours)
    assert "different base" not in str(info.value)
    capsys.readouterr()
    assert main(["export", str(lora_only.model_path), "-o", str(served["tmp"] / "no.onnx"), "--merge", "--adapter", str(ours)]) != 0
    assert "have no adapter slot in lora_only.onnx" in capsys.readouterr().err
    assert not (served["tmp"] / "no.onnx").exists()


@pytest.mark.slow
def test_onnx_front_end_a_lora_only_adapter_runs_on_the_head_slot_export_of_the_same_file(tmp_path):
    """A user's ONNX classifier (Llama, dynamo-optimized: the head a transposed, unnamed constant) rewritten twice,
    with the head trained in full and with LoRA only, each exported with slots (``lora-fx export --adapters``)."""
    from lora_fx.commands.export import export_file
    from tests.lora_fx.test_onnx_modules_to_save import ARCHS
    from tests.shared_exports import user_export

    build, _, _, targets = ARCHS["llama"]
    user = user_export(build, "dynamo")  # test_onnx_modules_to_save's file of the same classifier
    feeds = {k: v.numpy() for k, v in inputs(2, 8, seed=7).items()}
    out = {}
    for name, task in (("cls", "SEQ_CLS"), ("plain", None)):
        onnx_model = lora_fx.load(user)
        torch.manual_seed(5)
        lora_fx.apply(onnx_model, LoraConfig(r=2, task_type=task, target_modules=targets, init_lora_weights=False))
        lora_fx.save(onnx_model, tmp_path / f"{name}.onnx")
        out[name] = export_file(tmp_path / f"{name}.onnx", tmp_path / f"{name}_served.onnx", merge=False)
    assert out["plain"]["fingerprint"] != out["cls"]["fingerprint"]
    adapter = out["plain"]["adapters"][0]
    ref = ort_run(tmp_path / "plain.onnx", feeds)  # the LoRA model itself, before export
    np.testing.assert_allclose(ort_run(tmp_path / "plain_served.onnx", feeds, adapter=adapter), ref, atol=1e-5)
    assert np.abs(ref - ort_run(user, feeds)).max() > 1e-2
    session = Session(tmp_path / "cls_served.onnx", providers=["CPUExecutionProvider"])
    assert session.add_adapter("plain", adapter).default_sites == ["score"]
    np.testing.assert_allclose(session.run(feeds, adapter="plain")[0], ref, atol=1e-5)
