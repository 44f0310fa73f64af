"""Fixtures for the QEMU NUMA guests (see tests/vm/harness.py).

Every test in tests/vm/test_vm_*.py boots a guest and gets the ``vm`` marker (deselect with ``-m "not vm"``, or set
``COMPOSER_NUMA_VM=0``). Tests skip with the reason when qemu, the kernel or 9p support is
missing; the kernel itself is downloaded into tests/vm/.cache on first use.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.vm import harness

_VM_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if path.parent == _VM_DIR and path.name.startswith("test_vm_"):
            item.add_marker(pytest.mark.vm)


def cli() -> list[str]:
    """How to run the ``composer-numa`` CLI in the guest (the installed script when present)."""
    script = Path(sys.executable).parent / "composer-numa"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "composer_numa.cli"]


def py(*args: str) -> list[str]:
    """The host's Python running one of tests/vm/guest/*.py in the guest."""
    return [sys.executable, str(_VM_DIR / "guest" / args[0]), *args[1:]]


class Boot:
    """The results of one guest boot that ran several named checks."""

    def __init__(self, layout: harness.Layout, results: dict, vm: harness.VmResult):
        self.layout, self.results, self.vm = layout, results, vm

    def __getitem__(self, name: str) -> harness.CheckResult:
        if name not in self.results:
            pytest.skip(f"check {name!r} was not run in this boot")
        r = self.results[name]
        if r.returncode is None:
            pytest.fail(f"check {name!r} did not run: the guest stopped first\n{self.vm.describe()}")
        return r

    def ok_json(self, name: str) -> dict:
        """The JSON a check printed, failing with its output when it exited non-zero."""
        r = self[name]
        assert r.returncode == 0, r.describe()
        return r.json()


_timings: list[tuple[str, float]] = []


def boot_checks(layout: harness.Layout, checks: dict, *, timeout: float = 600,
                check_timeout: float = 240, env: dict[str, str] | None = None) -> Boot:
    """Run ``checks`` in one boot of ``layout``; skip the caller when the rig is unavailable."""
    reason = harness.unavailable_reason()
    if reason:
        pytest.skip(reason)
    guest_env = {"PYTHONPATH": str(harness.REPO)}
    if layout.gpus:
        guest_env["COMPOSER_NUMA_GPUS"] = ",".join(layout.gpu_addresses)
    guest_env.update(env or {})
    t0 = time.monotonic()
    try:
        results, vm = harness.run_checks_in_vm(layout, checks, timeout=timeout,
                                               check_timeout=check_timeout, env=guest_env)
    except harness.VmUnavailable as e:
        pytest.skip(str(e))
    _timings.append((f"{layout.name}: {', '.join(checks)}", time.monotonic() - t0))
    return Boot(layout, results, vm)


def pytest_terminal_summary(terminalreporter):
    if _timings:
        terminalreporter.write_sep("-", "VM boots")
        for what, secs in _timings:
            terminalreporter.write_line(f"{secs:6.1f}s  {what}")
