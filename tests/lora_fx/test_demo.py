"""The demo's promise: on the bundled MiniLM, LoRA training beats the zero-shot accuracy."""

import json

import pytest

from lora_fx.demo import run_demo
from lora_fx.tasks import load_rows


def test_dataset_splits_do_not_share_verbs():
    from lora_fx.data.build_tense import N_TRAIN_VERBS, VERBS

    held_out = {v[0] for v in VERBS[N_TRAIN_VERBS:]} | {v[2] for v in VERBS[N_TRAIN_VERBS:]}
    train_words = {w.strip(".") for r in load_rows("train") for w in r["text"].split()}
    assert not held_out & train_words
    test = load_rows("test")
    assert len(test) == 180 and len(load_rows("train")) == 675
    assert {r["label"] for r in test} == {0, 1, 2}


@pytest.mark.slow
def test_quick_demo_improves_accuracy_and_saves_a_peft_adapter(tmp_path):
    summary = run_demo(tmp_path, steps=12, quick=True)
    (lora,) = summary["methods"]
    assert lora["accuracy_after"] > lora["accuracy_before"] + 0.1
    assert lora["losses"][-1] < lora["losses"][0]
    cfg = json.loads((tmp_path / "lora_adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    assert (tmp_path / "lora_adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["methods"][0]["method"] == "lora"
