"""NVIDIA Grace machines (GH200, a GB200 compute tray): GPU memory as CPU-less NUMA nodes.

Discovery must find each GPU's own memory node, and the planner must put every rank on the
Grace node next to its GPU, with ``--memory-target hbm`` naming that GPU's memory and no other.
The machines are the published listings transcribed in tests/fixtures.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from composer_numa.machine.gpus import memory_nodes
from composer_numa.machine.sysfs import discover
from composer_numa.plan import MemoryPolicy, Mode, PlanOptions, plan
from tests.fakesys import build_tree
from tests.fixtures import SPECS
from tests.topo_factory import GiB as GIB

ROOT = str(Path(__file__).resolve().parents[2])
GB200_GPUS = ["0008:01:00.0", "0009:01:00.0", "0018:01:00.0", "0019:01:00.0"]


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    return {name: build_tree(tmp_path_factory.mktemp(name), SPECS[name]) for name in ("gh200", "gb200-tray")}


def _discover(trees, name, env=None):
    return discover(*trees[name], env={} if env is None else env)


# -- discovery --------------------------------------------------------------------------------


def test_gh200_one_grace_node_and_the_gpu_memory_node(trees):
    t = _discover(trees, "gh200")
    assert len(t.nodes) == 9 and [n.id for n in t.cpu_nodes] == [0]
    assert t.node(0).cpus == tuple(range(72)) and t.cores(range(72)) == 72
    assert t.node(1).memory_total == 97280 << 20 and not t.node(1).has_cpus
    assert [n.id for n in t.nodes if not n.has_cpus and not n.has_memory] == list(range(2, 9))
    (g,) = t.gpus
    assert (g.pci_bus_id, g.numa_node, g.memory_node, g.model) == ("0009:01:00.0", 0, 1, "0x2342")
    assert t.attached_cpu_node(1) == 0 and t.distance(0, 1) == 80
    assert t.summary() == "1 socket, 9 NUMA nodes (8 without CPUs), 72 CPUs (72 cores), 1 GPU, 0 NICs"


def test_gb200_tray_two_grace_nodes_and_four_gpu_memory_nodes(trees):
    t = _discover(trees, "gb200-tray")
    assert len(t.nodes) == 34 and [n.id for n in t.cpu_nodes] == [0, 1]
    assert t.node(1).cpus == tuple(range(72, 144)) and list(t.sockets) == [0, 1]
    assert [g.pci_bus_id for g in t.gpus] == GB200_GPUS
    assert [g.numa_node for g in t.gpus] == [0, 0, 1, 1]
    # nvidia-smi topo -m's "GPU NUMA ID" column on such a tray: 2, 10, 18, 26
    assert [g.memory_node for g in t.gpus] == [2, 10, 18, 26]
    assert [n.id for n in t.nodes if n.has_memory and not n.has_cpus] == [2, 10, 18, 26]
    assert [t.attached_cpu_node(n) for n in (2, 10, 18, 26)] == [0, 0, 1, 1]


def test_a_visible_subset_keeps_each_gpu_s_own_memory_node(trees):
    # pairing counts every physical GPU of a Grace node, not only the visible ones
    t = _discover(trees, "gb200-tray", env={"CUDA_VISIBLE_DEVICES": "3,1"})
    assert [(g.index, g.pci_bus_id, g.memory_node) for g in t.gpus] == [(0, "0019:01:00.0", 26),
                                                                        (1, "0009:01:00.0", 10)]
    p = plan(t, PlanOptions(nproc=2, memory_target="hbm"))
    assert [r.memory_nodes for r in p.ranks] == [(26,), (10,)]
    assert [r.numa_nodes for r in p.ranks] == [(1,), (0,)]


def test_memory_nodes_pairs_only_what_is_unambiguous():
    cpu_less = {2: 0, 10: 0, 18: 1, 26: 1}
    gpus = list(zip(GB200_GPUS, [0, 0, 1, 1], strict=True))
    assert memory_nodes(gpus, cpu_less) == dict(zip(GB200_GPUS, [2, 10, 18, 26], strict=True))
    # the driver's answer (NVML) wins, and what it leaves is paired from what remains
    assert memory_nodes(gpus, cpu_less, {"0008:01:00.0": 10, "0009:01:00.0": 2}) == \
        {"0008:01:00.0": 10, "0009:01:00.0": 2, "0018:01:00.0": 18, "0019:01:00.0": 26}
    # an answer naming a node that is not CPU-less memory is ignored
    assert memory_nodes(gpus[:1], {2: 0}, {"0008:01:00.0": 0}) == {"0008:01:00.0": 2}
    # a GPU whose sysfs node is its memory node itself
    assert memory_nodes([("0009:01:00.0", 1)], {1: 0}) == {"0009:01:00.0": 1}
    # two GPUs but one CPU-less node beside them (a CXL expander?): nothing is guessed
    assert memory_nodes(gpus[:2], {2: 0}) == {}
    # one GPU and two CPU-less nodes (HBM and CXL): nothing is guessed either
    assert memory_nodes(gpus[:1], {2: 0, 3: 0}) == {}
    assert memory_nodes(gpus, {}) == {} and memory_nodes([("0008:01:00.0", None)], {2: 0}) == {}


def test_x86_machines_have_no_gpu_memory_nodes(tmp_path):
    for name in ("aws-p4d", "asus-epyc-4gpu", "snc-amd"):
        t = discover(*build_tree(tmp_path / name, SPECS[name]), env={})
        assert all(g.memory_node is None for g in t.gpus), name


# -- planning ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(Mode))
def test_each_rank_is_on_the_grace_node_of_its_gpu(trees, mode):
    t = _discover(trees, "gb200-tray")
    p = plan(t, PlanOptions(nproc=4, mode=mode))
    home = [0, 0, 1, 1]
    for r in p.ranks:
        assert r.gpu == r.local_rank and r.gpu_pci_bus_id == GB200_GPUS[r.local_rank]
        if mode is Mode.NONE:
            assert r.numa_nodes == (home[r.local_rank],) and r.cpus == tuple(range(144))
        else:
            assert r.numa_nodes == (home[r.local_rank],)
            assert set(r.cpus) <= set(t.node(home[r.local_rank]).cpus)
        # host memory stays on the Grace node's LPDDR, never on a GPU's memory node
        assert r.memory_policy is MemoryPolicy.PREFERRED and r.memory_nodes == (home[r.local_rank],)
    assert p.warnings == ()
    if mode is Mode.EXCLUSIVE:
        assert [r.cpus for r in p.ranks] == [tuple(range(0, 36)), tuple(range(36, 72)),
                                             tuple(range(72, 108)), tuple(range(108, 144))]
        assert [r.num_threads for r in p.ranks] == [36] * 4


def test_gh200_plan_uses_the_72_grace_cores(trees):
    t = _discover(trees, "gh200")
    for memory in ("preferred", "bind", "interleave"):
        (r,) = plan(t, PlanOptions(nproc=1, memory=memory)).ranks
        assert r.cpus == tuple(range(72)) and r.num_threads == 72 and r.memory_nodes == (0,)
    # CPU-only ranks (no GPU visible) still never land on a CPU-less node
    t = _discover(trees, "gh200", env={"CUDA_VISIBLE_DEVICES": ""})
    assert not t.gpus
    assert {r.numa_nodes for r in plan(t, PlanOptions(nproc=2)).ranks} == {(0,)}


@pytest.mark.parametrize("memory", ["preferred", "bind", "interleave"])
@pytest.mark.parametrize("mode", ["node", "socket", "exclusive"])
def test_hbm_target_names_the_rank_s_own_gpu_memory_and_warns(trees, memory, mode):
    t = _discover(trees, "gb200-tray")
    p = plan(t, PlanOptions(nproc=4, mode=mode, memory=memory, memory_target="hbm"))
    # never the neighbouring GPU's memory, though it is as near to the Grace node (distance 80)
    assert [r.memory_nodes for r in p.ranks] == [(2,), (10,), (18,), (26,)]
    assert [r.memory_policy.value for r in p.ranks] == [memory] * 4
    assert [r.numa_nodes for r in p.ranks] == [(0,), (0,), (1,), (1,)]  # CPUs stay on the Grace nodes
    (diag,) = p.warnings
    assert diag.code == "memory-target-gpu-memory"
    assert "rank 0 on node 2 (GPU 0)" in diag.message and "rank 3 on node 26 (GPU 3)" in diag.message
    assert "memory target local" in diag.outcome


def test_hbm_target_larger_than_the_gpu_memory_falls_back(trees):
    t = _discover(trees, "gh200")
    ok = plan(t, PlanOptions(nproc=1, memory="bind", memory_target="hbm", memory_need=64 * GIB))
    assert ok.ranks[0].memory_policy is MemoryPolicy.BIND and ok.ranks[0].memory_nodes == (1,)
    over = plan(t, PlanOptions(nproc=1, memory="bind", memory_target="hbm", memory_need=120 * GIB))
    assert over.ranks[0].memory_policy is MemoryPolicy.PREFERRED and over.ranks[0].memory_nodes == (1,)
    assert [d.code for d in over.warnings] == ["memory-target-gpu-memory", "node-memory-insufficient"]


def test_two_ranks_per_gpu_share_its_memory_node(trees):
    t = _discover(trees, "gh200")
    p = plan(t, PlanOptions(nproc=2, mode="exclusive", memory_target="hbm"))
    assert [r.memory_nodes for r in p.ranks] == [(1,), (1,)]
    assert [r.cpus for r in p.ranks] == [tuple(range(36)), tuple(range(36, 72))]
    assert [d.code for d in p.warnings] == ["more-ranks-than-gpus", "memory-target-gpu-memory"]


def test_report_json_of_a_gb200_tray(trees):
    sys_root, proc_root = trees["gb200-tray"]
    out = subprocess.run([sys.executable, "-m", "composer_numa.cli", "report", "--format", "json",
                          "--sysfs-root", sys_root, "--proc-root", proc_root, "--memory-target", "hbm"],
                         capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"},
                         cwd=ROOT)
    d = json.loads(out.stdout)
    assert d["schema"] == 1 and d["host"] is None
    assert [g["memory_node"] for g in d["gpus"]] == [2, 10, 18, 26]
    assert [r["memory_nodes"] for r in d["plan"]] == [[2], [10], [18], [26]]
    assert [w["code"] for w in d["warnings"]] == ["memory-target-gpu-memory"]
