"""lora_fx.files: whole files or none, with ordinary permissions; outputs checked before the work."""

from __future__ import annotations

import stat

import pytest

from lora_fx.errors import ConfigError
from lora_fx.files import atomic_path, atomic_write_text, check_output


def test_written_files_get_the_permissions_open_would_give(tmp_path):
    from lora_fx import files

    atomic_write_text(tmp_path / "a.json", "{}")
    mode = stat.S_IMODE((tmp_path / "a.json").stat().st_mode)
    # The umask read at import decides, as for open(); not mkstemp's owner-only 0600.
    assert mode == 0o666 & ~files._UMASK
    if not files._UMASK & 0o044:  # the usual 022: a server running as another user can read it
        assert mode & 0o044


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path):
    (tmp_path / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "keep.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert (tmp_path / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_outputs_that_cannot_be_written_are_refused_before_the_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a directory"):
        check_output(tmp_path)
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_output(tmp_path / "file" / "out.onnx")
    with pytest.raises(ConfigError, match="is an input of this command"):
        check_output(tmp_path / "file", inputs=[tmp_path / "file"])
    assert check_output(tmp_path / "new" / "out.onnx") == tmp_path / "new" / "out.onnx"
