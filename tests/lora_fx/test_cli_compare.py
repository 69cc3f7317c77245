"""``lora-fx compare`` on bad options: refused before any method trains."""

from __future__ import annotations

import pytest

from lora_fx.cli import main


@pytest.mark.parametrize("seed", [str(2**64), str(-(2**63) - 1)])
def test_a_seed_torch_cannot_take_is_refused_up_front(tmp_path, capsys, seed):
    # Every method used to start, fail on "ValueError: Overflow when unpacking long long", and end the run.
    out = tmp_path / "report"
    assert main(["compare", "--hf", str(tmp_path), "-o", str(out), f"--seed={seed}"]) == 2
    captured = capsys.readouterr()
    assert "--seed must be in [-2**63, 2**64)" in captured.err and captured.out == ""
    assert not out.exists()
