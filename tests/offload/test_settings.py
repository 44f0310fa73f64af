"""Environment settings the extension reads: a value it does not know is warned about once and ignored."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("composer_numa._C", reason="the C++ extension is not built")

CODE = ("import warnings; warnings.simplefilter('always')\n"
        "from composer_numa.offload.native import native\n"
        "c = native(); native()\n"
        "print(c.simd_level())\n")


def _run(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COMPOSER_NUMA_SIMD=value)
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=60)


def test_an_unknown_simd_cap_is_warned_about_once_and_ignored():
    best = _run("").stdout.strip()
    out = _run("bogus")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == best  # ignored: not silently scalar
    lines = [ln for ln in out.stderr.splitlines() if "[setting-ignored]" in ln]
    assert len(lines) == 1 and "COMPOSER_NUMA_SIMD='bogus' is not one of" in lines[0]


def test_a_known_cap_is_obeyed_without_a_warning():
    out = _run("scalar")
    assert out.stdout.strip() == "scalar" and "setting-ignored" not in out.stderr
