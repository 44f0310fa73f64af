"""Layout 4 (node 1, with the GPU stand-in, has only 512 MiB): the seeds' failure - a strict
``numactl --membind`` of a job bigger than the node - reproduced, and avoided by
``composer-numa exec --memory bind --memory-need 1G``, which falls back to ``preferred``,
warns ``node-memory-insufficient`` and lets the job finish. One boot."""

from __future__ import annotations

import pytest

from tests.vm.conftest import boot_checks, cli, py
from tests.vm.expect import assert_discovered_matches, assert_raw_matches, fraction_on
from tests.vm.harness import SMALL_NODE

LAYOUT = SMALL_NODE
NEED_MIB = 1024


def _checks() -> dict:
    checks = {
        "probe": py("probe.py"),
        "numactl-membind1": ["numactl", "--membind=1", "--", *py("alloc.py", str(NEED_MIB))],
    }
    checks["exec-bind-need"] = [*cli(), "exec", "--memory", "bind", "--memory-need", "1G",
                                "--", *py("alloc.py", str(NEED_MIB))]
    return checks


@pytest.fixture(scope="module")
def boot():
    return boot_checks(LAYOUT, _checks())


def test_guest_kernel_has_the_small_node(boot):
    out = boot.ok_json("probe")
    assert_raw_matches(LAYOUT, out["raw"])
    assert "discover_error" not in out, out.get("discover_error")
    assert_discovered_matches(LAYOUT, out["discover"])


def test_numactl_membind_of_a_too_big_job_fails(boot):
    """The seeds' failure: the bound process cannot get 1 GiB from a 512 MiB node."""
    r = boot["numactl-membind1"]
    assert r.returncode != 0, r.describe()
    assert r.returncode in (1, 137) or "MemoryError" in r.stderr, r.describe()  # OOM-killed / error
    assert '"pages"' not in r.stdout, "the allocation completed on a node that cannot hold it"


def test_exec_with_memory_need_falls_back_and_completes(boot):
    r = boot["exec-bind-need"]
    assert r.returncode == 0, r.describe()
    assert "node-memory-insufficient" in r.stderr, r.stderr
    out = r.json()
    b = out["binding"]
    assert (b["memory_policy"], b["memory_nodes"]) == ("preferred", [1]), b
    assert out["mempolicy"] == {"mode": "preferred", "nodes": [1]}, out
    assert out["affinity"] == [1], out
    resident = sum(out["pages"].values())
    assert resident >= 0.99 * out["expected_pages"], out
    # preferred fills the small node first, then spills to node 0
    on1 = fraction_on(out["pages"], [1])
    assert on1 >= 0.3, out["pages"]
    print(f"[locality] {LAYOUT.name} exec --memory bind --memory-need 1G: {on1:.4f} on node 1, "
          f"{1 - on1:.4f} spilled to node 0")
