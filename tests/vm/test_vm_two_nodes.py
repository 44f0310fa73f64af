"""Layout 1 (two sockets, one CPU and 1 GiB each, a GPU stand-in on node 1): discovery,
raw ``numactl`` placement (the rig's own proof), ``composer-numa exec`` with every memory
policy, and late in-process binding with page migration. One boot runs every check."""

from __future__ import annotations

import pytest

from tests.vm.conftest import boot_checks, cli, py
from tests.vm.expect import (
    assert_bound_as_planned,
    assert_discovered_matches,
    assert_interleaved,
    assert_pages_on,
    assert_raw_matches,
    assert_report_matches,
    fraction_on,
)
from tests.vm.harness import TWO_NODES

LAYOUT = TWO_NODES
MIB = 256  # allocated and touched by every placement check
POLICIES = ["preferred", "bind", "interleave", "local", "none"]
NODE_POLICIES = ("preferred", "bind", "interleave")


def _checks() -> dict:
    checks = {
        "numactl-H": ["numactl", "-H"],
        "probe": py("probe.py"),
        "report": [*cli(), "report", "--format", "json"],
        "numactl-membind0": ["numactl", "--membind=0", "--", *py("alloc.py", str(MIB))],
        "numactl-membind1": ["numactl", "--membind=1", "--", *py("alloc.py", str(MIB))],
        "numactl-interleave": ["numactl", "--interleave=0,1", "--", *py("alloc.py", str(MIB))],
    }
    for pol in POLICIES:
        # Policies with nodes: first touch from node 0's CPU, so only the policy can put
        # the pages on node 1. local / none: from the rank's own CPU on node 1.
        remote = ["--touch-from-cpu", "0"] if pol in NODE_POLICIES else []
        checks[f"exec-{pol}"] = [*cli(), "exec", "--memory", pol, "--",
                                 *py("alloc.py", str(MIB), *remote)]
    checks["migrate"] = ["numactl", "--membind=0", "--", *py("migrate.py", str(MIB))]
    checks["check-kthread"] = [*cli(), "check", "--pid", "2"]  # kthreadd: no memory, no environment
    return checks


@pytest.fixture(scope="module")
def boot():
    return boot_checks(LAYOUT, _checks())


def test_numactl_sees_two_nodes(boot):
    r = boot["numactl-H"]
    assert r.returncode == 0, r.describe()
    assert "available: 2 nodes (0-1)" in r.stdout
    assert "node   0   1" in r.stdout and "0:  10  21" in r.stdout, r.stdout


def test_guest_kernel_has_the_layout(boot):
    assert_raw_matches(LAYOUT, boot.ok_json("probe")["raw"])


def test_discover_matches_layout(boot):
    out = boot.ok_json("probe")
    assert "discover_error" not in out, out.get("discover_error")
    assert_discovered_matches(LAYOUT, out["discover"])


def test_report_json_matches_layout(boot):
    rep = boot.ok_json("report")
    assert_report_matches(LAYOUT, rep)
    (rank,) = rep["plan"]
    assert rank["gpu"] == 0 and rank["numa_nodes"] == [1] and rank["cpus"] == [1], rank
    assert rank["memory_policy"] == "preferred" and rank["memory_nodes"] == [1], rank


@pytest.mark.parametrize("node", [0, 1])
def test_numactl_membind_places_pages(boot, node):
    """The counting program sees pages where numactl put them (the rig's own proof)."""
    out = boot.ok_json(f"numactl-membind{node}")
    assert out["mempolicy"] == {"mode": "bind", "nodes": [node]}, out
    assert out["map_policy"] == f"bind:{node}", out
    frac = assert_pages_on(out, [node])
    print(f"[locality] {LAYOUT.name} numactl --membind={node}: {frac:.4f} on node {node}")


def test_numactl_interleave_spreads_evenly(boot):
    out = boot.ok_json("numactl-interleave")
    assert out["mempolicy"] == {"mode": "interleave", "nodes": [0, 1]}, out
    shares = assert_interleaved(out, [0, 1])
    print(f"[locality] {LAYOUT.name} numactl --interleave=0,1: {shares}")


@pytest.mark.parametrize("policy", POLICIES)
def test_exec_binding_matches_plan(boot, policy):
    """``composer-numa exec --memory POLICY`` binds rank 0 to its GPU's node 1: the exec'd
    process has the planned affinity and, read back with get_mempolicy, the planned policy."""
    out = boot.ok_json(f"exec-{policy}")
    nodes = [1] if policy in NODE_POLICIES else []
    assert_bound_as_planned(out, cpus=[1], policy=policy, nodes=nodes)


@pytest.mark.parametrize("policy", POLICIES)
def test_exec_places_pages_on_the_planned_node(boot, policy):
    """>= 95 % of the 256 MiB the exec'd process touched are on node 1 - for preferred,
    bind and interleave (over the rank's one node) even when touched from node 0's CPU."""
    out = boot.ok_json(f"exec-{policy}")
    frac = assert_pages_on(out, [1])
    print(f"[locality] {LAYOUT.name} exec --memory {policy} (touched from CPU "
          f"{out['touched_from']}): {frac:.4f} on node 1")


def test_late_binding_migrates_pages(boot):
    """Pages first touched on node 0 are on node 1 after an in-process bind with migrate."""
    out = boot.ok_json("migrate")
    assert fraction_on(out["before"], [0]) >= 0.95, out["before"]
    assert out["applied"]["not_applied"] == [], out["applied"]
    assert out["plan"]["cpus"] == [1] and out["plan"]["memory_nodes"] == [1], out["plan"]
    assert out["affinity"] == [1] and out["mempolicy"] == {"mode": "preferred", "nodes": [1]}, out
    frac = assert_pages_on(out, [1])
    print(f"[locality] {LAYOUT.name} migrate: {fraction_on(out['before'], [0]):.4f} on node 0 "
          f"before, {frac:.4f} on node 1 after")


def test_check_of_a_kernel_thread_reports_without_a_traceback(boot):
    r = boot["check-kthread"]
    assert r.returncode == 0, r.describe()
    assert "Traceback" not in r.stderr
    assert r.stdout.startswith("process 2\n") and "binding: none exported" in r.stdout
    assert "threads:" in r.stdout
