"""lora_fx.hf: local transformers folders load quietly, as the weights they hold."""

from __future__ import annotations

import torch
from transformers.utils import logging as hf_logging

from lora_fx.hf import load_hf_model, minilm_dir


def test_the_bundled_minilm_loads_without_a_progress_bar_and_leaves_the_setting(capfd):
    model = load_hf_model(minilm_dir())
    err = capfd.readouterr().err
    assert "Loading weights" not in err, err  # it printed into every command's and the demo's output
    assert hf_logging.is_progress_bar_enabled()  # the caller's setting is as it was
    assert not model.training
    ids = torch.tensor([[101, 2023, 2003, 102]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert out.shape == (1, 4, 384) and torch.isfinite(out).all()
