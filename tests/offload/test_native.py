"""The compiled module's CPU feature detection agrees with the kernel's view."""

from __future__ import annotations

import os
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


def test_cpu_features_match_proc_cpuinfo():
    flags = _cpuinfo_flags()
    f = C.cpu_features()
    assert f["avx2"] == ("avx2" in flags)
    assert f["avx512f"] == ("avx512f" in flags)
    assert f["avx512bf16"] == ("avx512_bf16" in flags)
    assert f["amx"] == ({"amx_tile", "amx_bf16"} <= flags)


@pytest.mark.parametrize("cap", ["scalar", "avx2", "avx512"])
def test_simd_level_is_capped_by_the_environment(cap):
    env = dict(os.environ, COMPOSER_NUMA_SIMD=cap)
    out = subprocess.run([sys.executable, "-c", "import composer_numa._C as C; print(C.simd_level())"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    best = C.simd_level() if "COMPOSER_NUMA_SIMD" not in os.environ else None
    order = ["scalar", "avx2", "avx512"]
    if best is not None:
        assert out == order[min(order.index(cap), order.index(best))]
    assert out in order and order.index(out) <= order.index(cap)
