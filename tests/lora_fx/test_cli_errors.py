"""The CLI's error contract across subcommands: one line on stderr, nothing on stdout (``--json`` too), exit 2 for
bad input, 130 when interrupted, 1 for a bug; the traceback only with LORA_FX_DEBUG=1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lora_fx
from lora_fx.cli import main
from tests.exported import lora_onnx


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


# ---- Ctrl-C before the commands load, a reader that closes the pipe --------------------------------------------

LORA_FX = Path(sys.executable).parent / "lora-fx"


def _cli() -> list[str]:
    return [str(LORA_FX)] if LORA_FX.exists() else [sys.executable, "-c", "import sys; from lora_fx.cli import main; sys.exit(main())"]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("LORA_FX_DEBUG", None)
    return env


def test_the_console_entry_point_imports_nothing_heavy():
    # `import lora_fx.cli` imported torch and onnx through the package (seconds), before main could catch Ctrl-C.
    code = "import sys, lora_fx.cli; print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr)
    # The public names still load on first use.
    code = "import lora_fx; from lora_fx import LoraConfig; print(lora_fx.capture.__module__, LoraConfig.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert out.stdout.split() == ["lora_fx.passes.fx.capture", "lora_fx.config"], out.stderr


@pytest.mark.parametrize("delay", [0.3, 1.0])
def test_ctrl_c_while_a_command_imports_torch_is_one_line_and_130(tmp_path, delay):
    # Ctrl-C in the first seconds of any command printed a Python traceback and the process died of SIGINT.
    lora_fx.save(lora_onnx("gemm-mlp"), tmp_path / "m.onnx")
    proc = subprocess.Popen(_cli() + ["sites", str(tmp_path / "m.onnx")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip() == "lora-fx: error: interrupted" and out == "", (proc.returncode, err)


def test_ctrl_c_while_the_parser_loads_the_commands_is_one_line_and_130(capsys, monkeypatch):
    from lora_fx import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["sites", "--help"]) == 130
    assert capsys.readouterr().err == "lora-fx: error: interrupted\n"


@pytest.mark.parametrize("argv", [["sites", "{m}", "--json"], ["sites", "{m}"]])
def test_a_reader_that_closes_the_pipe_ends_the_command_quietly_with_141(tmp_path, argv):
    # `lora-fx sites --json | head -1` printed "lora-fx: error: [Errno 32] Broken pipe" and exited 2 (or Python's
    # "Exception ignored ... BrokenPipeError" and 120): a reader that stopped early is no error of the user's.
    lora_fx.save(lora_onnx("gemm-mlp"), tmp_path / "m.onnx")
    cmd = _cli() + [a.format(m=tmp_path / "m.onnx") for a in argv]
    whole = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert whole.returncode == 0 and whole.stdout, whole.stderr  # there is output to write
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte: every write fails, deterministically
    try:
        closed = subprocess.run(cmd, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120, env=_env())
    finally:
        os.close(write)
    assert closed.returncode == 141 and closed.stderr == "", (closed.returncode, closed.stderr)


def test_a_broken_pipe_that_is_not_stdout_stays_an_error(tmp_path, capsys, monkeypatch):
    # Only a closed stdout is quiet: a training process's pipe that breaks is reported as before.
    from lora_fx.commands import sites

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sites, "load_sites", broken)
    monkeypatch.delenv("LORA_FX_DEBUG", raising=False)
    assert main(["sites", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err == "lora-fx: error: [Errno 32] Broken pipe\n"
