"""The rank planner, on topologies built directly (no sysfs): exact splits for
known machines, every warning, bad options, and properties over random machines."""

from __future__ import annotations

import builtins
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from composer_numa.errors import ComposerNumaError, PlanError
from composer_numa.machine.topology import Cpu, Node, Topology
from composer_numa.plan import MemoryPolicy, Mode, Plan, PlanOptions, RankPlan, plan
from tests.topo_factory import GiB, make_topology


def run(topo: Topology, **kw) -> Plan:
    return plan(topo, PlanOptions(**kw))


def codes(p: Plan) -> list[str]:
    return [w.code for w in p.warnings]


def span(lo: int, hi: int, offset: int | None = None) -> tuple[int, ...]:
    """CPUs lo..hi-1, plus the same range shifted by ``offset`` (the SMT siblings)."""
    out = list(range(lo, hi))
    if offset is not None:
        out += range(lo + offset, hi + offset)
    return tuple(sorted(out))


# --- two sockets, GPUs 4/4 ------------------------------------------------------

TWO_SOCKET = dict(sockets=2, cores_per_node=16, smt=2, gpus=[0] * 4 + [1] * 4)


def test_two_sockets_node_mode():
    p = run(make_topology(**TWO_SOCKET), nproc=8)
    assert p.warnings == ()
    for r in p.ranks:
        node = 0 if r.local_rank < 4 else 1
        assert r.gpu == r.local_rank
        assert r.gpu_pci_bus_id == f"0000:{0x10 + r.local_rank:02x}:00.0"
        assert r.numa_nodes == (node,)
        assert r.cpus == span(16 * node, 16 * node + 16, 32)
        assert r.memory_policy is MemoryPolicy.PREFERRED
        assert r.memory_nodes == (node,)
        assert r.num_threads == 4  # 16 cores shared by 4 ranks


def test_two_sockets_exclusive():
    p = run(make_topology(**TWO_SOCKET), nproc=8, mode=Mode.EXCLUSIVE)
    assert [r.cpus for r in p.ranks] == [
        span(0, 4, 32), span(4, 8, 32), span(8, 12, 32), span(12, 16, 32),
        span(16, 20, 32), span(20, 24, 32), span(24, 28, 32), span(28, 32, 32),
    ]
    assert {r.num_threads for r in p.ranks} == {4}
    assert p.warnings == ()


def test_two_sockets_socket_mode_equals_node_mode_without_snc():
    topo = make_topology(**TWO_SOCKET)
    assert run(topo, nproc=8, mode="socket").ranks == run(topo, nproc=8).ranks


# --- NPS4-like: 2 sockets x 4 nodes, 2 GPUs per node, SMT ---------------------------

NPS4 = dict(sockets=2, nodes_per_socket=4, cores_per_node=8, smt=2, l3_per_node=2,
            gpus=[n for n in range(8) for _ in range(2)])


def test_nps4_exclusive_split():
    p = run(make_topology(**NPS4), nproc=16, mode="exclusive")
    for n in range(8):
        a, b = p.ranks[2 * n], p.ranks[2 * n + 1]
        assert a.cpus == span(8 * n, 8 * n + 4, 64)
        assert b.cpus == span(8 * n + 4, 8 * n + 8, 64)
        assert a.numa_nodes == b.numa_nodes == (n,)
        assert a.num_threads == b.num_threads == 4
        assert a.memory_nodes == b.memory_nodes == (n,)
    assert codes(p) == ["sub-numa-clustering"]
    assert "8 NUMA nodes" in p.warnings[0].message and "2 socket" in p.warnings[0].message


def test_nps4_core_complex_split():
    p = run(make_topology(**NPS4), nproc=16, mode=Mode.CORE_COMPLEX)
    for n in range(8):
        assert p.ranks[2 * n].cpus == span(8 * n, 8 * n + 4, 64)
        assert p.ranks[2 * n + 1].cpus == span(8 * n + 4, 8 * n + 8, 64)
    # four 2-core CCXs per node: each rank gets its own, the other two stay free
    p = run(make_topology(**{**NPS4, "l3_per_node": 4}), nproc=16, mode="core-complex")
    for n in range(8):
        assert p.ranks[2 * n].cpus == span(8 * n, 8 * n + 2, 64)
        assert p.ranks[2 * n + 1].cpus == span(8 * n + 2, 8 * n + 4, 64)
        assert p.ranks[2 * n].num_threads == 2


