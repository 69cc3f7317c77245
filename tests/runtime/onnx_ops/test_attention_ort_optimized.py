"""A BERT file run through ONNX Runtime's transformers optimizer (com.microsoft Attention / MultiHeadAttention fed
the 1-D mask_index ``ReduceSum(attention_mask)`` it writes by default) runs in lora_fx's torch execution as in
ONNX Runtime, with right padding, and its LoRA rewrite trains."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import lora_fx
from lora_fx.runtime.onnx_torch import OnnxModule, trainable_module
from tests.runtime import onnx_models as om

HEADS, HIDDEN = 4, 32


def _optimized_bert(tmp_path: Path, mha: bool) -> Path:
    """A tiny BERT classifier exported by TorchScript, then fused by onnxruntime.transformers (EmbedLayerNormalization
    off, so attention_mask reaches the attention node as ReduceSum's key lengths)."""
    import transformers
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=64,
                                     vocab_size=100, num_labels=3, attn_implementation="eager",
                                     initializer_range=0.2)  # logits well above float noise
    bert = transformers.BertForSequenceClassification(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits

    ids = torch.randint(1, 100, (2, 8))
    exported = tmp_path / "bert.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(), (ids, torch.ones_like(ids)), str(exported), dynamo=False, opset_version=14,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})
        options = FusionOptions("bert")
        options.enable_embed_layer_norm = False
        options.use_multi_head_attention = mha
        optimized = optimize_model(str(exported), model_type="bert", num_heads=HEADS, hidden_size=HIDDEN,
                                   optimization_options=options, opt_level=0)
    path = tmp_path / "bert_optimized.onnx"
    optimized.save_model_to_file(str(path))
    return path


def _feeds(rows: int, lengths: list[int], seq: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    mask = (np.arange(seq)[None] < np.array(lengths)[:, None]).astype(np.int64)  # right padding
    return {"input_ids": rng.integers(1, 100, (rows, seq)).astype(np.int64), "attention_mask": mask}


@pytest.mark.parametrize("mha", [False, True], ids=["Attention", "MultiHeadAttention"])
def test_ort_optimized_bert_with_mask_index_matches_onnxruntime_and_trains(mha: bool, tmp_path: Path) -> None:
    import onnx_ir as ir

    path = _optimized_bert(tmp_path, mha)
    model = ir.load(str(path))
    op = "MultiHeadAttention" if mha else "Attention"
    fused = [n for n in model.graph if n.domain == "com.microsoft" and n.op_type == op]
    assert fused, f"the optimizer wrote no {op} node"
    # The default mask form: a 1-D mask index per batch row (ReduceSum of attention_mask), not the raw 2-D mask.
    masks = [n.inputs[4 if mha else 3] if len(n.inputs) > (4 if mha else 3) else None for n in fused]
    assert all(m is not None and m.producer() is not None and m.producer().op_type == "ReduceSum" for m in masks)
    feeds = _feeds(3, [8, 5, 2])
    want = om.ort_run(path, feeds)[0]
    # The rewrite before training (B = 0) computes what ONNX Runtime computes on the optimized file.
    lora = lora_fx.apply(model, lora_fx.LoraConfig(r=2, target_modules="all-linear"))
    got = OnnxModule(lora, trainable=[])(**{k: torch.from_numpy(v) for k, v in feeds.items()})["logits"]
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-5)
    # Padding matters here: all-ones masks give other logits, so the mask index is not ignored.
    unpadded = om.ort_run(path, {**feeds, "attention_mask": np.ones_like(feeds["attention_mask"])})[0]
    assert np.abs(unpadded - want)[1:].max(axis=1).min() > 1e-3 and np.abs(unpadded - want)[0].max() < 1e-5
    # One training step: a finite loss, and gradients reach the adapters.
    module = trainable_module(lora)
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-2)
    logits = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})["logits"]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    optimizer.step()
