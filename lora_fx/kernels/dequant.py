"""Decode quantized weights to float32: C kernels (``dequant.c``) or torch ops.

``dequant4``: 4-bit codes (nf4, int4) through a 16-entry table, a scale (and zero point) per block.
``dequant8``: int8 with one scale per row.

The kernel is compiled once per machine with ``$CC`` (default ``cc``) at ``-O3 -march=native`` into
``$LORA_FX_CACHE_DIR`` (default ``~/.cache/lora_fx``), written under a temporary name and renamed, and
loaded with ctypes (no torch headers, no Python extension module). ``LORA_FX_NATIVE_ARCH`` replaces
``native`` in ``-march`` (for example ``x86-64-v3`` to build one library for a fleet of AVX2 machines);
the kernel has AVX-512, AVX2 and scalar loops and the compiler picks by the target. Where that fails (no compiler,
read-only cache) or ``LORA_FX_NATIVE=0``, the same values come from torch ops: ``native_status()``
says which is in use and why. Both compute ``(table[code] - zero) * scale`` in float32 with the same
two roundings, so they agree bit for bit.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Optional

import torch

Tensor = torch.Tensor

_SOURCE = Path(__file__).with_name("dequant.c")
_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp")
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def _cache_dir() -> Path:
    if os.environ.get("LORA_FX_CACHE_DIR"):
        return Path(os.environ["LORA_FX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lora_fx"


def _cpu_key() -> str:
    # -march=native code is only valid on this CPU: the library's name carries the CPU's flags.
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def _build(arch: Optional[str] = None) -> tuple[Optional[ctypes.CDLL], str]:
    """Compile (once per machine, source and ``-march``) and load the kernel; None and the reason if not."""
    if os.environ.get("LORA_FX_NATIVE", "1") == "0":
        return None, "torch ops (LORA_FX_NATIVE=0)"
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return None, f"torch ops (no C compiler '{cc}' on PATH; set CC to build the native kernel)"
    arch = arch or os.environ.get("LORA_FX_NATIVE_ARCH") or "native"
    flags = (*_FLAGS, f"-march={arch}")
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(flags).encode() + _cpu_key().encode() + platform.machine().encode()).hexdigest()[:16]
    target = _cache_dir() / f"dequant-{digest}.so"
    if not target.exists():
        from lora_fx.files import atomic_path

        try:
            # check=True raises inside the block, so a failed build is never renamed onto the final name.
            with atomic_path(target) as tmp:
                subprocess.run([cc, *flags, str(_SOURCE), "-o", str(tmp)], capture_output=True, text=True, timeout=120, check=True)
        except subprocess.CalledProcessError as exc:
            return None, f"torch ops ({cc} failed on dequant.c: {exc.stderr.strip()[:300]})"
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"torch ops (could not build the native kernel in {target.parent}: {exc})"
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        return None, f"torch ops (could not load {target}: {exc})"
    fn = lib.lora_fx_dequant4
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    fn = lib.lora_fx_dequant8
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib, f"native ({target.name}, {cc} -march={arch})"


def _native() -> Optional[ctypes.CDLL]:
    if "lib" not in _STATE:
        with _LOCK:
            if "lib" not in _STATE:
                _STATE["lib"], _STATE["status"] = _build()
    return _STATE["lib"]  # type: ignore[return-value]


def native_status() -> str:
    """Which implementation decodes quantized weights here, and why."""
    _native()
    return str(_STATE["status"])


def dequant4(out: Tensor, packed: Tensor, table16: Tensor, scale: Tensor, zero: Optional[Tensor], high_first: bool,
             block_size: int) -> Tensor:
    """Write ``(table16[code] - zero) * scale`` for every 4-bit code of ``packed`` into ``out``.

    ``packed``: uint8, ``n_blocks * block_size / 2`` bytes; ``scale`` (and ``zero``, or None for 0):
    float32, one per block; ``out``: float32, ``n_blocks * block_size`` values. All contiguous, on CPU
    for the native kernel. Returns ``out`` flat.
    """
    n_blocks = scale.numel()
    assert packed.numel() * 2 == n_blocks * block_size == out.numel(), (packed.numel(), n_blocks, block_size, out.numel())
    lib = _native() if packed.device.type == "cpu" else None
    if lib is not None and all(t.is_contiguous() for t in (out, packed, table16, scale)) and out.dtype == torch.float32:
        table16, scale = table16.float().contiguous(), scale.float().contiguous()
        zero = zero.float().contiguous() if zero is not None else None
        lib.lora_fx_dequant4(packed.data_ptr(), n_blocks, block_size, table16.data_ptr(), scale.data_ptr(),
                             zero.data_ptr() if zero is not None else None, int(high_first), out.data_ptr(),
                             torch.get_num_threads())
        return out.view(-1)
    return _dequant4_torch(out, packed, table16, scale, zero, high_first, block_size)


def _pair_table(table16: Tensor, high_first: bool) -> Tensor:
    """[256] int64: each byte's two float32 values as one 8-byte word, in storage order."""
    b = torch.arange(256, device=table16.device)
    first, second = (b >> 4, b & 15) if high_first else (b & 15, b >> 4)
    return torch.stack([table16[first], table16[second]], dim=1).float().contiguous().view(torch.int64).reshape(-1)


def _dequant4_torch(out: Tensor, packed: Tensor, table16: Tensor, scale: Tensor, zero: Optional[Tensor], high_first: bool,
                    block_size: int) -> Tensor:
    # index_select over a 1-D int64 table (two float32 values a word) takes a vectorized path that is
    # 2-3x faster than gathering [256, 2] float rows.
    words = torch.index_select(_pair_table(table16, high_first), 0, packed.reshape(-1).to(torch.int32),
                               out=out.view(-1).view(torch.int64))
    values = words.view(torch.float32).view(-1, block_size)
    if zero is not None:
        values.sub_(zero.float().unsqueeze(1))
    return values.mul_(scale.float().unsqueeze(1)).view(-1)


def dequant8(out: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """Write ``q[r, c] * scale[r]`` into ``out`` (float32 ``[rows, cols]``, like ``q``, int8). Returns ``out``."""
    lib = _native() if q.device.type == "cpu" else None
    if (lib is not None and q.dtype == torch.int8 and out.dtype == torch.float32 and q.dim() == 2
            and q.is_contiguous() and out.is_contiguous()):
        scale = scale.float().contiguous()
        lib.lora_fx_dequant8(q.data_ptr(), q.shape[0], q.shape[1], scale.data_ptr(), out.data_ptr(), torch.get_num_threads())
        return out
    return out.copy_(q).mul_(scale.float().unsqueeze(1))
