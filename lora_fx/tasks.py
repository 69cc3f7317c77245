"""The shipped demo task: tense classification of sentences with a sentence-embedding encoder.

A sentence is classified by cosine similarity between its mean-pooled embedding and the embeddings
of three label prompts, computed by the same (adapted) model, as sentence-transformers does. No
classification head is trained: only the adapters move.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Iterator

import torch

LABEL_PROMPTS = ["This happened in the past.", "This is happening now.", "This will happen in the future."]
TEMPERATURE = 20.0  # sentence-transformers' usual scale for cosine logits


def load_rows(split: str) -> list[dict]:
    text = resources.files("lora_fx.data").joinpath("tense.jsonl").read_text()
    return [r for r in map(json.loads, text.splitlines()) if r["split"] == split]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@dataclass
class TenseTask:
    """Tokenized batches, the loss and the accuracy metric of the tense task."""

    tokenizer: Any
    max_length: int = 32
    batch_size: int = 16

    @classmethod
    def from_model_dir(cls, directory: Any, **kw: Any) -> "TenseTask":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(directory), local_files_only=True), **kw)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts + LABEL_PROMPTS, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "token_type_ids": enc["token_type_ids"]}

    def batches(self, split: str = "train", seed: int = 0) -> list[dict[str, torch.Tensor]]:
        rows = load_rows(split)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(rows), generator=gen).tolist()
        out = []
        for i in range(0, len(order), self.batch_size):
            chunk = [rows[j] for j in order[i : i + self.batch_size]]
            batch = self.encode([r["text"] for r in chunk])
            batch["labels"] = torch.tensor([r["label"] for r in chunk])
            out.append(batch)
        return out

    @staticmethod
    def logits(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        emb = torch.nn.functional.normalize(mean_pool(hidden, mask), dim=-1)
        n = len(LABEL_PROMPTS)
        return TEMPERATURE * emb[:-n] @ emb[-n:].T

    def loss_fn(self, out: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = out["last_hidden_state"] if not isinstance(out, torch.Tensor) else out
        return torch.nn.functional.cross_entropy(self.logits(hidden, batch["attention_mask"]), batch["labels"])

    def accuracy(self, forward: Callable[[dict[str, torch.Tensor]], torch.Tensor], split: str = "test") -> float:
        """``forward(batch) -> last_hidden_state``; returns the fraction classified correctly."""
        correct = total = 0
        with torch.no_grad():
            for batch in self.batches(split):
                pred = self.logits(forward(batch), batch["attention_mask"]).argmax(-1)
                correct += int((pred == batch["labels"]).sum())
                total += len(batch["labels"])
        return correct / total

    def example(self) -> dict[str, torch.Tensor]:
        b = self.batches("train")[0]
        return {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def iter_model_inputs(batches: list[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    for b in batches:
        yield {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
