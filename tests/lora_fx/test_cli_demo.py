"""``lora-fx demo`` on bad options: refused before the banner, with no output folder made."""

from __future__ import annotations

import pytest

from lora_fx.cli import main


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_steps_below_one_are_refused_before_anything_is_written(tmp_path, capsys, steps):
    # The banner was printed and the output folder made before compare refused the count.
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), f"--steps={steps}"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"steps must be at least 1, got {steps}" in captured.err
    assert not out.exists()


def test_a_seed_torch_cannot_take_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), f"--seed={2**64}"]) == 2
    assert "seed must be an integer in [-2**63, 2**64)" in capsys.readouterr().err
    assert not out.exists()


def test_help_describes_the_seed(capsys):
    # --seed showed no description.
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--seed SEED seed of every method, the same for each: initialisation, data order (default: 0)" in text
