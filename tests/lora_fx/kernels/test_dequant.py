"""dequant: the native kernels and the torch fallbacks decode every code the same, bit for bit."""

from __future__ import annotations

import os
import platform

import pytest
import torch

from lora_fx.kernels import dequant as dq
from lora_fx.kernels.quant_formats import NF4_CODE

NATIVE = dq.native_status().startswith("native")
# Each vector path of dequant.c, built for a target that has it (and no wider one), besides -march=native.
ARCHES = {"native-avx2": "haswell", "native-scalar": "x86-64"}
IMPLS = ["native", *ARCHES, "torch"]


def _cpu_has(flag: str) -> bool:
    return flag in dq._cpu_key().split()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """impl name -> a loaded library built for that target (built once per test module)."""
    cache = tmp_path_factory.mktemp("dequant_builds")
    libs, old = {}, os.environ.get("LORA_FX_CACHE_DIR")
    os.environ["LORA_FX_CACHE_DIR"] = str(cache)
    try:
        for impl, arch in ARCHES.items():
            if platform.machine() in ("x86_64", "AMD64") and (impl != "native-avx2" or _cpu_has("avx2")):
                libs[impl] = dq._build(arch)
    finally:
        if old is None:
            os.environ.pop("LORA_FX_CACHE_DIR")
        else:
            os.environ["LORA_FX_CACHE_DIR"] = old
    return libs


def _use(impl, built, monkeypatch) -> None:
    """Route dequant4/dequant8 through ``impl``, or skip when this machine cannot run it."""
    if impl == "torch":
        monkeypatch.setattr(dq, "_native", lambda: None)
    elif impl == "native":
        if not NATIVE:
            pytest.skip(dq.native_status())
    else:
        if impl not in built:
            pytest.skip(f"{impl} needs an x86-64 CPU (with AVX2)")
        lib, status = built[impl]
        if lib is None and not NATIVE:
            pytest.skip(status)  # no compiler here, or LORA_FX_NATIVE=0
        # Where the native build works, a target that fails to build is a broken path in dequant.c.
        assert lib is not None, status
        monkeypatch.setattr(dq, "_native", lambda: lib)


def _every_byte_pair() -> torch.Tensor:
    v = torch.arange(65536)
    return torch.stack([v & 255, v >> 8], 1).reshape(-1).to(torch.uint8)


def _reference(packed, table, scale, zero, high_first, block):
    hi, lo = (packed >> 4).long(), (packed & 15).long()
    codes = torch.stack([hi, lo] if high_first else [lo, hi], 1).reshape(-1)
    values = table[codes].view(-1, block)
    if zero is not None:
        values = values - zero.unsqueeze(1)
    return (values * scale.unsqueeze(1)).reshape(-1)


# 64 and 32: the AVX-512 path (multiple of 32); 16: AVX2's (multiple of 16), scalar under AVX-512; 6: scalar.
@pytest.mark.parametrize("block", [64, 32, 16, 6])
@pytest.mark.parametrize("form", ["nf4", "int4_symmetric", "int4_affine"])
@pytest.mark.parametrize("impl", IMPLS)
def test_every_byte_decodes_to_table_minus_zero_times_scale(impl, form, block, built, monkeypatch):
    _use(impl, built, monkeypatch)
    packed = _every_byte_pair()[: (131072 // block) * block // 2 * 2 // 2 * 2]
    packed = packed[: packed.numel() // (block // 2) * (block // 2)]
    n_blocks = packed.numel() * 2 // block
    g = torch.Generator().manual_seed(block)
    scale = torch.rand(n_blocks, generator=g) * 3
    if form == "nf4":
        table, zero, high_first = torch.tensor(NF4_CODE), None, True
    elif form == "int4_symmetric":
        table, zero, high_first = torch.arange(16.0) - 8, None, False
    else:
        table, zero, high_first = torch.arange(16.0), torch.randint(0, 16, (n_blocks,), generator=g).float(), False
    out = torch.full((n_blocks * block,), float("nan"))
    got = dq.dequant4(out, packed, table, scale, zero, high_first, block)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, _reference(packed, table, scale, zero, high_first, block))


@pytest.mark.parametrize("cols", [64, 37])  # the vector loop, and a scalar tail
@pytest.mark.parametrize("impl", IMPLS)
def test_int8_rows_decode_to_value_times_row_scale(impl, cols, built, monkeypatch):
    _use(impl, built, monkeypatch)
    q = torch.arange(-128, 128, dtype=torch.int8).repeat(cols * 9 // 256 + 1)[: 9 * cols].view(9, cols)
    scale = torch.rand(9, generator=torch.Generator().manual_seed(cols)) * 2
    out = torch.full((9, cols), float("nan"))
    assert dq.dequant8(out, q, scale) is out
    assert torch.equal(out, q.float() * scale.unsqueeze(1))


def test_status_says_which_implementation_decodes_and_why():
    status = dq.native_status()
    assert status.startswith(("native (", "torch ops ("))


def test_no_compiler_falls_back_to_torch_ops_and_says_so(monkeypatch, tmp_path):
    monkeypatch.delenv("LORA_FX_NATIVE", raising=False)
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    monkeypatch.setenv("LORA_FX_CACHE_DIR", str(tmp_path))
    lib, status = dq._build()
    assert lib is None and "no C compiler 'no-such-compiler-xyz'" in status and "set CC" in status
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("LORA_FX_NATIVE", "0")
    lib, status = dq._build()
    assert lib is None and "LORA_FX_NATIVE=0" in status


def test_a_failing_compiler_is_reported_and_leaves_no_file(monkeypatch, tmp_path):
    monkeypatch.delenv("LORA_FX_NATIVE", raising=False)
    monkeypatch.setenv("CC", "false")  # on PATH, exits 1
    monkeypatch.setenv("LORA_FX_CACHE_DIR", str(tmp_path))
    lib, status = dq._build()
    assert lib is None and status.startswith("torch ops (false failed on dequant.c")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not NATIVE, reason="no native kernel here")
def test_a_fresh_build_lands_under_its_final_name_only(monkeypatch, tmp_path):
    monkeypatch.delenv("LORA_FX_NATIVE", raising=False)
    monkeypatch.setenv("LORA_FX_CACHE_DIR", str(tmp_path))
    lib, status = dq._build()
    assert lib is not None and status.startswith("native")
    assert [p.name for p in tmp_path.iterdir()] == [status.split("(")[1].split(",")[0]]


def test_the_target_architecture_comes_from_the_environment_and_is_reported(monkeypatch, tmp_path):
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 target names")
    monkeypatch.delenv("LORA_FX_NATIVE", raising=False)
    monkeypatch.setenv("LORA_FX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LORA_FX_NATIVE_ARCH", "x86-64")
    lib, status = dq._build()
    if lib is None and not NATIVE:
        pytest.skip(status)  # no compiler here, or LORA_FX_NATIVE=0
    assert lib is not None and status.endswith("-march=x86-64)"), status
    monkeypatch.delenv("LORA_FX_NATIVE_ARCH")
    lib2, status2 = dq._build()
    assert status2.endswith("-march=native)") and len(list(tmp_path.glob("dequant-*.so"))) == 2  # one library per target
