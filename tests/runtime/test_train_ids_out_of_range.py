"""lora_fx.train on a captured graph names ids past an embedding table (the input, the table, its size) instead of
torch's bare ``IndexError: index out of range in self``, before any update; a good step pays nothing for it (the
tables are looked at only once torch has refused the lookup). The ONNX path says the same from its Gather op."""

from __future__ import annotations

import pytest
import torch

import lora_fx
from lora_fx.errors import ConfigError
from lora_fx.runtime.train import cross_entropy_on
from tests.models import VOCAB
from tests.runtime.test_train import _counting_batches

LOSS = cross_entropy_on("logits")
TARGETS = {"bert": ["query"], "gpt2": ["c_attn"], "llama": ["q_proj"]}
# The word embedding each model's input_ids index (GPT-2 ties it to lm_head; the embedding's name is the one shown).
TABLES = {"bert": "embeddings.word_embeddings.weight", "gpt2": "transformer.wte.weight", "llama": "model.embed_tokens.weight"}


def _adapted(zoo, name: str) -> torch.fx.GraphModule:
    gm = zoo.gm(name)  # first: the first call builds the model, drawing from the generator seeded below
    torch.manual_seed(0)  # init_lora_weights=False draws B too: the same adapters each time
    return lora_fx.apply(gm, lora_fx.LoraConfig(r=2, target_modules=TARGETS[name], init_lora_weights=False))


def _adapters(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _loss(name: str):
    # BERT's tiny model has no LM head: its hidden states stand in for logits (any loss reaching the adapters will do).
    return LOSS if name != "bert" else (lambda out, batch: out[0].pow(2).mean())


@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("shift,bad", [(VOCAB, "above"), (-VOCAB, "below")])
def test_ids_outside_the_vocabulary_name_the_input_and_the_table(zoo, name: str, shift: int, bad: str) -> None:
    gm = _adapted(zoo, name)
    good, second = _counting_batches(2)
    ids = second["input_ids"] + shift  # every id outside 0..VOCAB-1: above it, or negative
    lo, hi = int(ids.min()), int(ids.max())
    worst = hi if bad == "above" else lo
    before = _adapters(gm)
    ran: list[int] = []
    match = (rf"^batch 2: index out of range: 'input_ids' holds the id {worst} \(its values run from {lo} to {hi}\), "
             rf"but it indexes the embedding {TABLES[name]} of {VOCAB} rows \(a vocabulary of {VOCAB}\): ids must be in "
             rf"0\.\.{VOCAB - 1}; tokenize the data with the model's own tokenizer")
    with pytest.raises(ConfigError, match=match) as info:
        lora_fx.train(gm, [good, dict(second, input_ids=ids)], _loss(name), steps=2, progress=False,
                      on_step=lambda s, v: ran.append(s))
    assert info.value.__cause__ is None and info.value.__suppress_context__  # one message, not torch's traceback
    assert ran == [0]  # the good first batch trained; the bad one stopped before its update
    after = _adapters(gm)
    assert any(not torch.equal(after[n], before[n]) for n in before)
    # The adapters are those of step 1: the same run on the good batch alone gives them.
    reference = _adapted(zoo, name)
    lora_fx.train(reference, [good], _loss(name), steps=1, progress=False)
    assert all(torch.equal(p, after[n]) for n, p in _adapters(reference).items())


class _ShiftedIds(torch.nn.Module):
    """Ids shifted before the lookup: the table's input is computed, not a model input."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.table(ids + 1))


def test_ids_computed_before_the_lookup_list_the_tables_and_the_inputs_ranges() -> None:
    example = torch.zeros(2, 5, dtype=torch.long)
    gm = lora_fx.apply(lora_fx.capture(_ShiftedIds(), args=(example,)), lora_fx.LoraConfig(r=2, target_modules=["head"]))
    ok = lora_fx.train(gm, [{"ids": torch.full((2, 5), 8)}], lambda out, b: out.pow(2).mean(), steps=1, progress=False)
    assert ok.steps == 1  # 8 + 1 is the last row: no false alarm at the edge
    with pytest.raises(ConfigError, match=r"^batch 1: index out of range in the model's forward \(torch: 'index out of "
                                          r"range in self'\): .* The model's embedding tables: table.weight: 10 rows\. "
                                          r"The batch's integer inputs: ids 0\.\.9; ids must be below the size of their "
                                          r"table"):
        lora_fx.train(gm, [{"ids": torch.arange(10).reshape(2, 5)}], lambda out, b: out.pow(2).mean(), steps=1,
                      progress=False)


def test_an_index_error_of_the_loss_is_not_taken_for_the_model_s() -> None:
    # Only the forward's out-of-range lookup is translated; loss_fn's own IndexError reaches the caller as it is.
    example = torch.zeros(2, 5, dtype=torch.long)
    gm = lora_fx.apply(lora_fx.capture(_ShiftedIds(), args=(example,)), lora_fx.LoraConfig(r=2, target_modules=["head"]))

    def loss(out, batch):
        return out[0, 0, torch.tensor(7)]  # dim 2 has 3 entries

    with pytest.raises(IndexError, match="out of bounds"):
        lora_fx.train(gm, [{"ids": example}], loss, steps=1, progress=False)
