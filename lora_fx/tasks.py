"""The shipped demo task: tense classification of sentences with a sentence-embedding encoder.

A sentence is classified by cosine similarity between its mean-pooled embedding and the embeddings
of three label prompts, computed by the same (adapted) model, as sentence-transformers does. No
classification head is trained: only the adapters move.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch

from lora_fx.errors import ConfigError

LABEL_PROMPTS = ["This happened in the past.", "This is happening now.", "This will happen in the future."]
TEMPERATURE = 20.0  # sentence-transformers' usual scale for cosine logits


def load_rows(split: str, path: str | Path | None = None) -> list[dict]:
    """Rows ``{"text", "label", "split"}`` of a JSONL file (default: the shipped tense set)."""
    if path is None:
        text = resources.files("lora_fx.data").joinpath("tense.jsonl").read_text()
    else:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:  # missing, a folder, not text
            raise ConfigError(f"cannot read the data file {path} ({exc}); pass a JSONL file of "
                              '{"text", "label", "split"} rows') from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            _ = row["text"], int(row["label"])
            if not isinstance(row["text"], str):  # the tokenizer would fail on it, inside a training process
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ConfigError(f"{path or 'tense.jsonl'} line {i}: expected a JSON object with 'text' and an integer 'label' (and 'split')") from None
        rows.append(row)
    return [r for r in rows if r.get("split", "train") == split]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@dataclass
class TenseTask:
    """Tokenized batches, the loss and the accuracy metric of the tense task."""

    tokenizer: Any
    max_length: int = 32
    batch_size: int = 16
    data: str | None = None  # a JSONL file of {"text", "label", "split"}; None = the shipped tense set
    label_prompts: tuple[str, ...] = tuple(LABEL_PROMPTS)

    @classmethod
    def from_model_dir(cls, directory: Any, **kw: Any) -> "TenseTask":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(directory), local_files_only=True), **kw)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts + list(self.label_prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "token_type_ids": enc["token_type_ids"]}

    def batches(self, split: str = "train", seed: int = 0) -> list[dict[str, torch.Tensor]]:
        rows = load_rows(split, self.data)
        if not rows:
            raise ConfigError(f"{self.data or 'tense.jsonl'} has no rows with split={split!r}")
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(rows), generator=gen).tolist()
        out = []
        for i in range(0, len(order), self.batch_size):
            chunk = [rows[j] for j in order[i : i + self.batch_size]]
            batch = self.encode([r["text"] for r in chunk])
            batch["labels"] = torch.tensor([r["label"] for r in chunk])
            out.append(batch)
        return out

    def logits(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        emb = torch.nn.functional.normalize(mean_pool(hidden, mask), dim=-1)
        n = len(self.label_prompts)
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
        return model_inputs(self.batches("train")[0])


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
