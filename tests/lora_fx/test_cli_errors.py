"""The CLI's error contract across subcommands: one line on stderr, nothing on stdout (``--json`` too), exit 2 for
bad input, 130 when interrupted, 1 for a bug; the traceback only with LORA_FX_DEBUG=1."""

from __future__ import annotations

import sys

import pytest

from lora_fx.cli import main


def test_a_bug_is_one_line_exit_1_and_the_traceback_only_in_debug(tmp_path, capsys, monkeypatch):
    # An exception no layer turned into a LoraFxError used to reach the user as a traceback from inside torch/onnx.
    from lora_fx.commands import sites

    def broken(args):
        raise RuntimeError("mat1 and mat2 shapes\ncannot be multiplied")

    monkeypatch.setattr(sites, "load_sites", broken)
    monkeypatch.delenv("LORA_FX_DEBUG", raising=False)
    assert main(["sites", str(tmp_path / "m.onnx"), "--json"]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1, captured.err
    assert lines[0].startswith("lora-fx: error: internal error, RuntimeError: mat1 and mat2 shapes cannot be multiplied")
    assert "LORA_FX_DEBUG=1" in lines[0]
    monkeypatch.setenv("LORA_FX_DEBUG", "1")
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        main(["sites", str(tmp_path / "m.onnx")])


@pytest.mark.parametrize("argv", [
    ["sites", "{tmp}/absent.onnx", "--json"],
    ["rewrite", "{tmp}/absent.onnx", "-o", "{tmp}/o.onnx", "--target-modules", "fc1", "--json"],
    ["train", "{tmp}/absent.onnx", "--data", "{tmp}/d.npz", "-o", "{tmp}/o.onnx", "--json"],
    ["export", "{tmp}/absent.onnx", "-o", "{tmp}/o.onnx", "--merge", "--json"],
    ["run", "{tmp}/absent.onnx", "--inputs", "{tmp}/d.npz", "--json"],
    ["compare", "--hf", "{tmp}/absent", "--json"],
    ["demo", "--steps", "0", "-o", "{tmp}/demo", "--json"],
])
def test_json_errors_are_one_line_on_stderr_and_nothing_on_stdout(tmp_path, capsys, argv):
    # What every subcommand does today: a --json consumer reads stdout, which stays empty, and the exit status.
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("lora-fx: error: "), captured
    assert list(tmp_path.iterdir()) == []


def test_lora_fx_warnings_print_as_cli_lines_and_others_keep_their_form(capsys, monkeypatch):
    """A lora_fx warning printed as Python's ``file:line: UserWarning:`` with the source line under it."""
    import warnings

    from lora_fx import cli
    from lora_fx.passes.onnx import fold_lora

    def run(args):
        warnings.warn_explicit("a site\n  left  at the default", UserWarning, fold_lora.__file__, 1)
        warnings.warn_explicit("deprecated thing", DeprecationWarning, fold_lora.__file__, 2)
        warnings.warn_explicit("from elsewhere", UserWarning, "/elsewhere/mod.py", 3)
        return 0

    monkeypatch.setattr(cli, "build_parser", lambda: _ParserRunning(run))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # Python's own printing (pytest records warnings instead): format with formatwarning, write to stderr.
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(warnings.formatwarning(m, c, f, n, line))
        assert cli.main(["x"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "lora-fx: warning: a site left at the default"
    assert err[1] == "lora-fx: warning: DeprecationWarning: deprecated thing"
    assert err[2].startswith("/elsewhere/mod.py:3: UserWarning: from elsewhere")
    assert warnings.formatwarning is not None and "lora-fx" not in warnings.formatwarning("m", UserWarning, fold_lora.__file__, 1)


class _ParserRunning:
    def __init__(self, func):
        self.func = func

    def parse_args(self, argv):
        import argparse

        return argparse.Namespace(command="x", func=self.func)
