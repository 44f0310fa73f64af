"""A plain ``pytest`` is the fast suite; the QEMU tests run only when asked for (tests/conftest.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _collected(*args: str, env: dict[str, str] | None = None) -> tuple[list[str], str]:
    environ = {k: v for k, v in os.environ.items() if k != "COMPOSER_NUMA_VM"}
    environ.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", *args],
                          cwd=ROOT, capture_output=True, text=True, env=environ, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    return ids, proc.stdout


def _vm(ids: list[str]) -> list[str]:
    return [i for i in ids if re.match(r"tests/vm/test_vm_\w+\.py::", i)]


@pytest.mark.slow
def test_plain_pytest_leaves_the_vm_suite_out_and_says_how_to_run_it():
    ids, out = _collected()
    assert ids and not _vm(ids)
    assert any(i.startswith("tests/test_plan.py::") for i in ids)
    assert any(i.startswith("tests/vm/test_harness.py::") for i in ids)  # the rig's own quick tests stay
    assert re.search(r"\d+ VM tests \(QEMU guests\) not run: `pytest -m vm` runs them", out)


@pytest.mark.slow
@pytest.mark.parametrize("args, env", [
    (("tests/vm",), None),
    (("tests/vm/test_vm_snc.py",), None),
    (("-m", "vm"), None),
    ((), {"COMPOSER_NUMA_VM": "1"}),
])
def test_the_vm_suite_runs_when_asked_for(args, env):
    ids, _ = _collected(*args, env=env)
    assert _vm(ids)
    if args[:1] == ("-m",):  # only marked tests (some outside tests/vm boot guests too)
        assert not any(i.startswith("tests/test_plan.py::") for i in ids)
