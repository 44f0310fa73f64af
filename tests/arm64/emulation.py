"""pytest plugin for runs inside the arm64 root (``harness.py test`` loads it with ``-p``).

* registers the ``arm64`` marker (tests meant to run on aarch64, selected with ``-m arm64``);
* under qemu-user emulation (everything runs ~10x slower) loads a Hypothesis profile without
  deadlines, unless ``HYPOTHESIS_PROFILE`` names another;
* puts one line in the report header saying how the run was emulated, and what emulation lacks:
  qemu-user answers the NUMA memory-policy system calls (``set_mempolicy``, ``get_mempolicy``,
  ``mbind``, ``migrate_pages``, ``move_pages``) with ENOSYS, and ``/proc/cpuinfo`` and
  ``/sys`` are the x86-64 host's.
"""

from __future__ import annotations

import os
import platform

EMULATED = os.environ.get("COMPOSER_NUMA_ARM64_EMULATED") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "arm64: runs on aarch64 (NVIDIA Grace); selected by tests/arm64/harness.py test")
    if not EMULATED:
        return
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:
        return
    settings.register_profile("arm64-emulated", deadline=None, suppress_health_check=[HealthCheck.too_slow])
    if not os.environ.get("HYPOTHESIS_PROFILE"):
        settings.load_profile("arm64-emulated")


def pytest_report_header(config):
    how = "qemu-user emulation (NUMA mempolicy syscalls: ENOSYS; /sys and /proc/cpuinfo: the host's)" \
        if EMULATED else "native"
    return f"arm64 rig: {platform.machine()}, {how}"
