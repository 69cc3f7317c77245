"""LoRA on all linear layers of more transformers architectures, on both front ends, against PEFT.

Each tiny model is captured (FX) and exported by the dynamo exporter (ONNX), rewritten with random (non-zero)
A and B on ``all-linear``, saved as a PEFT directory, and loaded with ``PeftModel.from_pretrained``: the targeted
modules must be those PEFT's own ``all-linear`` picks, and the outputs PEFT's. The architectures are those the
other tests do not build (tests/models.py: BERT, GPT-2, Llama, GPT-J, OPT, RoBERTa, Falcon): what they add is the
site detection in their graphs (rotary forms, fused or split qkv, parallel attention, relative positions).
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch

import lora_fx
from tests.exported import ort_run
from tests.models import VOCAB


def _build(name: str) -> tuple[torch.nn.Module, str]:
    """A seeded tiny model in eval mode and its PEFT task type."""
    import transformers as tf

    small = dict(num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    decoder = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, **small)
    encoder = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=70, num_labels=3)
    builders = {
        "qwen2": lambda: (tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **decoder)), "CAUSAL_LM"),
        "mistral": lambda: (tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=2, **decoder)), "CAUSAL_LM"),
        # Phi-3: qkv_proj and gate_up_proj, one linear each for what Llama splits.
        "phi3": lambda: (tf.Phi3ForCausalLM(tf.Phi3Config(num_key_value_heads=4, pad_token_id=0, **decoder)), "CAUSAL_LM"),
        "gpt_neox": lambda: (tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**decoder)), "CAUSAL_LM"),  # parallel residual
        "gemma": lambda: (tf.GemmaForCausalLM(tf.GemmaConfig(num_key_value_heads=1, head_dim=8, **decoder)), "CAUSAL_LM"),
        "stablelm": lambda: (tf.StableLmForCausalLM(tf.StableLmConfig(num_key_value_heads=4, **decoder)), "CAUSAL_LM"),
        "bloom": lambda: (tf.BloomForCausalLM(tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)), "CAUSAL_LM"),
        "electra": lambda: (tf.ElectraForSequenceClassification(tf.ElectraConfig(embedding_size=16, **encoder)), "SEQ_CLS"),
        "mpnet": lambda: (tf.MPNetForSequenceClassification(tf.MPNetConfig(**encoder)), "SEQ_CLS"),  # relative position bias
        "deberta_v2": lambda: (tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(**encoder)), "SEQ_CLS"),
        "distilbert": lambda: (tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64, num_labels=3)), "SEQ_CLS"),
    }
    torch.manual_seed(0)
    model, task = builders[name]()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.eval(), task


ARCHS = ["qwen2", "mistral", "phi3", "gpt_neox", "gemma", "stablelm", "bloom", "electra", "mpnet", "deberta_v2", "distilbert"]
# The FX front end finds nn.Linear modules whatever the graph around them; it runs on the architectures whose linear
# layers or heads differ (fused qkv and gate_up, parallel residual, ALiBi, relative positions, a two-layer head).
FX_ARCHS = {"phi3", "gpt_neox", "gemma", "bloom", "deberta_v2", "distilbert"}
CASES = [(arch, "onnx") for arch in ARCHS] + [(arch, "fx") for arch in ARCHS if arch in FX_ARCHS]


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 8), generator=gen)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


def _peft_all_linear(model: torch.nn.Module, task: str, exclude: list[str] | None) -> set[str]:
    """The module names PEFT's own all-linear puts LoRA on (its config after injection lists them)."""
    import peft

    config = peft.LoraConfig(r=2, target_modules="all-linear", task_type=task, exclude_modules=exclude)
    pm = peft.get_peft_model(copy.deepcopy(model), config)
    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A") and not n.endswith("lora_A")}


@pytest.mark.slow
@pytest.mark.parametrize("arch,front_end", CASES)
def test_all_linear_lora_targets_what_peft_targets_and_gives_peft_outputs(arch, front_end, tmp_path):
    import peft

    eager, task = _build(arch)
    batch = _batch()
    if front_end == "fx":
        model = lora_fx.capture(eager, kwargs=batch)
    else:
        path = tmp_path / "base.onnx"
        dims = {k: {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")} for k in batch}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(eager, (), str(path), kwargs=batch, dynamo=True, opset_version=18, input_names=list(batch),
                              dynamic_shapes=dims, verbose=False)
        model = lora_fx.load(path)
    # DistilBERT's pre_classifier is a head PEFT trains in full under SEQ_CLS ("classifier" as a name ending), so
    # all-linear must leave it out (test_modules_to_save covers the refusal otherwise).
    exclude = ["pre_classifier"] if arch == "distilbert" else None
    torch.manual_seed(1)
    config = lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=exclude,
                                init_lora_weights=False, task_type=task)
    model = lora_fx.apply(model, config)
    lora_fx.save_adapter(model, tmp_path / "adapter")
    ours_targets = set(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"])
    assert ours_targets == _peft_all_linear(eager, task, exclude)

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(eager), tmp_path / "adapter").eval()
    with torch.no_grad():
        want = pm(**batch).logits.numpy()
        base = eager(**batch).logits.numpy()
    if front_end == "fx":
        with torch.no_grad():
            out = model(**batch)
        got = (out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out).numpy()
    else:
        lora_fx.save(model, tmp_path / "lora.onnx")
        got = ort_run(tmp_path / "lora.onnx", {k: v.numpy() for k, v in batch.items()})
    if want.ndim == 3:
        # Per-token logits: a fully masked (left-padded) position is undefined, and the exporters differ there.
        keep = batch["attention_mask"].numpy().astype(bool)
        got, want, base = got[keep], want[keep], base[keep]
    scale = float(np.abs(want).max())
    assert np.abs(want - base).max() > 0.05 * scale  # the adapter moves the output
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
