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


def test_a_writer_that_replaces_the_temporary_file_still_gives_the_ordinary_mode(tmp_path):
    import os

    import torch
    from safetensors.torch import save_file

    from lora_fx import files
    from lora_fx.files import atomic_write

    def replace_owner_only(tmp):  # as safetensors does: its own mkstemp file, renamed onto ours
        fd = os.open(tmp_path / "own.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"x")
        os.close(fd)
        os.replace(tmp_path / "own.tmp", tmp)

    atomic_write(tmp_path / "b.bin", replace_owner_only)
    with atomic_path(tmp_path / "c.safetensors") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))
    for name in ("b.bin", "c.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~files._UMASK, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "c.safetensors"]


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


def test_read_npz_reads_arrays_and_never_unpickles(tmp_path):
    import pickle

    import numpy as np

    from lora_fx.files import read_npz

    np.savez(tmp_path / "ok.npz", a=np.arange(3), b=np.ones((2, 2), np.float32))
    got = read_npz(tmp_path / "ok.npz")
    assert sorted(got) == ["a", "b"] and got["b"].dtype == np.float32
    np.testing.assert_array_equal(got["a"], np.arange(3))
    np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ConfigError, match="object arrays, which need pickle"):
        read_npz(tmp_path / "obj.npz")

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled')",))

    (tmp_path / "pickle.npz").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ConfigError, match="is not an .npz file"):
        read_npz(tmp_path / "pickle.npz")
    with pytest.raises(ConfigError, match="no such data file"):
        read_npz(tmp_path / "absent.npz")
    with pytest.raises(ConfigError, match="is a directory"):
        read_npz(tmp_path)


def test_an_output_that_is_a_device_or_pipe_is_refused_and_left_as_it_is(tmp_path):
    # The finished file was renamed onto the path: "-o /dev/null" run as root replaced the device node with a
    # regular file (every later "> /dev/null" on the machine then wrote into it). A FIFO stands in for the device.
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is not a regular file"):
        check_output(fifo)
    with pytest.raises(ConfigError, match="is not a regular file"):
        atomic_write_text(fifo, "x")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
