"""Real models for tests: the bundled all-MiniLM-L6-v2 and tiny random GPT-2, BERT and Llama (GQA); Falcon, GPT-J, OPT and RoBERTa where asked.

Everything is built from ``transformers`` configs or the bundled folder; nothing downloads. Helpers
compare a lora_fx GraphModule with the same model wrapped by PEFT, using the same A and B tensors.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 96
TINY = ("bert", "gpt2", "llama")
ALL = ("minilm",) + TINY


def build(name: str) -> torch.nn.Module:
    """A fresh, seeded model in eval mode."""
    import transformers as tf

    torch.manual_seed(0)
    if name == "minilm":
        from lora_fx.hf import load_hf_model, minilm_dir

        return load_hf_model(minilm_dir()).eval()
    if name == "bert":
        cfg = tf.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64,
        )
        return tf.BertModel(cfg).eval()
    if name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return tf.GPT2LMHeadModel(cfg).eval()
    if name == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
        return tf.LlamaForCausalLM(cfg).eval()
    if name == "gptj":  # rotary sin/cos gathered from a precomputed table
        cfg = tf.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4)
        return tf.GPTJForCausalLM(cfg).eval()
    if name == "opt":  # positions: the cumsum of the attention mask
        cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, word_embed_proj_dim=32)
        return tf.OPTForCausalLM(cfg).eval()
    if name == "roberta":  # positions: the cumsum of the non-padding tokens
        cfg = tf.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=70)
        return tf.RobertaModel(cfg).eval()
    if name == "falcon":  # FalconLinear computes x @ W.T + b, not F.linear; multi-query attention
        cfg = tf.FalconConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            new_decoder_architecture=False, multi_query=True, bias=True,
        )
        return tf.FalconForCausalLM(cfg).eval()
    raise ValueError(name)


def inputs(batch: int = 2, seq: int = 8, *, pad: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask; the last row has ``pad`` padded positions at its end."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        mask[-1, seq - pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def main_output(out: Any) -> torch.Tensor:
    """The first tensor of a model output (last_hidden_state or logits)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "keys"):
        for key in ("logits", "last_hidden_state"):
            if key in out and out[key] is not None:
                return out[key]
    return out[0]


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: a scale-free error over the whole tensor."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def peft_wrap(model: torch.nn.Module, **config: Any) -> torch.nn.Module:
    """``get_peft_model`` on a deep copy of ``model`` with a peft.LoraConfig built from ``config``."""
    import peft

    return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config)).eval()


def peft_lora_modules(peft_model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules PEFT actually wrapped, by their name in the base model."""
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): m
        for name, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})) > 0
    }


def copy_ours_into_peft(gm: torch.fx.GraphModule, peft_model: torch.nn.Module) -> None:
    """Copy every (A, B) of our GraphModule into the PEFT model's ``default`` adapter."""
    from lora_fx.passes.fx.capture import meta

    wrapped = peft_lora_modules(peft_model)
    ours = meta(gm)["lora_sites"]
    assert set(ours) == set(wrapped), (sorted(ours), sorted(wrapped))
    with torch.no_grad():
        for site in ours:
            mod = gm.get_submodule(site)
            wrapped[site].lora_A["default"].weight.copy_(mod.lora_A.weight)
            wrapped[site].lora_B["default"].weight.copy_(mod.lora_B.weight)


def run(model: Callable[..., Any], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(**batch))
