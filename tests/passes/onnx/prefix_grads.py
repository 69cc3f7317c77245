"""One training step's prefix gradients on a prefix-tuned ONNX file against PEFT's, shared by the ONNX prefix tests
(test_insert_prefix_t5.py, test_insert_prefix_bloom.py).

The same cross-entropy over the kept tokens runs through ``OnnxModule`` and through a copy of PEFT's model; the losses
must agree, and the gradients of the file's prefix initializers, gathered into PEFT's layout by ``to_peft_blocks``
(sites reading one block sum into it, as PEFT's block sums them), must equal the gradient of PEFT's
``prompt_embeddings``.
"""

from __future__ import annotations

import copy

import onnx_ir as ir
import torch

from lora_fx.passes.onnx.insert_prefix import prefix_metadata
from lora_fx.prefix_adapters import to_peft_blocks
from lora_fx.runtime.onnx_torch import OnnxModule


def assert_peft_prefix_gradients(model: ir.Model, module: OnnxModule, pm: torch.nn.Module, x: dict[str, torch.Tensor],
                                 keep: torch.Tensor) -> None:
    """``module`` (an ``OnnxModule`` of ``model``, which holds PEFT's adapter) and ``pm`` (PEFT's model, left
    untouched: a copy takes the step) run ``x``; the loss is over the tokens ``keep`` marks, against labels in [0, 64)
    (inside the tiny models' vocabulary, tests/models.py's VOCAB) drawn from their own seeded generator."""
    labels = torch.randint(0, 64, keep.shape, generator=torch.Generator().manual_seed(0))

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits[keep], labels[keep])

    ours = loss(module(**x)["logits"])
    ours.backward()
    theirs_model = copy.deepcopy(pm)
    embedding = theirs_model.prompt_encoder["default"].embedding.weight
    embedding.requires_grad_(True)
    theirs = loss(theirs_model(**x).logits)
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    rec = prefix_metadata(model)
    grads = {site: (module.tensor(r["key"]).grad, module.tensor(r["value"]).grad) for site, r in rec["sites"].items()}
    got = to_peft_blocks(rec, grads)
    # A zero gradient would make the comparison below vacuous.
    assert float(embedding.grad.abs().max()) > 0
    torch.testing.assert_close(got, embedding.grad, rtol=1e-4, atol=1e-5 * float(embedding.grad.abs().max()))
