"""Fixtures shared by every test: warnings reported afresh, recorded machines built on demand."""

from __future__ import annotations

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
