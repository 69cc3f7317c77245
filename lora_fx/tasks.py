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


# A model folder's tokenizer is one of these: a fast tokenizer's tokenizer.json, or a slow tokenizer's vocabulary
# (WordPiece, BPE, SentencePiece). tokenizer_config.json alone has none: transformers then builds a tokenizer with
# an empty vocabulary, and every word becomes [UNK].
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "*.model (SentencePiece: spiece.model, tokenizer.model)")
_TOKENIZER_GLOBS = ("tokenizer.json", "vocab.*", "*.model", "*.spm")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def check_tokenizer_files(directory: str | Path) -> None:
    """Refuse a model folder without a tokenizer vocabulary (``model.save_pretrained`` alone writes none)."""
    directory = Path(directory)
    if any(p.is_file() for pattern in _TOKENIZER_GLOBS for p in directory.glob(pattern)):
        return
    present = sorted(p.name for p in directory.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))) if directory.is_dir() else []
    raise ConfigError(
        f"{directory} has no tokenizer files: none of {', '.join(TOKENIZER_FILES)}"
        + (f" (only {', '.join(present)}, which holds no vocabulary)" if present else "")
        + "; transformers would build a tokenizer with an empty vocabulary and every word would become [UNK]. Save the "
        f"model's tokenizer beside it: tokenizer.save_pretrained({str(directory)!r})"
    )


def _check_vocabulary(directory: str | Path, tokenizer: Any) -> None:
    """Refuse a tokenizer that reads the label prompts as unknown tokens only (an empty or foreign vocabulary)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    special = set(getattr(tokenizer, "all_special_ids", ()) or ()) - {unk}
    ids = [i for text in LABEL_PROMPTS for i in tokenizer(text)["input_ids"] if i not in special]
    if ids and all(i == unk for i in ids):
        raise ConfigError(
            f"the tokenizer in {directory} reads every word as {tokenizer.unk_token} (its vocabulary has "
            f"{len(tokenizer)} tokens): it is not the model's tokenizer. Save the model's tokenizer beside it: "
            f"tokenizer.save_pretrained({str(directory)!r})"
        )


def check_label_prompts(prompts: Any) -> None:
    """``CompareConfig.label_prompts``: None (the tense prompts) or one distinct, non-blank prompt per label, two or more.

    The task labels a text by its nearest prompt, so an empty prompt ("a||c" on the command line) and two equal
    prompts ("past|past|future": the second label could never be told from the first) ran to completion as if
    nothing were wrong. A string would be read as one prompt per character.
    """
    if prompts is None:
        return
    where = "(CLI: --label-prompts 'P0|P1|...')"
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ConfigError(f"label_prompts must be a list of prompts, one per label {where}, or None for the tense prompts; "
                          f"got {type(prompts).__name__}")
    if len(prompts) < 2:
        raise ConfigError(f"label prompts {list(prompts)!r}: the task labels each text by its nearest prompt, so it needs one "
                          f"prompt per label, two or more {where}")
    seen: dict[str, int] = {}
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ConfigError(f"label prompt {i} is {type(prompt).__name__} ({prompt!r}), not a string; give one text per label")
        if not prompt.strip():
            raise ConfigError(f"label prompt {i} of {list(prompts)!r} is {'empty' if not prompt else 'only whitespace'}: "
                              f"label {i} would be matched against no text; give every label a prompt {where}, with no "
                              "empty part ('a||c' or a '|' at either end)")
        first = seen.setdefault(prompt.strip(), i)
        if first != i:
            raise ConfigError(f"label prompts {first} and {i} are the same ({prompt.strip()!r}): labels {first} and {i} would be "
                              f"indistinguishable; give each label its own prompt {where}")


@dataclass
class TenseTask:
    """Tokenized batches, the loss and the accuracy metric of the tense task."""

    tokenizer: Any
    max_length: int = 32
    batch_size: int = 16
    data: str | None = None  # a JSONL file of {"text", "label", "split"}; None = the shipped tense set
    label_prompts: tuple[str, ...] = tuple(LABEL_PROMPTS)
    # The inputs the model's forward names (hf.forward_inputs); None: every text input the tokenizer returns.
    input_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_label_prompts(self.label_prompts)

    @classmethod
    def from_model_dir(cls, directory: Any, **kw: Any) -> "TenseTask":
        """The task over the model folder's own tokenizer, feeding the model only the inputs its forward takes
        (DistilBERT and RoBERTa take no token_type_ids, whatever their tokenizer returns)."""
        from transformers import AutoTokenizer

        from lora_fx.hf import forward_inputs, model_class

        check_tokenizer_files(directory)
        arch, model_cls = model_class(directory)
        names = tuple(forward_inputs(model_cls))
        missing = [k for k in ("input_ids", "attention_mask") if k not in names]
        if missing:
            raise ConfigError(f"{arch}'s forward takes no {' or '.join(missing)}: the tense task feeds token ids and "
                              "pools the embeddings over the attention mask; pass a text encoder (BERT, MiniLM, RoBERTa)")
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        _check_vocabulary(directory, tokenizer)
        return cls(tokenizer, input_names=names, **kw)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts + list(self.label_prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        wanted = self.input_names if self.input_names is not None else TEXT_INPUTS
        # Only what the model takes (a key it does not name fails forward() or torch.export's dynamic shapes), in
        # the order its forward names them, not the tokenizer's: exports name their inputs in this order.
        return {k: enc[k] for k in wanted if k in enc}

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
    """A batch's model inputs: everything but the labels (``TenseTask.encode`` keeps only what the model takes)."""
    return {k: v for k, v in batch.items() if k != "labels"}
