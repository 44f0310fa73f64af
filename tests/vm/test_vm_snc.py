"""Layout 2 (2 sockets x 2 sub-NUMA clusters, distances 10 / 12 / 21, a GPU stand-in on every
node): discovery and ``composer-numa exec`` in every mode, where the modes really differ.
Local rank 2 of 4 drives GPU 2 on node 2 (socket 1 = nodes 2 and 3). One boot."""

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
)
from tests.vm.harness import SNC

LAYOUT = SNC
MIB = 256
RANK = 2

GPU_NODE = LAYOUT.gpus[RANK]
NODE_CPUS = list(LAYOUT.nodes[GPU_NODE].cpus)
SOCKET = LAYOUT.socket_of(NODE_CPUS[0])
SOCKET_CPUS = [c for c in range(LAYOUT.ncpus) if LAYOUT.socket_of(c) == SOCKET]
SOCKET_NODES = sorted({LAYOUT.node_of(c) for c in SOCKET_CPUS})
ALL_CPUS = list(range(LAYOUT.ncpus))

# check -> (mode, memory policy, expected CPUs, expected policy nodes)
CASES = {
    "node-preferred": ("node", "preferred", NODE_CPUS, [GPU_NODE]),
    # socket mode prefers every node of the socket (MPOL_PREFERRED_MANY), the GPU's first
    "socket-preferred": ("socket", "preferred", SOCKET_CPUS, SOCKET_NODES),
    "exclusive-bind": ("exclusive", "bind", NODE_CPUS, [GPU_NODE]),
    # QEMU gives every vCPU its own L3 here, so the node's domain is its one CPU
    "core-complex-preferred": ("core-complex", "preferred", NODE_CPUS, [GPU_NODE]),
    "none-preferred": ("none", "preferred", ALL_CPUS, [GPU_NODE]),
    "socket-bind": ("socket", "bind", SOCKET_CPUS, SOCKET_NODES),
    "socket-interleave": ("socket", "interleave", SOCKET_CPUS, SOCKET_NODES),
}


def _checks() -> dict:
    checks = {
        "probe": py("probe.py"),
        "report": [*cli(), "report", "--format", "json", "--nproc", "4"],
    }
    for name, (mode, memory, _, _) in CASES.items():
        checks[f"exec-{name}"] = [
            *cli(), "exec", "--local-rank", str(RANK), "--nproc", "4", "--mode", mode,
            "--memory", memory, "--", *py("alloc.py", str(MIB), "--touch-from-cpu", "0")]
    return checks


@pytest.fixture(scope="module")
def boot():
    return boot_checks(LAYOUT, _checks())


def test_guest_kernel_has_the_layout(boot):
    assert_raw_matches(LAYOUT, boot.ok_json("probe")["raw"])


def test_discover_matches_layout(boot):
    out = boot.ok_json("probe")
    assert "discover_error" not in out, out.get("discover_error")
    assert_discovered_matches(LAYOUT, out["discover"])


def test_report_plans_each_rank_on_its_gpu_node(boot):
    rep = boot.ok_json("report")
    assert_report_matches(LAYOUT, rep)
    assert [(r["local_rank"], r["gpu"], r["numa_nodes"], r["cpus"]) for r in rep["plan"]] == \
        [(i, i, [n], list(LAYOUT.nodes[n].cpus)) for i, n in enumerate(LAYOUT.gpus)]
    assert "sub-numa-clustering" in {w["code"] for w in rep["warnings"]}, rep["warnings"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_exec_binding_matches_plan(boot, case):
    """Each mode gives rank 2 the CPUs the layout implies (its node, its socket, an exclusive
    share, its L3 domain, or all), and the exec'd process really has them and the policy."""
    mode, memory, cpus, nodes = CASES[case]
    assert_bound_as_planned(boot.ok_json(f"exec-{case}"), cpus=cpus, policy=memory, nodes=nodes)


@pytest.mark.parametrize("case", sorted(CASES))
def test_exec_places_pages_on_the_planned_nodes(boot, case):
    """The 256 MiB, touched from CPU 0 on the other socket, land where the policy says:
    >= 95 % on its nodes, or for interleave within 10 % of an even spread."""
    mode, memory, cpus, nodes = CASES[case]
    out = boot.ok_json(f"exec-{case}")
    if memory == "interleave":
        shares = assert_interleaved(out, nodes)
        print(f"[locality] {LAYOUT.name} exec --mode {mode} --memory {memory}: {shares}")
    else:
        frac = assert_pages_on(out, nodes)
        print(f"[locality] {LAYOUT.name} exec --mode {mode} --memory {memory}: "
              f"{frac:.4f} on nodes {nodes}")
