"""The compiled module's CPU feature detection agrees with the kernel's view."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys

import pytest

C = pytest.importorskip("composer_numa._C")


def _cpuinfo_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    pytest.skip("no flags line in /proc/cpuinfo (not x86?)")


ARM64 = platform.machine() in ("aarch64", "arm64")
#: The SIMD paths of this architecture, narrowest first (COMPOSER_NUMA_SIMD names).
ORDER = ["scalar", "neon"] if ARM64 else ["scalar", "avx2", "avx512"]


@pytest.mark.skipif(ARM64, reason="x86 flags; under qemu-user /proc/cpuinfo is the host's anyway")
def test_cpu_features_match_proc_cpuinfo():
    flags = _cpuinfo_flags()
    f = C.cpu_features()
    assert f["avx2"] == ("avx2" in flags)
    assert f["avx512f"] == ("avx512f" in flags)
    assert f["avx512bf16"] == ("avx512_bf16" in flags)
    assert f["amx"] == ({"amx_tile", "amx_bf16"} <= flags)
    assert f["avx512vnni"] == ("avx512_vnni" in flags)
    assert f["amx_int8"] == ({"amx_tile", "amx_int8"} <= flags)
    vendors = {line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("vendor_id")}
    assert f["amd"] == bool(vendors & {"AuthenticAMD", "HygonGenuine"})  # AdamW's prefetch choice keys on it


@pytest.mark.arm64
@pytest.mark.skipif(not ARM64, reason="aarch64 only")
def test_cpu_features_match_the_kernels_hwcaps():
    # getauxval from libc, independently of the extension; the bits of the kernel's uapi asm/hwcap.h.
    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    libc.getauxval.argtypes = [ctypes.c_ulong]
    hw, hw2 = libc.getauxval(16), libc.getauxval(26)  # AT_HWCAP, AT_HWCAP2
    f = C.cpu_features()
    assert f["asimd"] == bool(hw & (1 << 1)) and f["asimd"]  # NEON is architectural on aarch64 Linux
    assert f["asimddp"] == bool(hw & (1 << 20))
    assert f["sve"] == bool(hw & (1 << 22))
    assert f["sve2"] == bool(hw2 & (1 << 1))
    assert f["i8mm"] == bool(hw2 & (1 << 13))
    assert f["bf16"] == bool(hw2 & (1 << 14))
    assert not any(f[k] for k in ("avx2", "fma", "avx512f", "avx512bf16", "amx", "avx512vnni", "amx_int8"))
    assert os.environ.get("COMPOSER_NUMA_SIMD") or C.simd_level() == "neon"


@pytest.mark.arm64
@pytest.mark.parametrize("cap", ["scalar", "avx2", "avx512", "neon"])
def test_simd_level_is_capped_by_the_environment(cap):
    env = dict(os.environ, COMPOSER_NUMA_SIMD=cap)
    out = subprocess.run([sys.executable, "-c", "import composer_numa._C as C; print(C.simd_level())"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    best = C.simd_level() if "COMPOSER_NUMA_SIMD" not in os.environ else None
    assert out in ORDER
    if cap not in ORDER:  # another architecture's path: no cap at all
        assert best is None or out == best
        return
    if best is not None:
        assert out == ORDER[min(ORDER.index(cap), ORDER.index(best))]
    assert ORDER.index(out) <= ORDER.index(cap)
