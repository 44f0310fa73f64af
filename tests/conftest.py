"""Fixtures shared by every test: warnings reported afresh, recorded machines built on demand.

A plain ``pytest`` is the fast suite: the QEMU tests (marker ``vm``, ~20 minutes) run only when
asked for, by naming them (``pytest tests/vm``, ``pytest tests/vm/test_vm_snc.py``), by a marker
expression that mentions them (``pytest -m vm``), or with ``COMPOSER_NUMA_VM=1``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from composer_numa import diagnostics
from tests.fakesys import build_tree
from tests.fixtures import SPECS


@pytest.fixture(autouse=True)
def fresh_warnings():
    """Each test sees every warning again (composer-numa reports each once per process)."""
    diagnostics.forget_emitted()
    yield
    diagnostics.forget_emitted()


@pytest.fixture
def tree(tmp_path):
    """Build a fake sysfs/procfs tree: ``tree(spec_or_name) -> (sysfs_root, proc_root)``."""
    count = 0

    def build(spec: dict | str) -> tuple[str, str]:
        nonlocal count
        count += 1
        return build_tree(tmp_path / f"tree{count}", SPECS[spec] if isinstance(spec, str) else spec)

    return build


_VM_DIR = Path(__file__).resolve().parent / "vm"


def _vm_asked_for(config: pytest.Config) -> bool:
    if os.environ.get("COMPOSER_NUMA_VM", "").strip().lower() in ("1", "yes", "true", "on"):
        return True
    if "vm" in (config.getoption("markexpr", "") or ""):
        return True  # -m vm, -m "vm and slow", or -m "not vm" (which deselects them itself)
    for arg in config.args:
        path = Path(config.invocation_params.dir, arg.split("::")[0]).resolve()
        if path == _VM_DIR or _VM_DIR in path.parents:
            return True
    return False


#: Whole files that must pass on aarch64 too (pure Python: planner, discovery, reports, the CLI's report
#: and process checks); ``harness.py test`` runs ``-m arm64`` under qemu-user emulation. Tests elsewhere
#: (the extension's kernels) carry ``@pytest.mark.arm64`` themselves.
_ARM64_FILES = ("test_plan.py", "machine/", "report/", "cli/test_cli.py")
_TESTS_DIR = Path(__file__).resolve().parent


def pytest_itemcollected(item: pytest.Item) -> None:
    """Marks the tests of ``_ARM64_FILES`` (before ``-m`` selects, which happens after collection)."""
    path = Path(str(item.path)).resolve()
    if _TESTS_DIR not in path.parents:
        return
    rel = path.relative_to(_TESTS_DIR).as_posix()
    if any(rel == f or (f.endswith("/") and rel.startswith(f)) for f in _ARM64_FILES):
        item.add_marker(pytest.mark.arm64)


@pytest.hookimpl(trylast=True)  # after tests/vm/conftest.py has marked its tests
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _vm_asked_for(config):
        return
    vm = [item for item in items if item.get_closest_marker("vm") is not None]
    if vm:
        config.hook.pytest_deselected(items=vm)
        items[:] = [item for item in items if item.get_closest_marker("vm") is None]
        config.stash[_VM_LEFT_OUT] = len(vm)


_VM_LEFT_OUT = pytest.StashKey[int]()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.cuda`` tests skip, saying why, where torch sees no CUDA device (torch is
    imported only for them)."""
    if item.get_closest_marker("cuda") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device (torch.cuda.is_available() is False); tests/cuda_checks.sh runs these")


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    left_out = config.stash.get(_VM_LEFT_OUT, 0)
    if left_out:
        terminalreporter.write_line(f"{left_out} VM tests (QEMU guests) not run: `pytest -m vm` runs them")