def test_nps4_socket_mode_and_memory_policies():
    topo = make_topology(**NPS4)
    p = run(topo, nproc=16, mode="socket", memory="interleave")
    for r in p.ranks:
        s = 0 if r.local_rank < 8 else 1
        assert r.cpus == span(32 * s, 32 * s + 32, 64)
        assert r.numa_nodes == tuple(range(4 * s, 4 * s + 4))
        assert r.memory_policy is MemoryPolicy.INTERLEAVE
        assert r.memory_nodes == tuple(range(4 * s, 4 * s + 4))
        assert r.num_threads == 4  # 32 cores, 8 ranks on the socket
    p = run(topo, nproc=16, mode="socket", memory="preferred")  # MPOL_PREFERRED_MANY, home first
    assert [r.memory_nodes for r in p.ranks] == [
        (r // 2, *sorted(set(range(4 * (r // 8), 4 * (r // 8) + 4)) - {r // 2})) for r in range(16)]
    p = run(topo, nproc=16, mode="node", memory="preferred")
    assert [r.memory_nodes for r in p.ranks] == [(r // 2,) for r in range(16)]
    p = run(topo, nproc=16, mode="socket", memory="bind")
    assert p.ranks[3].memory_nodes == (0, 1, 2, 3)
    p = run(topo, nproc=16, memory="local")
    assert p.ranks[3].memory_policy is MemoryPolicy.LOCAL and p.ranks[3].memory_nodes == ()
    p = run(topo, nproc=16, memory="none")
    assert p.ranks[3].memory_policy is MemoryPolicy.NONE and p.ranks[3].memory_nodes == ()


def test_exclusive_remainder_goes_to_lowest_ranks():
    p = run(make_topology(cores_per_node=8, smt=2, gpus=[0, 0, 0]), nproc=3, mode="exclusive")
    assert [r.cpus for r in p.ranks] == [span(0, 3, 8), span(3, 6, 8), span(6, 8, 8)]
    assert [r.num_threads for r in p.ranks] == [3, 3, 2]


def test_core_complex_larger_domains_first_and_wrapping():
    # CCX 0 = cores 0-3 loses core 0 to the cpuset, so CCX 1 (cores 4-7) is larger.
    topo = make_topology(cores_per_node=8, l3_per_node=2, gpus=[0, 0, 0],
                         allowed_cpus=range(1, 8))
    p = run(topo, nproc=3, mode="core-complex")
    assert [r.cpus for r in p.ranks] == [(4, 5, 6, 7), (1, 2, 3), (4, 5, 6, 7)]
    assert [r.num_threads for r in p.ranks] == [2, 3, 2]
    assert p.warnings == ()


# --- GPU order is not node order ----------------------------------------------------


def test_gpus_in_reverse_node_order():
    topo = make_topology(sockets=2, cores_per_node=4, gpus=[1, 1, 0, 0])
    p = run(topo, nproc=4, mode="exclusive", memory="bind")
    assert [r.cpus for r in p.ranks] == [(4, 5), (6, 7), (0, 1), (2, 3)]
    assert [r.numa_nodes for r in p.ranks] == [(1,), (1,), (0,), (0,)]
    assert [r.memory_nodes for r in p.ranks] == [(1,), (1,), (0,), (0,)]
    assert [r.gpu for r in p.ranks] == [0, 1, 2, 3]


# --- Grace-Hopper-like: GPUs on CPU-less memory nodes ---------------------------------


def test_grace_hopper_single():
    # node 0: 72 Grace cores + LPDDR; node 1: the GPU's HBM; nodes 2-3: empty (MIG) nodes
    topo = make_topology(cores_per_node=72, mem_total=480 * GiB, gpus=[1],
                         memory_nodes=[(0, 96 * GiB), (0, 0), (0, 0)])
    for memory in ("preferred", "bind", "interleave"):
        p = run(topo, nproc=1, memory=memory)
        (r,) = p.ranks
        assert r.cpus == tuple(range(72))
        assert r.numa_nodes == (0,)
        assert r.memory_nodes == (0,)
        assert r.num_threads == 72
        assert p.warnings == ()


def test_grace_hopper_two_superchips():
    topo = make_topology(sockets=2, cores_per_node=72, gpus=[3, 2],
                         memory_nodes=[(0, 96 * GiB), (1, 96 * GiB)])
    p = run(topo, nproc=2, mode="exclusive")
    assert [r.numa_nodes for r in p.ranks] == [(1,), (0,)]
    assert p.ranks[0].cpus == tuple(range(72, 144))
    assert [r.memory_nodes for r in p.ranks] == [(1,), (0,)]
    assert p.warnings == ()
    # CPU-only ranks never land on the CPU-less nodes
    p = run(make_topology(sockets=2, cores_per_node=4, memory_nodes=[(0, GiB), (1, GiB)]),
            nproc=4)
    assert [r.numa_nodes for r in p.ranks] == [(0,), (0,), (1,), (1,)]


def test_cpuless_gpu_node_whose_cpu_node_is_excluded():
    topo = make_topology(sockets=2, cores_per_node=4, gpus=[2], memory_nodes=[(0, GiB)],
                         allowed_cpus=range(4, 8))
    p = run(topo, nproc=1)
    assert p.ranks[0].cpus == (4, 5, 6, 7)
    assert codes(p) == ["cpuset-excludes-gpu-node"]
    assert "its nearest CPU node is 0" in p.warnings[0].message


# --- unknown GPU node ---------------------------------------------------------------


def test_unknown_gpu_node_on_multi_node_host():
    topo = make_topology(sockets=2, cores_per_node=4, gpus=[0, None])
    p = run(topo, nproc=2, memory="bind")
    assert p.ranks[0].cpus == (0, 1, 2, 3) and p.ranks[0].memory_policy is MemoryPolicy.BIND
    r = p.ranks[1]
    assert r.cpus == tuple(range(8))
    assert r.numa_nodes == (0, 1)
    assert r.memory_policy is MemoryPolicy.NONE and r.memory_nodes == ()
    assert r.num_threads == 8
    assert codes(p) == ["gpu-numa-unknown"]
    assert "GPU 1" in p.warnings[0].message and "0000:11:00.0" in p.warnings[0].message


def test_unknown_gpu_nodes_get_exclusive_slices_of_allowed_cores():
    topo = make_topology(sockets=2, cores_per_node=4, smt=2, gpus=[None, None])
    p = run(topo, nproc=2, mode="exclusive")
    assert [r.cpus for r in p.ranks] == [span(0, 4, 8), span(4, 8, 8)]
    assert codes(p) == ["gpu-numa-unknown", "gpu-numa-unknown"]  # one per GPU


def test_gpu_on_a_node_that_does_not_exist():
    p = run(make_topology(sockets=2, gpus=[7]), nproc=1)
    assert codes(p) == ["gpu-numa-unknown"] and "node 7" in p.warnings[0].message
    assert p.ranks[0].memory_policy is MemoryPolicy.NONE


def test_unknown_gpu_node_on_single_node_host_is_that_node():
    p = run(make_topology(cores_per_node=4, gpus=[None, 3]), nproc=2)
    assert p.warnings == ()
    assert [r.numa_nodes for r in p.ranks] == [(0,), (0,)]
    assert [r.memory_nodes for r in p.ranks] == [(0,), (0,)]


# --- cpusets --------------------------------------------------------------------------


def test_cpuset_excludes_gpu_node():
    topo = make_topology(sockets=2, cores_per_node=4, gpus=[0, 1], allowed_cpus=range(4))
    p = run(topo, nproc=2)
    assert [r.cpus for r in p.ranks] == [(0, 1, 2, 3)] * 2
    assert [r.num_threads for r in p.ranks] == [2, 2]
    assert codes(p) == ["cpuset-excludes-gpu-node"]
    msg = str(p.warnings[0])
    assert "GPU 1 is on node 1" in msg and "uses node 0" in msg
    p = run(topo, nproc=2, mode="exclusive")
    assert [r.cpus for r in p.ranks] == [(0, 1), (2, 3)]
    assert [r.num_threads for r in p.ranks] == [2, 2]


def test_cpuset_fallback_prefers_the_less_loaded_of_equally_near_nodes():
    dist = [[10, 20, 30], [20, 10, 20], [30, 20, 10]]
    allowed = [0, 1, 4, 5]  # nodes 0 and 2
    topo = make_topology(sockets=3, cores_per_node=2, gpus=[0, 1], distances=dist,
                         allowed_cpus=allowed)
    assert [r.numa_nodes for r in run(topo, nproc=2).ranks] == [(0,), (2,)]
    topo = make_topology(sockets=3, cores_per_node=2, gpus=[1], distances=dist,
                         allowed_cpus=allowed)
    assert run(topo, nproc=1).ranks[0].numa_nodes == (0,)  # tie: lowest id


def test_cpuset_excludes_gpu_node_memory():
    topo = make_topology(sockets=2, cores_per_node=4, gpus=[0, 1], allowed_mems=[0])
    p = run(topo, nproc=2, memory="bind")
    assert p.ranks[1].cpus == (4, 5, 6, 7)
    assert [r.memory_nodes for r in p.ranks] == [(0,), (0,)]
    assert codes(p) == ["cpuset-excludes-gpu-node"]
    assert "memory" in p.warnings[0].message and "node 1" in p.warnings[0].message


def test_empty_allowed_sets_mean_unrestricted():
    topo = make_topology(sockets=2, cores_per_node=2, gpus=[1])
    topo = Topology(nodes=topo.nodes, cpus=topo.cpus, gpus=topo.gpus)
    (r,) = run(topo, nproc=1).ranks
    assert r.cpus == (2, 3) and r.memory_nodes == (1,)


def test_allowed_cpus_none_online_is_an_error():
    topo = make_topology(cores_per_node=2)
    topo = Topology(nodes=topo.nodes, cpus=topo.cpus, allowed_cpus=(50, 51))
    with pytest.raises(PlanError, match="50-51"):
        run(topo, nproc=1)
    with pytest.raises(PlanError, match="no online CPUs"):
        plan(Topology(nodes=(Node(0, (), GiB, GiB, (10,)),), cpus=()), PlanOptions())


# --- memory-less nodes --------------------------------------------------------------


def test_memoryless_cpu_node_uses_nearest_memory_node():
    topo = make_topology(sockets=2, nodes_per_socket=2, cores_per_node=2, memoryless=[1],
                         gpus=[1])
    for memory in ("preferred", "bind", "interleave"):
        p = run(topo, nproc=1, memory=memory)
        assert p.ranks[0].numa_nodes == (1,)
        assert p.ranks[0].memory_nodes == (0,)  # same socket: distance 12, not 32
        assert "cpuset-excludes-gpu-node" not in codes(p)


def test_no_allowed_node_has_memory():
    p = run(make_topology(sockets=2, mem_total=0, gpus=[0]), nproc=1, memory="bind")
    assert p.ranks[0].memory_policy is MemoryPolicy.NONE and p.ranks[0].memory_nodes == ()
    assert codes(p) == ["node-memory-insufficient"]


# --- CPU-only ranks -------------------------------------------------------------------


@pytest.mark.parametrize("nproc, nodes", [
    (1, [0]), (2, [0, 1]), (3, [0, 0, 1]), (4, [0, 0, 1, 1]), (5, [0, 0, 0, 1, 1]),
])
def test_cpu_only_ranks_spread_in_blocks(nproc, nodes):
    p = run(make_topology(sockets=2, cores_per_node=4), nproc=nproc)
    assert [r.numa_nodes for r in p.ranks] == [(n,) for n in nodes]
    assert all(r.gpu is None and r.gpu_pci_bus_id is None for r in p.ranks)
    assert all(r.memory_nodes == r.numa_nodes for r in p.ranks)
    assert "more-ranks-than-gpus" not in codes(p)


def test_cpu_only_exclusive_and_threads():
    topo = make_topology(sockets=2, cores_per_node=4)
    p = run(topo, nproc=4, mode="exclusive")
    assert [r.cpus for r in p.ranks] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    p = run(topo, nproc=4)
    assert [r.num_threads for r in p.ranks] == [2, 2, 2, 2]


def test_cpu_only_ranks_skip_nodes_outside_the_cpuset():
    p = run(make_topology(sockets=2, cores_per_node=4, allowed_cpus=[5, 6]), nproc=3)
    assert [r.cpus for r in p.ranks] == [(5, 6)] * 3
    assert "cpuset-excludes-gpu-node" not in codes(p)


# --- warnings -------------------------------------------------------------------------


def test_sub_numa_clustering_only_with_more_nodes_than_sockets():
    assert "sub-numa-clustering" in codes(run(make_topology(nodes_per_socket=2), nproc=1))
    assert "sub-numa-clustering" not in codes(run(make_topology(sockets=2), nproc=1))
    msg = str(run(make_topology(nodes_per_socket=2), nproc=1).warnings[0])
    assert "memory" in msg and "copies" in msg


def test_numa_balancing_warning():
    p = run(make_topology(numa_balancing=True), nproc=1)
    assert codes(p) == ["numa-balancing-enabled"]
    assert "sysctl kernel.numa_balancing=0" in str(p.warnings[0])
    assert run(make_topology(numa_balancing=None), nproc=1).warnings == ()


def test_more_ranks_than_gpus_wraps():
    p = run(make_topology(sockets=2, cores_per_node=4, gpus=[0, 1]), nproc=4)
    assert codes(p) == ["more-ranks-than-gpus"]
    assert [r.gpu for r in p.ranks] == [0, 1, 0, 1]
    assert [r.numa_nodes for r in p.ranks] == [(0,), (1,), (0,), (1,)]
    assert [r.num_threads for r in p.ranks] == [2, 2, 2, 2]


def test_too_few_cores_exclusive_round_robin():
    p = run(make_topology(cores_per_node=2, smt=2), nproc=3, mode="exclusive")
    assert [r.cpus for r in p.ranks] == [(0, 2), (1, 3), (0, 2)]
    assert [r.num_threads for r in p.ranks] == [1, 1, 1]
    assert codes(p) == ["too-few-cores"]
    assert "3 ranks" in p.warnings[0].message and "2 allowed physical core" in p.warnings[0].message


def test_too_few_cores_shared_set():
    p = run(make_topology(cores_per_node=2, smt=2), nproc=3)
    assert codes(p) == ["too-few-cores"]
    assert [r.num_threads for r in p.ranks] == [1, 1, 1]


def test_too_few_cores_overall():
    # rank 0 (unknown node) takes both cores, ranks 1 and 2 one each: no set is
    # oversubscribed by itself, but 3 ranks on 2 cores are
    topo = make_topology(sockets=2, cores_per_node=1, gpus=[None, 0, 1])
    p = run(topo, nproc=3)
    assert codes(p) == ["gpu-numa-unknown", "too-few-cores"]
    assert "3 ranks but only 2 allowed physical core" in p.warnings[1].message


def test_bind_falls_back_to_preferred_when_the_node_is_too_small():
    topo = make_topology(sockets=2, gpus=[1], mem_total=256 * GiB, mem_free=250 * GiB)
    p = run(topo, nproc=1, memory="bind", memory_need=380 * GiB)
    assert p.ranks[0].memory_policy is MemoryPolicy.PREFERRED
    assert p.ranks[0].memory_nodes == (1,)
    assert codes(p) == ["node-memory-insufficient"]
    (diag,) = p.warnings
    assert diag.message == ("rank 0 needs 380.0 GiB; node 1 would have to hold 380.0 GiB but has "
                            "250.0 GiB available")
    assert diag.outcome == "a strict bind would run out of memory, so the policy is preferred instead"
    ok = run(topo, nproc=1, memory="bind", memory_need=200 * GiB)
    assert ok.ranks[0].memory_policy is MemoryPolicy.BIND and ok.warnings == ()


def test_preferred_warns_but_stays_preferred():
    topo = make_topology(sockets=2, gpus=[1], mem_free=10 * GiB)
    p = run(topo, nproc=1, memory_need="20G")
    assert p.ranks[0].memory_policy is MemoryPolicy.PREFERRED
    assert codes(p) == ["node-memory-insufficient"] and "spills" in str(p.warnings[0])


def test_memory_needs_of_ranks_sharing_a_node_add_up():
    topo = make_topology(sockets=2, gpus=[0, 0, 1], mem_free=64 * GiB)
    p = run(topo, nproc=3, memory="bind", memory_need=40 * GiB)
    assert [r.memory_policy for r in p.ranks] == [MemoryPolicy.PREFERRED] * 2 + [MemoryPolicy.BIND]
    assert codes(p) == ["node-memory-insufficient"]
    assert "ranks 0-1" in p.warnings[0].message and "80.0 GiB" in p.warnings[0].message


def test_interleave_capacity_counts_every_node_of_the_set():
    topo = make_topology(**NPS4, mem_free=64 * GiB)
    # 8 ranks per socket x 30 GiB = 240 GiB over 4 x 64 GiB: fits
    assert run(topo, nproc=16, mode="socket", memory="interleave",
               memory_need=30 * GiB).warnings[1:] == ()
    p = run(topo, nproc=16, mode="socket", memory="interleave", memory_need=40 * GiB)
    assert codes(p) == ["sub-numa-clustering", "node-memory-insufficient",
                        "node-memory-insufficient"]
    assert all(r.memory_policy is MemoryPolicy.INTERLEAVE for r in p.ranks)
    assert "nodes 0-3" in p.warnings[1].message


def test_zero_memory_need_checks_nothing():
    topo = make_topology(gpus=[0], mem_free=0)
    assert run(topo, nproc=1, memory="bind", memory_need=0).warnings == ()


def test_warnings_deduplicated_in_stable_order():
    topo = make_topology(sockets=2, nodes_per_socket=2, cores_per_node=1, gpus=[None],
                         numa_balancing=True)
    p = run(topo, nproc=6)
    assert codes(p) == ["sub-numa-clustering", "numa-balancing-enabled", "more-ranks-than-gpus",
                        "gpu-numa-unknown", "too-few-cores"]
    assert p == run(topo, nproc=6)


# --- options --------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(nproc=0), "nproc must be between 1 and 65536, got 0"),
    (dict(nproc=-2), "nproc must be between 1 and 65536"),
    (dict(nproc=10**30), "nproc must be between 1 and 65536"),
    (dict(nproc=True), "nproc must be an integer"),
    (dict(nproc=1.5), "nproc must be an integer"),
    (dict(memory_need=-1), "memory_need must be between 0 and 16 EiB"),
    (dict(memory_need="9" * 400), "larger than 16 EiB"),
    (dict(memory_target="gpu"), "unknown memory target 'gpu'; valid: local, hbm"),
    (dict(memory_need="lots"), "invalid size 'lots'"),
    (dict(memory_need=1.5), "memory_need must be a number of bytes"),
    (dict(mode="bogus"), "unknown mode 'bogus'; valid: node, socket, exclusive, core-complex"),
    (dict(memory="strict"), "unknown memory policy 'strict'; valid: preferred, bind"),
])
def test_bad_options(kw, match):
    with pytest.raises(PlanError, match=match) as exc:
        run(make_topology(), **kw)
    assert "\n" not in str(exc.value)
    assert isinstance(exc.value, ComposerNumaError)


def test_string_options_are_coerced():
    p = run(make_topology(cores_per_node=4, gpus=[0, 0]), nproc=2, mode="Core_Complex",
            memory="BIND", memory_need="1G")
    assert p.options == PlanOptions(nproc=2, mode=Mode.CORE_COMPLEX, memory=MemoryPolicy.BIND,
                                    memory_need=1 << 30)
    assert plan(make_topology()).options == PlanOptions()


def test_mode_none_keeps_all_cpus_but_names_the_home_node():
    topo = make_topology(sockets=2, cores_per_node=2, gpus=[1])
    (r,) = run(topo, nproc=1, mode="none").ranks
    assert r.cpus == (0, 1, 2, 3) and r.numa_nodes == (1,) and r.memory_nodes == (1,)
    assert r.num_threads == 4


def test_rank_plan_json_round_trip():
    p = run(make_topology(**NPS4), nproc=2, mode="exclusive")
    d = p.ranks[1].to_json()
    assert list(d) == ["local_rank", "gpu", "gpu_pci_bus_id", "numa_nodes", "cpus",
                       "memory_policy", "memory_nodes", "num_threads"]
    assert d["memory_policy"] == "preferred" and isinstance(d["cpus"], list)
    assert RankPlan.from_json(json.dumps(d)) == p.ranks[1]


def test_planner_does_no_io(monkeypatch):
    topo = make_topology(**NPS4, numa_balancing=True)

    def refuse(*a, **k):
        raise AssertionError("the planner must not do I/O")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr("os.open", refuse)
    monkeypatch.setattr("os.environ", {})
    p = run(topo, nproc=16, mode="exclusive", memory="bind", memory_need=GiB)
    assert len(p.ranks) == 16


def test_hand_built_topology_without_factory():
    # one node, two SMT cores, CPU-less node 1 hanging a GPU
    cpus = tuple(Cpu(i, 0, 0, i % 2, (i % 2, i % 2 + 2), (0, 1, 2, 3)) for i in range(4))
    nodes = (Node(0, (0, 1, 2, 3), GiB, GiB, (10, 40)), Node(1, (), GiB, GiB, (40, 10)))
    from composer_numa.machine.topology import Gpu
    topo = Topology(nodes=nodes, cpus=cpus, gpus=(Gpu(0, None, "nvidia", 1),))
    (r,) = run(topo, nproc=1, mode="exclusive").ranks
    assert r.cpus == (0, 1, 2, 3) and r.num_threads == 2 and r.gpu_pci_bus_id is None


# --- properties over random machines ------------------------------------------------


@st.composite
def machines(draw):
    sockets = draw(st.integers(1, 3))
    nps = draw(st.integers(1, 3))
    cores = draw(st.sampled_from([1, 2, 4, 6, 8]))
    smt = draw(st.integers(1, 2))
    l3 = draw(st.sampled_from([d for d in (1, 2, 3) if cores % d == 0]))
    n_cpu = sockets * nps
    memory_nodes = draw(st.lists(
        st.tuples(st.integers(0, n_cpu - 1), st.sampled_from([0, 16 * GiB])), max_size=2))
    n_all = n_cpu + len(memory_nodes)
    memoryless = draw(st.lists(st.integers(0, n_cpu - 1), unique=True, max_size=n_cpu))
    gpus = draw(st.lists(st.one_of(st.none(), st.integers(0, n_all)), max_size=6))
    n_threads = n_cpu * cores * smt
    allowed = draw(st.sets(st.integers(0, n_threads - 1), min_size=1))
    mems = draw(st.sets(st.integers(0, n_all - 1), min_size=1))
    return make_topology(
        sockets=sockets, nodes_per_socket=nps, cores_per_node=cores, smt=smt, l3_per_node=l3,
        gpus=gpus, memory_nodes=memory_nodes, memoryless=memoryless,
        mem_free=draw(st.sampled_from([4 * GiB, 64 * GiB])),
        allowed_cpus=sorted(allowed), allowed_mems=sorted(mems),
        numa_balancing=draw(st.sampled_from([None, False, True])),
    )


options = st.builds(
    PlanOptions,
    nproc=st.integers(1, 10),
    mode=st.sampled_from(list(Mode)),
    memory=st.sampled_from(list(MemoryPolicy)),
    memory_need=st.sampled_from([None, 0, 8 * GiB, 100 * GiB]),
)


def _unknown(topo: Topology, gpu: int | None) -> bool:
    if gpu is None or len(topo.nodes) == 1:
        return False
    node = topo.gpus[gpu].numa_node
    return node is None or node not in {n.id for n in topo.nodes}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topo=machines(), opts=options)
def test_plan_properties(topo, opts):
    p = plan(topo, opts)
    assert p == plan(topo, opts)  # deterministic
    assert len(p.ranks) == opts.nproc
    assert len(set(p.warnings)) == len(p.warnings)
    allowed = set(topo.allowed_cpus)
    cpu_nodes = {n.id for n in topo.cpu_nodes}
    by_id = {c.id: c for c in topo.cpus}
    for r in p.ranks:
        assert r.cpus and set(r.cpus) <= allowed
        assert list(r.cpus) == sorted(set(r.cpus))
        assert r.numa_nodes and set(r.numa_nodes) <= cpu_nodes
        assert r.num_threads >= 1
        for c in r.cpus:  # SMT siblings stay together (every mode keeps whole cores)
            assert set(by_id[c].siblings) & allowed <= set(r.cpus)
        for m in r.memory_nodes:
            assert m in topo.allowed_mems and topo.node(m).has_memory
        if r.memory_policy is MemoryPolicy.PREFERRED and opts.mode is not Mode.SOCKET:
            assert len(r.memory_nodes) == 1
        elif r.memory_policy is MemoryPolicy.PREFERRED:  # every node of the socket, the nearest first
            assert r.memory_nodes and len(set(r.memory_nodes)) == len(r.memory_nodes)
        elif r.memory_policy in (MemoryPolicy.LOCAL, MemoryPolicy.NONE):
            assert r.memory_nodes == ()
        else:
            assert r.memory_nodes
        if _unknown(topo, r.gpu):
            assert r.memory_policy is MemoryPolicy.NONE
            assert "gpu-numa-unknown" in codes(p)
        if opts.memory is MemoryPolicy.BIND and r.memory_policy is MemoryPolicy.PREFERRED:
            assert "node-memory-insufficient" in codes(p)
        if opts.mode is not Mode.NONE:
            assert r.numa_nodes == tuple(sorted({topo.cpu(c).node for c in r.cpus}))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topo=machines(), nproc=st.integers(2, 8))
