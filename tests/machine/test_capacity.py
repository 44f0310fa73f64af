"""What a node can give now: free + clean page cache + reclaimable slab - low watermark, and the
memory cgroup's room; the planner, the report and the allocator all read it from one place."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from composer_numa.machine import capacity, procfs
from composer_numa.machine.sysfs import discover
from composer_numa.plan import MemoryPolicy, PlanOptions, plan
from composer_numa.report import render_table, to_json
from tests.fakesys import GIB

TWO = {"sockets": 2, "nodes": [
    {"cpus": "0-3", "mem_gib": 24, "free_gib": 5, "cache_gib": 17, "dirty_gib": 1, "slab_gib": 1, "low_gib": 0.5},
    {"cpus": "4-7", "mem_gib": 24, "free_gib": 20}],
    "gpus": [{"pci": "0000:17:00.0", "node": 0}]}


def test_available_counts_clean_cache_and_reclaimable_slab_minus_the_low_watermark():
    info = {"MemFree": 5 * GIB, "Active(file)": 8 * GIB, "Inactive(file)": 9 * GIB, "Dirty": GIB,
            "Writeback": 0, "SReclaimable": GIB}
    assert capacity.available_bytes(info, GIB // 2) == 5 * GIB + 16 * GIB + GIB - GIB // 2
    assert capacity.available_bytes({"MemFree": GIB}, 2 * GIB) == 0  # never negative
    # kernels without the split file counters: file pages minus shared memory
    assert capacity.available_bytes({"MemFree": GIB, "FilePages": 3 * GIB, "Shmem": GIB}) == 3 * GIB


def test_zoneinfo_low_watermarks_are_summed_per_node():
    text = ("Node 0, zone      DMA\n  pages free 1\n        min      21\n        low      26\n"
            "Node 0, zone   Normal\n        low      100\n        high     120\n"
            "Node 1, zone   Normal\n        low      7\n")
    assert procfs.parse_low_watermarks(text, 4096) == {0: 126 * 4096, 1: 7 * 4096}


def test_a_bind_that_fits_in_available_memory_is_kept_though_free_memory_is_short(tree):
    sys_root, proc_root = tree(TWO)
    topo = discover(sys_root, proc_root)
    node0 = topo.node(0)
    assert node0.memory_free == 5 * GIB
    assert node0.available == 5 * GIB + 16 * GIB + GIB - GIB // 2
    kept = plan(topo, PlanOptions(nproc=1, memory="bind", memory_need="15G"))
    assert kept.ranks[0].memory_policy is MemoryPolicy.BIND and kept.warnings == ()
    fell = plan(topo, PlanOptions(nproc=1, memory="bind", memory_need="22G"))
    assert fell.ranks[0].memory_policy is MemoryPolicy.PREFERRED
    (diag,) = fell.warnings
    assert diag.code == "node-memory-insufficient" and "21.5 GiB available" in diag.message


def test_the_report_shows_available_next_to_free_and_says_what_checks_use(tree):
    topo = discover(*tree(TWO))
    p = plan(topo, PlanOptions(nproc=1))
    table = render_table(topo, p)
    assert "free  available" in table and "21.5 GiB" in table
    assert "memory-need checks use    available memory (free + clean page cache" in table
    doc = to_json(topo, p)
    assert doc["nodes"][0]["memory_free_bytes"] == 5 * GIB
    assert doc["nodes"][0]["memory_available_bytes"] == int(21.5 * GIB)


@pytest.mark.parametrize("version", [1, 2])
def test_the_memory_cgroup_room_caps_what_ranks_may_need_together(tree, version):
    spec = dict(TWO, cgroup={"version": version, "limit_gib": 16, "usage_gib": 10, "file_gib": 4})
    topo = discover(*tree(spec))
    assert topo.memory_room == 10 * GIB  # 16 - 10 + 4 of reclaimable page cache
    ok = plan(topo, PlanOptions(nproc=2, memory="bind", memory_need="4G"))
    assert all(r.memory_policy is MemoryPolicy.BIND for r in ok.ranks) and ok.warnings[1:] == ()
    over = plan(topo, PlanOptions(nproc=2, memory="bind", memory_need="6G"))
    (diag,) = [d for d in over.warnings if d.code == "node-memory-insufficient"]
    assert diag.message == "2 ranks need 12.0 GiB together but the memory cgroup allows 10.0 GiB more"
    assert "OOM killer" in diag.outcome


def test_no_cgroup_limit_means_no_room_figure(tree):
    assert discover(*tree(dict(TWO, cgroup={"version": 2, "limit_gib": 0}))).memory_room is None
    assert discover(*tree(TWO)).memory_room is None


def test_shortfall_names_node_size_and_figures():
    mem = {0: capacity.NodeMemory(0, 64 * GIB, GIB, 3 * GIB), 1: capacity.NodeMemory(1, 64 * GIB, GIB, 40 * GIB)}
    assert capacity.shortfall(2 * GIB, [0], "bind", mem, None) is None
    assert capacity.shortfall(4 * GIB, [0], "bind", mem, None) == (
        "cannot allocate 4.0 GiB on NUMA node 0 (policy bind): the node has 3.0 GiB available "
        "(1.0 GiB free, 64.0 GiB total)")
    assert capacity.shortfall(4 * GIB, [0], "preferred", mem, None, spill_nodes=[0, 1]) is None
    assert "interleaved over NUMA nodes 0-1: node 0 would take 5.0 GiB" in capacity.shortfall(
        10 * GIB, [0, 1], "interleave", mem, None)
    assert capacity.shortfall(2 * GIB, [1], "bind", mem, GIB) == (
        "cannot allocate 2.0 GiB on NUMA node 1: the memory cgroup allows only 1.0 GiB more")


def test_live_machine_bind_of_most_of_the_available_memory_is_not_refused():
    """On this machine (page cache and all) a need of 80 % of what the kernel can give keeps bind."""
    topo = discover()
    node = topo.cpu_nodes[0]
    if node.available < 2 * GIB:
        pytest.skip("less than 2 GiB available on this machine")
    need = int(node.available * 0.8)
    p = plan(topo, PlanOptions(nproc=1, memory="bind", memory_need=need))
    assert p.ranks[0].memory_policy is MemoryPolicy.BIND, p.warnings


_HOLD = """
import json, sys, time
from composer_numa.machine import capacity
with capacity.reserve([0]):
    start = time.monotonic()
    time.sleep(float(sys.argv[1]))
    end = time.monotonic()
print(json.dumps([start, end]))
"""


def test_reserve_serialises_processes_on_the_same_node(tmp_path):
    env = dict(os.environ, COMPOSER_NUMA_LOCK_DIR=str(tmp_path))
    first = subprocess.Popen([sys.executable, "-c", _HOLD, "1.0"], stdout=subprocess.PIPE, text=True, env=env)
    time.sleep(0.3)  # let the first one take the lock
    second = subprocess.run([sys.executable, "-c", _HOLD, "0"], capture_output=True, text=True, env=env,
                            timeout=60)
    a = json.loads(first.communicate(timeout=60)[0])
    b = json.loads(second.stdout)
    assert b[0] >= a[1], (a, b)  # the second checked only after the first had finished
    assert (tmp_path / "composer-numa-node0.lock").exists()
