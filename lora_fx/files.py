"""Writing files so that a failure never leaves a half-written one: write a temporary name, rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from lora_fx.errors import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: os.umask can only be read by setting it, which other threads must not see half-way.
_UMASK = _umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The file gets the permissions an ordinary ``open`` would give it (0666 less the umask), whoever wrote it:
    mkstemp makes it owner-only, and a served adapter or model then cannot be read by a server running as
    another user.
    """
    path = Path(path)
    refuse_special(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # After the writer, not before: some writers replace the path with an owner-only temporary file of their
        # own (safetensors' save_file renames one onto it), which a chmod made beforehand would not reach.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a Path when it is a file; otherwise the error a user can act on (missing, or a folder)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; pass the {what} inside it")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what}")
    return path


def check_output(path: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Refuse, before any work is done, an output path that could not be written or would replace an input.

    Writing happens last (after rewriting or training): found out then, a bad path costs the whole run,
    and the OS error would name our temporary file, not the path the user gave.
    """
    path = Path(path)
    for src in inputs:
        if path.resolve() == Path(src).resolve():
            raise ConfigError(f"{path} is an input of this command; write the output to another path")
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give the output a file name, e.g. one inside it")
    refuse_special(path)
    check_output_dir(path.parent)
    return path


def check_adapter_name(name: Any, label: str) -> str:
    """``name`` when it can name an adapter's files (``<name>.onnx_adapter`` and the PEFT folder ``<name>/``) inside
    the adapters folder: one plain path component. ``..`` or ``a/b`` would put them elsewhere, under names the
    result does not report. ``label`` is how the caller spells the option (``--name``, ``adapter_name``)."""
    if not isinstance(name, str) or name.strip() in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"{label} {name!r} names the adapter's files inside the adapters folder (<name>.onnx_adapter, "
                          "<name>/); use a plain name with no / or \\, not . or .., such as legal")
    return name


def check_adapter_outputs(directory: str | os.PathLike, name: str, suffix: str, *, peft_dir: bool) -> None:
    """Refuse, before any work, adapter outputs that could not be written: ``directory`` (``<stem>.adapters``)
    a file or unwritable, ``<name><suffix>`` a folder, the PEFT folder ``<name>/`` (with ``peft_dir``) a file."""
    directory = Path(directory)
    check_output_dir(directory)
    check_output(directory / f"{name}{suffix}")
    peft = directory / name
    if peft_dir and peft.exists() and not peft.is_dir():
        raise ConfigError(f"{peft} is a file; the PEFT adapter folder goes there: move the file, or write no PEFT folder "
                          "(export_onnx(..., peft_dir=False); CLI: --no-peft)")


def refuse_special(path: str | os.PathLike) -> None:
    """Refuse an output path that exists and is no regular file or folder (a device such as /dev/null, a pipe,
    a socket): a finished file is renamed onto the path, which would replace the device itself (as root)."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        raise ConfigError(f"{path} is not a regular file (a device, pipe or socket); lora_fx writes a finished file "
                          f"in its place, which would replace it: give the path of a file")


def check_output_dir(directory: str | os.PathLike) -> Path:
    """Refuse a folder that is a file or cannot be created or written (it may not exist yet: it is made)."""
    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot write into {directory}: {existing} is a file, not a folder; choose another output path")
    try:  # a real probe: permission bits do not tell root about read-only mounts or /proc
        fd, probe = tempfile.mkstemp(prefix=".lora_fx_probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"cannot write into {directory} ({existing}: {exc.strerror}); choose another output path") from None
    return directory


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def read_npz(path: str | os.PathLike, what: str = "data file", how: str = "np.savez(path, <name>=array, ...)") -> dict[str, Any]:
    """The arrays of an .npz file by name; never unpickles.

    Anything else is a ``ConfigError`` naming the file and ``how`` to write one: a missing file or a folder, a
    single .npy array, a file that is no zip (np.load would take it for a pickle and speak of pickles), a
    truncated zip, an entry that is no .npy array, an object array (it needs pickle).
    """
    import zipfile

    import numpy as np

    try:
        path = require_file(path, what)
    except OSError as exc:
        raise ConfigError(str(exc)) from None
    with open(path, "rb") as f:
        magic = f.read(4)
    # np.load picks the format from these bytes: a .npy gives one bare array (no names), and anything that is
    # neither a zip nor a .npy is taken for a pickle, which allow_pickle=False refuses with a message about pickles.
    if magic.startswith(b"\x93NUM"):
        raise ConfigError(f"{path} is a single .npy array, not an .npz of named arrays; write one with {how}")
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise ConfigError(f"{path} is not an .npz file (a zip of arrays, as {how} writes)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        if "pickle" in str(exc):
            raise ConfigError(f"{path} holds object arrays, which need pickle and are refused (lora_fx never "
                              f"unpickles); store numeric arrays: {how}") from None
        raise ConfigError(f"{path} is not a readable .npz of arrays ({exc}; truncated or corrupt?); write it again "
                          f"with {how}") from None
    # NpzFile hands back an entry that is no .npy file as its raw bytes.
    raw = sorted(name for name, value in arrays.items() if not isinstance(value, np.ndarray))
    if raw:
        raise ConfigError(f"{path}: entries {raw} are not .npy arrays (the zip was not written by np.savez); "
                          f"write it again with {how}")
    return arrays


class Staging:
    """Adapter outputs written under a temporary folder inside ``directory`` and moved to their names there
    (``commit``) once the model is written; ``discard`` removes them, and ``directory`` too when made for them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._made = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        # Inside the destination folder: a rename from there cannot cross file systems (the folder may be a link).
        self.root = Path(tempfile.mkdtemp(prefix=".lora_fx-staged.", dir=directory))

    def path(self, name: str) -> Path:
        """Where to write what ends up as ``directory / name``."""
        return self.root / name

    def commit(self) -> None:
        for entry in sorted(self.root.iterdir()):
            _move(entry, self.directory / entry.name)
        shutil.rmtree(self.root, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self._made:
            try:
                self.directory.rmdir()
            except OSError:  # something else was written there meanwhile: not ours to remove
                pass


def _move(src: Path, dest: Path) -> None:
    """``src`` onto ``dest``, a file replaced whole; a folder onto an existing one file by file, as
    ``write_peft_dir`` writes into an existing folder."""
    if src.is_dir() and dest.is_dir():
        for entry in sorted(src.iterdir()):
            _move(entry, dest / entry.name)
        return
    os.replace(src, dest)


def write_with_adapters(model: Any, out: Path, directory: Path, write_adapters: Callable[[Staging], None],
                         save_model: Callable[[Any, Path], Any]) -> None:
    """Write the adapter files (``write_adapters`` into a ``Staging`` of ``directory``), then the model, then move
    the adapter files into place: a refused or failed adapter write leaves no model, a failed model write no
    adapters."""
    stage = Staging(directory)
    try:
        write_adapters(stage)
        save_model(model, out)
        stage.commit()
    except BaseException:  # Ctrl-C included: the staged files are ours to remove
        stage.discard()
        raise
