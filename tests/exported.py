"""Shared, cached artefacts for the export/deploy tests: LoRA ONNX models, exported torch models, ORT runs.

Exports take tens of seconds on 2 cores, so each (model, mode) is exported once per test process into
one temporary folder and shared by tests/lora_fx/test_export.py, tests/runtime/test_ort.py and
tests/lora_fx/test_cli_export.py. Nothing here is mutated by the tests that use it.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests import models

TMP = Path(tempfile.mkdtemp(prefix="lora_fx_export_tests_"))
SEED_TARGETS = {"gemm-mlp": ["fc1", "fc2", "head"], "forms": ["enc.proj", "tied", "tied_1"], "fp16-mlp": ["up", "out"]}


def ort_run(path: str | Path, feeds: dict[str, np.ndarray], adapter: str | Path | None = None) -> np.ndarray:
    """Plain onnxruntime (no lora_fx runtime): the first output, with an .onnx_adapter active if given."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    run_options = None
    if adapter is not None:
        la = ort.LoraAdapter()
        la.Load(str(adapter))
        run_options = ort.RunOptions()
        run_options.add_active_adapter(la)
    return sess.run(None, feeds, run_options)[0]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def lora_onnx(entry_name: str, r: int = 4, seed: int = 0, alpha: float = 8.0, dropout: float = 0.0) -> Any:
    """A corpus model rewritten with random (non-zero) LoRA adapters: an onnx_ir Model."""
    import lora_fx
    from tests.onnx_corpus import corpus

    torch.manual_seed(seed)
    model = lora_fx.load(corpus().get(entry_name).path)
    return lora_fx.apply(model, lora_fx.LoraConfig(r=r, lora_alpha=alpha, target_modules=SEED_TARGETS[entry_name], init_lora_weights=False,
                                                  lora_dropout=dropout))


def save(model: Any, name: str) -> Path:
    import onnx_ir as ir

    import lora_fx

    path = TMP / name
    # A proto round trip, not deepcopy: deepcopy recurses too deep on exported models.
    lora_fx.save(ir.from_proto(ir.to_proto(model)), path)
    return path


@functools.cache
def trained_gm(name: str, seed: int = 0) -> torch.fx.GraphModule:
    """A captured model with non-zero LoRA adapters on every linear site (what training leaves)."""
    import lora_fx

    eager = models.build(name)
    gm = lora_fx.capture(eager, kwargs=models.inputs(2, 8))
    torch.manual_seed(seed)
    gm = lora_fx.apply(gm, lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian"))
    with torch.no_grad():
        for site in lora_fx.passes.fx.capture.meta(gm)["lora_sites"]:
            b = gm.get_submodule(site).lora_B.weight
            b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.05)
    return gm


@functools.cache
def eager(name: str) -> torch.nn.Module:
    return models.build(name)


@functools.cache
def exported(name: str, mode: str) -> Any:
    """``export_onnx`` of ``trained_gm(name)`` in ``mode``, once per process."""
    import lora_fx

    out = TMP / name / f"{mode}.onnx"
    return lora_fx.export_onnx(trained_gm(name), out, kwargs=models.inputs(2, 8), mode=mode)


@functools.cache
def base_exported(name: str) -> Any:
    """``export_onnx`` of the unrewritten capture of zoo model ``name`` (default mode), once per process."""
    import lora_fx
    from tests.shared_exports import captured

    return lora_fx.export_onnx(captured(name), TMP / f"{name}-base.onnx", kwargs=models.inputs(2, 8))


def feeds(batch: int, seq: int, pad: int = 0, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    b = models.inputs(batch, seq, pad=pad, seed=seed)
    return b, {k: v.numpy() for k, v in b.items()}