def test_exclusive_ranks_never_overlap(topo, nproc):
    p = plan(topo, PlanOptions(nproc=nproc, mode=Mode.EXCLUSIVE))
    allowed = set(topo.allowed_cpus)
    by_id = {c.id: c for c in topo.cpus}
    known = [r for r in p.ranks if not _unknown(topo, r.gpu)]
    per_node: dict[int, int] = {}
    for r in known:
        assert len(r.numa_nodes) == 1
        per_node[r.numa_nodes[0]] = per_node.get(r.numa_nodes[0], 0) + 1
    enough = all(
        n <= len({by_id[c].core_key for c in topo.node(node).cpus if c in allowed})
        for node, n in per_node.items()
    )
    if not enough:
        assert "too-few-cores" in codes(p)
    if "too-few-cores" not in codes(p):  # every rank, those whose GPU's node is unknown included
        for i, a in enumerate(p.ranks):
            for b in p.ranks[i + 1:]:
                assert not set(a.cpus) & set(b.cpus), (a, b)
    for r in p.ranks:
        for c in r.cpus:
            assert set(by_id[c].siblings) & allowed <= set(r.cpus)


# --- memory target: HBM / CXL nodes next to the rank's CPUs ---------------------------------


def _xeon_max_flat():
    """2 sockets x 2 SNC nodes with DDR and CPUs; each has a CPU-less HBM node (flat mode)."""
    return make_topology(sockets=2, nodes_per_socket=2, cores_per_node=4, gpus=[0, 1, 2, 3],
                         memory_nodes=[(0, 16 * GiB), (1, 16 * GiB), (2, 16 * GiB), (3, 16 * GiB)])


