"""Optional layout (NPS4-like: 2 sockets x 4 nodes, one CPU and 256 MiB each, distances
10 / 12 / 32, GPU stand-ins on nodes 0, 2, 4, 6): discovery and the report's plan on eight
real nodes. One boot, no allocations (the nodes are small)."""

from __future__ import annotations

import pytest

from tests.vm.conftest import boot_checks, cli, py
from tests.vm.expect import assert_discovered_matches, assert_raw_matches, assert_report_matches
from tests.vm.harness import NPS4

LAYOUT = NPS4


@pytest.fixture(scope="module")
def boot():
    return boot_checks(LAYOUT, {
        "probe": py("probe.py"),
        "report": [*cli(), "report", "--format", "json", "--nproc", "4"],
        "report-socket": [*cli(), "report", "--format", "json", "--nproc", "4",
                          "--mode", "socket", "--memory", "interleave"],
    })


def test_guest_kernel_has_eight_nodes(boot):
    assert_raw_matches(LAYOUT, boot.ok_json("probe")["raw"])


def test_discover_matches_layout(boot):
    out = boot.ok_json("probe")
    assert "discover_error" not in out, out.get("discover_error")
    assert_discovered_matches(LAYOUT, out["discover"])


def test_report_plans_each_rank_on_its_gpu_node(boot):
    rep = boot.ok_json("report")
    assert_report_matches(LAYOUT, rep)
    assert [(r["gpu"], r["numa_nodes"], r["cpus"]) for r in rep["plan"]] == \
        [(i, [n], list(LAYOUT.nodes[n].cpus)) for i, n in enumerate(LAYOUT.gpus)]
    assert "sub-numa-clustering" in {w["code"] for w in rep["warnings"]}, rep["warnings"]


def test_report_socket_mode_interleaves_over_the_socket(boot):
    rep = boot.ok_json("report-socket")
    for r in rep["plan"]:
        socket = LAYOUT.socket_of(LAYOUT.nodes[LAYOUT.gpus[r["gpu"]]].cpus[0])
        cpus = [c for c in range(LAYOUT.ncpus) if LAYOUT.socket_of(c) == socket]
        assert r["cpus"] == cpus, r
        assert r["memory_policy"] == "interleave", r
        assert r["memory_nodes"] == sorted({LAYOUT.node_of(c) for c in cpus}), r
