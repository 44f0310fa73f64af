"""Layout 1 (two nodes, one CPU each): the C++ extension's node-local buffers really land
on their node, the worker pool has one pinned worker per node, node tasks run on that
node's worker, an allocation the node cannot hold is a MemoryError, and NumaAdamW split
over both nodes keeps each node's buffers on that node while matching torch's AdamW.
One boot."""

from __future__ import annotations

import pytest

from tests.vm.conftest import boot_checks, py
from tests.vm.harness import TWO_NODES

MIB = 64
EXT_MISSING = None
try:
    import composer_numa._C  # noqa: F401
except ImportError:
    EXT_MISSING = "the C++ extension is not built"

pytestmark = pytest.mark.skipif(bool(EXT_MISSING), reason=str(EXT_MISSING))


@pytest.fixture(scope="module")
def out():
    # importing torch under TCG takes from 30 s to minutes on a busy host
    boot = boot_checks(TWO_NODES, {"buffers": py("node_buffers.py", str(MIB))}, timeout=720,
                       check_timeout=600)
    return boot.ok_json("buffers")


def _share(pages: dict, node: int) -> float:
    total = sum(pages.values())
    return pages.get(str(node), 0) / total if total else 0.0


def test_one_pinned_worker_per_node(out):
    assert sorted((w["node"], w["cpu"]) for w in out["workers"]) == [(0, 0), (1, 1)]
    workers = out["workers"]
    for node, owners in out["node_chunk_owners"].items():
        assert [workers[i]["node"] for i in owners] == [int(node)]


@pytest.mark.parametrize("node", [0, 1])
def test_empty_places_every_page_on_the_node(out, node):
    placed = out["empty"][str(node)]
    assert _share(placed["numa_maps"], node) == 1.0, placed
    assert sum(placed["numa_maps"].values()) == (MIB << 20) // 4096
    assert placed["nodes_of"] == {str(node): (MIB << 20) // 4096}
    assert placed["policy"] == ["bind", [node]]


def test_interleave_spreads_evenly(out):
    pages = out["interleave"]
    assert abs(_share(pages, 0) - 0.5) < 0.1 and abs(_share(pages, 1) - 0.5) < 0.1, pages


def test_too_big_for_the_node_is_a_memory_error(out):
    assert out["too_big"].startswith("cannot allocate 8.0 GiB on NUMA node 1"), out["too_big"]
    assert "free" in out["too_big"]


def test_numa_adamw_split_over_both_nodes(out):
    assert out["adamw_excess"] <= 0, out["adamw_excess"]
    buffers = out["adamw_buffers"]
    assert sorted(b["node"] for b in buffers) == [0, 1]
    for b in buffers:
        for name, pages in b["numa_maps"].items():
            assert _share(pages, b["node"]) == 1.0, (name, b)
    # the model's parameters were moved into the buffers: each lives on exactly one node
    assert all(len(p) == 1 for p in out["param_nodes"])
    assert {next(iter(p)) for p in out["param_nodes"]} == {"0", "1"}
