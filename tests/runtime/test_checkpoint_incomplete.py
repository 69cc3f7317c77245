"""A checkpoint folder left half-written or half-deleted: the tensor file (written first, atomically) is the
checkpoint, the summary checkpoint.json (written after it, atomically) only names it. A resume continues from a
complete tensor file whatever the summary says (a run killed between the two writes leaves the summary a step
behind, or none), and refuses a summary whose tensor file is missing, which used to start the run over from step
0 without a word."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

import lora_fx
from lora_fx.cli import main
from lora_fx.errors import ConfigError
from lora_fx.runtime import checkpoint
from lora_fx.runtime.train import cross_entropy_on
from tests.runtime import onnx_models as om
from tests.runtime.test_train_onnx import _mlp_batches

LOSS = cross_entropy_on("logits")
STEPS = 6


def _train(ck: Path, *, resume: bool = False, ran: list[int] | None = None, steps: int = STEPS, model=None):
    return lora_fx.train(om.mlp() if model is None else model, _mlp_batches(), LOSS, steps=steps, lr=1e-2,
                         progress=False, checkpoint_dir=str(ck), checkpoint_every=1, resume=resume,
                         on_step=None if ran is None else lambda s, v: ran.append(s))


def _adapters(model) -> dict[str, np.ndarray]:
    return {n: model.graph.initializers[n].const_value.numpy().copy() for n in ("fc1.lora_A.weight", "fc1.lora_B.weight")}


@pytest.fixture(scope="module")
def full() -> list[float]:
    return lora_fx.train(om.mlp(), _mlp_batches(), LOSS, steps=STEPS, lr=1e-2, progress=False).losses


@pytest.mark.parametrize("summary,says", [
    (None, "records a checkpoint of step 2"),  # as the run wrote it
    ("{not json", r"is there \(unreadable as a checkpoint summary\)"),
    ("[1, 2]", r"is there \(unreadable as a checkpoint summary\)"),
])
def test_a_summary_whose_tensor_file_is_missing_is_refused(tmp_path: Path, summary: str | None, says: str) -> None:
    ck = tmp_path / "ck"
    _train(ck, steps=2)
    (ck / "checkpoint.safetensors").unlink()
    if summary is not None:
        (ck / "checkpoint.json").write_text(summary)
    written = (ck / "checkpoint.json").read_text()
    model = om.mlp()
    before = _adapters(model)
    ran: list[int] = []
    with pytest.raises(ConfigError, match=rf"^{ck}/checkpoint.json {says}, but {ck}/checkpoint.safetensors, which holds "
                                          r"its adapters and optimizer state, is missing: the run cannot be resumed\. "
                                          rf"Restore checkpoint.safetensors to resume, or start over: remove "
                                          rf"{ck}/checkpoint.json \(or the whole folder\), or train without resuming "
                                          r"\(resume=False; lora-fx train: without --resume\)"):
        _train(ck, resume=True, ran=ran, model=model)
    assert ran == [] and all(np.array_equal(v, before[k]) for k, v in _adapters(model).items())
    assert sorted(p.name for p in ck.iterdir()) == ["checkpoint.json"] and (ck / "checkpoint.json").read_text() == written


def test_a_tensor_file_in_place_of_a_folder_is_named(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    _train(ck, steps=1)
    (ck / "checkpoint.safetensors").unlink()
    (ck / "checkpoint.safetensors").mkdir()
    with pytest.raises(ConfigError, match=r"checkpoint.json records a checkpoint of step 1, but .*checkpoint.safetensors "
                                          r"is not a file\. Restore"):
        _train(ck, resume=True)


@pytest.mark.parametrize("summary", ["missing", "unreadable"])
def test_a_tensor_file_without_a_readable_summary_resumes(tmp_path: Path, full: list[float], summary: str) -> None:
    # The state of a run killed between its first two writes (or a summary deleted or damaged by hand): the tensor
    # file is complete and holds the step, so the run continues from it, on the same curve.
    ck = tmp_path / "ck"
    _train(ck, steps=3)
    if summary == "missing":
        (ck / "checkpoint.json").unlink()
    else:
        (ck / "checkpoint.json").write_text("{not json")
    ran: list[int] = []
    resumed = _train(ck, resume=True, ran=ran)
    assert ran == list(range(3, STEPS)) and resumed.losses == full
    assert json.loads((ck / "checkpoint.json").read_text())["step"] == STEPS  # the summary is written anew


class _Crash(Exception):
    pass


def test_a_crash_between_the_two_writes_resumes_from_the_tensor_file(tmp_path: Path, full: list[float],
                                                                     monkeypatch) -> None:
    # The tensor file is written first and the summary after it: killed between the two writes of step 4, the folder
    # holds step 4's tensors beside step 3's summary, and the run continues from step 4. (Written the other way
    # round, a summary would name tensors that were never written.)
    ck = tmp_path / "ck"
    write_summary, tensor_path = checkpoint.atomic_write_text, checkpoint.atomic_path
    order: list[str] = []

    def summary_then_crash(path, text):
        order.append(f"summary {json.loads(text)['step']}")
        if len(order) == 8:  # the summary of step 4
            raise _Crash
        write_summary(path, text)

    def tensors(path):
        order.append(f"tensors {len(order) // 2 + 1}")
        return tensor_path(path)

    monkeypatch.setattr(checkpoint, "atomic_write_text", summary_then_crash)
    monkeypatch.setattr(checkpoint, "atomic_path", tensors)
    with pytest.raises(_Crash):
        _train(ck)
    monkeypatch.undo()
    assert order == [f"{what} {step}" for step in range(1, 5) for what in ("tensors", "summary")]
    assert json.loads((ck / "checkpoint.json").read_text())["step"] == 3
    assert not list(ck.glob(".*.tmp"))  # no temporary file left beside them
    ran: list[int] = []
    resumed = _train(ck, resume=True, ran=ran)
    assert ran == [4, 5] and resumed.resumed_from_step == 4 and resumed.losses == full


def test_cli_resume_of_a_summary_without_its_tensor_file_writes_nothing(tmp_path: Path, capsys) -> None:
    # The user sweep's case: checkpoint.json said step 2, yet --resume printed "trained 4 steps" from step 0, rc 0.
    model = tmp_path / "lora.onnx"
    ir.save(om.mlp(), str(model))
    batches = _mlp_batches(2)
    np.savez(tmp_path / "train.npz", x=torch.cat([b["x"] for b in batches]).numpy(),
             labels=torch.cat([b["labels"] for b in batches]).numpy())
    ck, out = tmp_path / "ck", tmp_path / "t.onnx"
    argv = ["train", str(model), "--data", str(tmp_path / "train.npz"), "--batch-size", "16", "--no-progress",
            "--checkpoint-dir", str(ck), "--checkpoint-every", "1", "-o", str(out)]
    assert main(argv + ["--steps", "2"]) == 0
    out.unlink()
    (ck / "checkpoint.safetensors").unlink()
    capsys.readouterr()
    assert main(argv + ["--steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.json records a checkpoint of step 2, but" in err and "is missing" in err, err
    assert "without --resume" in err and "Traceback" not in err and not out.exists()