def test_hbm_target_prefers_the_cpu_less_node_attached_to_the_rank():
    topo = _xeon_max_flat()
    p = run(topo, nproc=4, memory="preferred", memory_target="hbm")
    assert [r.memory_nodes for r in p.ranks] == [(4,), (5,), (6,), (7,)]
    assert [r.cpus for r in p.ranks] == [r.cpus for r in run(topo, nproc=4).ranks]  # CPUs unchanged
    assert p.warnings[1:] == () and codes(p) == ["sub-numa-clustering"]
    bind = run(topo, nproc=4, memory="bind", memory_target="hbm", memory_need=8 * GiB)
    assert [r.memory_policy for r in bind.ranks] == [MemoryPolicy.BIND] * 4
    over = run(topo, nproc=4, memory="bind", memory_target="hbm", memory_need=20 * GiB)
    assert [r.memory_policy for r in over.ranks] == [MemoryPolicy.PREFERRED] * 4
    assert [r.memory_nodes for r in over.ranks] == [(4,), (5,), (6,), (7,)]  # still the HBM first
    sock = run(topo, nproc=4, mode="socket", memory="interleave", memory_target="hbm")
    assert [r.memory_nodes for r in sock.ranks] == [(4, 5), (4, 5), (6, 7), (6, 7)]


def test_hbm_target_without_hbm_warns_and_uses_the_rank_s_own_memory():
    topo = make_topology(sockets=2, gpus=[0, 1])
    p = run(topo, nproc=2, memory_target="hbm")
    assert [r.memory_nodes for r in p.ranks] == [(0,), (1,)]
    (diag,) = p.warnings
    assert diag.code == "memory-target-unavailable" and "ranks 0-1" in diag.message
    assert run(topo, nproc=2, memory="local", memory_target="hbm").warnings == ()


def test_report_names_the_cpu_node_a_memory_only_node_belongs_to():
    from composer_numa.report import render_table

    topo = _xeon_max_flat()
    table = render_table(topo, run(topo, nproc=4))
    assert "(none: memory only, near node 2)" in table
