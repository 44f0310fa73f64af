"""Discovery and planning on damaged and unusual sysfs/procfs trees.

Each case ends in a consistent plan with a warning saying what was assumed, or in a one-line
error (exit 2 from the CLI); a corpus test runs every mode on every broken tree and checks the
invariants the planner promises.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from composer_numa import cli
from composer_numa.errors import TopologyError
from composer_numa.machine.sysfs import discover
from composer_numa.plan import Mode, PlanOptions, plan
from tests.fakesys import build_tree

TWO_GPUS = {
    "sockets": 2,
    "nodes": [{"cpus": "0-7", "mem_gib": 64}, {"cpus": "8-15", "mem_gib": 64}],
    "gpus": [{"pci": "0000:17:00.0", "node": 0}, {"pci": "0000:b1:00.0", "node": 1}],
    "pci": [{"pci": "0000:03:00.0", "node": 0, "vendor": 0x1A03, "class": 0x030000}],  # BMC VGA, not a GPU
}
SMT_SPLIT = {
    "sockets": 1, "smt": "split",
    "nodes": [{"cpus": "0-3,8-11", "mem_gib": 64}, {"cpus": "4-7,12-15", "mem_gib": 64}],
}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _gpu(sys_root: str, pci: str) -> Path:
    return Path(sys_root) / "bus/pci/devices" / pci


# Each breaker damages a built tree in one way.
def _gpu_cpulist_hex(s, p):
    _write(_gpu(s, "0000:17:00.0") / "local_cpulist", "0000ff00\n")


def _gpu_cpulist_mask_unknown_node(s, p):
    _write(_gpu(s, "0000:b1:00.0") / "local_cpulist", "ff,ffffffff\n")
    _write(_gpu(s, "0000:b1:00.0") / "numa_node", "-1\n")


def _bmc_cpulist(s, p):
    _write(Path(s) / "bus/pci/devices/0000:03:00.0/local_cpulist", "ff,ffffffff\n")


def _empty_node1_cpulist(s, p):
    _write(Path(s) / "devices/system/node/node1/cpulist", "\n")


def _empty_node1_cpulist_no_links(s, p):
    _empty_node1_cpulist(s, p)
    for c in range(8, 16):
        shutil.rmtree(Path(s) / f"devices/system/cpu/cpu{c}/node1")


def _gpu1_unknown_spanning(s, p):
    _write(_gpu(s, "0000:b1:00.0") / "numa_node", "-1\n")
    _write(_gpu(s, "0000:b1:00.0") / "local_cpulist", "0-15\n")


def _gpu1_no_locality(s, p):
    (_gpu(s, "0000:b1:00.0") / "numa_node").unlink()
    (_gpu(s, "0000:b1:00.0") / "local_cpulist").unlink()


def _no_siblings(s, p):
    for d in (Path(s) / "devices/system/cpu").glob("cpu[0-9]*"):
        (d / "topology/thread_siblings_list").unlink()


def _no_package(s, p):
    for d in (Path(s) / "devices/system/cpu").glob("cpu[0-9]*"):
        (d / "topology/physical_package_id").unlink()


def _bad_distance(s, p):
    _write(Path(s) / "devices/system/node/node1/distance", "10 x\n")


def _binary_meminfo(s, p):
    (Path(s) / "devices/system/node/node1/meminfo").write_bytes(b"\x00\xff\xfe binary")


def _fifo_meminfo(s, p):
    path = Path(s) / "devices/system/node/node0/meminfo"
    path.unlink()
    os.mkfifo(path)


BREAKERS = {
    "gpu-cpulist-hex": (TWO_GPUS, _gpu_cpulist_hex),
    "gpu-cpulist-mask": (TWO_GPUS, _gpu_cpulist_mask_unknown_node),
    "bmc-cpulist": (TWO_GPUS, _bmc_cpulist),
    "empty-node-cpulist": (TWO_GPUS, _empty_node1_cpulist),
    "empty-node-cpulist-no-links": (TWO_GPUS, _empty_node1_cpulist_no_links),
    "gpu-unknown-spanning": (TWO_GPUS, _gpu1_unknown_spanning),
    "gpu-no-locality": (TWO_GPUS, _gpu1_no_locality),
    "no-siblings-split-smt": (SMT_SPLIT, _no_siblings),
    "no-package-id": (TWO_GPUS, _no_package),
    "bad-distance": (TWO_GPUS, _bad_distance),
    "binary-meminfo": (TWO_GPUS, _binary_meminfo),
    "fifo-meminfo": (TWO_GPUS, _fifo_meminfo),
}


def broken(tmp_path: Path, name: str, **extra) -> tuple[str, str]:
    spec, breaker = BREAKERS[name]
    s, p = build_tree(tmp_path / name, {**spec, **extra})
    breaker(s, p)
    return s, p


def codes(diags) -> list[str]:
    return [d.code for d in diags]


def _discover_in_time(s: str, p: str, seconds: float = 20.0):
    """discover() on a thread with a deadline: a tree must never make it block."""
    box: dict = {}

    def work():
        try:
            box["topo"] = discover(s, p)
        except Exception as e:  # noqa: BLE001 - reported below
            box["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "discovery blocked"
    if "error" in box:
        raise box["error"]
    return box["topo"]


# ------------------------------------------------------------------ one case each


def test_malformed_local_cpulist_of_a_gpu_is_a_warning_about_that_device(tmp_path):
    topo = discover(*broken(tmp_path, "gpu-cpulist-hex"))
    assert topo.gpus[0].numa_node == 0 and topo.gpus[0].local_cpus == ()  # numa_node still says 0
    (diag,) = topo.diagnostics
    assert diag.code == "topology-incomplete"
    assert "PCI device 0000:17:00.0" in diag.message and "local_cpulist" in diag.message
    assert diag.outcome == "its local CPUs are unknown"
    assert cli.main(["report", "--sysfs-root", *broken(tmp_path / "b", "gpu-cpulist-hex")[:1]]) == 0


def test_a_malformed_mask_on_a_gpu_of_unknown_node_leaves_its_node_unknown(tmp_path):
    topo = discover(*broken(tmp_path, "gpu-cpulist-mask"))
    assert topo.gpus[1].numa_node is None
    assert topo.gpus[1].numa_unknown_reason == "sysfs numa_node is -1 and its local_cpulist is unreadable"
    p = plan(topo, PlanOptions(nproc=2))
    assert codes(p.warnings) == ["gpu-numa-unknown"]


def test_a_bmc_vga_device_is_not_read_at_all(tmp_path):
    topo = discover(*broken(tmp_path, "bmc-cpulist"))
    assert topo.diagnostics == () and len(topo.gpus) == 2


def test_an_empty_node_cpulist_takes_the_node_from_the_cpu_links(tmp_path):
    topo = discover(*broken(tmp_path, "empty-node-cpulist"))
    assert topo.node(1).cpus == tuple(range(8, 16))
    assert {c.node for c in topo.cpus if c.id >= 8} == {1}
    (diag,) = topo.diagnostics
    assert diag.code == "topology-incomplete" and "taken from the cpuN/nodeM links" in diag.outcome


def test_an_empty_node_cpulist_never_moves_cpus_to_node_0(tmp_path):
    s, p = broken(tmp_path, "empty-node-cpulist-no-links")
    topo = discover(s, p)
    assert [c.id for c in topo.cpus] == list(range(8))  # 8-15 belong to no node: left out
    assert topo.node(1).cpus == () and {c.node for c in topo.cpus} == {0}
    (diag,) = topo.diagnostics
    assert diag.message == "CPUs 8-15 are online but belong to no NUMA node (node 1's cpulist is empty)"
    result = plan(topo, PlanOptions(nproc=2))
    for r in result.ranks:  # the ranks' nodes are the nodes that hold their CPUs, as the report shows
        assert set(r.cpus) <= set(topo.node(0).cpus) and r.numa_nodes == (0,)


@pytest.mark.parametrize("name", ["gpu-unknown-spanning", "gpu-no-locality"])
def test_exclusive_stays_exclusive_when_a_gpu_node_is_unknown(tmp_path, name):
    topo = discover(*broken(tmp_path, name))
    assert topo.gpus[1].numa_node is None
    p = plan(topo, PlanOptions(nproc=2, mode="exclusive"))
    assert p.ranks[0].cpus == tuple(range(8)) and p.ranks[1].cpus == tuple(range(8, 16))
    assert p.ranks[1].memory_nodes == ()
    (diag,) = p.warnings  # one warning for the GPU, saying what sysfs said
    assert diag.code == "gpu-numa-unknown"
    said = "numa_node is -1" if name == "gpu-unknown-spanning" else "numa_node is missing"
    assert said in diag.message and "GPU 1 (0000:b1:00.0)" in diag.message
    assert "too-few-cores" not in codes(p.warnings)


def test_core_complex_too_gives_unknown_ranks_the_cpus_others_leave(tmp_path):
    topo = discover(*broken(tmp_path, "gpu-unknown-spanning"))
    p = plan(topo, PlanOptions(nproc=2, mode="core-complex"))
    assert not set(p.ranks[0].cpus) & set(p.ranks[1].cpus)


def test_a_cpuset_with_no_online_cpu_is_an_error(tmp_path, capsys):
    s, p = build_tree(tmp_path, {**TWO_GPUS, "cpus_allowed": "100-200"})
    with pytest.raises(TopologyError, match=r"the cpuset allows CPUs 100-200, none of which is an online CPU"):
        discover(s, p)
    assert cli.main(["report", "--sysfs-root", s, "--proc-root", p]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("composer-numa: error: ") and "100-200" in line


def test_missing_sibling_lists_pair_threads_by_package_and_core(tmp_path):
    topo = discover(*broken(tmp_path, "no-siblings-split-smt"))
    assert topo.cpu(0).siblings == (0, 8) and topo.cpu(12).siblings == (4, 12)
    assert "paired by (physical_package_id, core_id)" in topo.diagnostics[0].outcome
    p = plan(topo, PlanOptions(nproc=4, mode="exclusive"))
    shares = [set(r.cpus) for r in p.ranks]
    assert all(not a & b for i, a in enumerate(shares) for b in shares[i + 1:])
    assert [sorted(s) for s in shares] == [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]]


def test_missing_package_ids_make_no_false_sub_numa_clustering(tmp_path):
    topo = discover(*broken(tmp_path, "no-package-id"))
    assert sorted(topo.sockets) == [0, 1]
    (diag,) = topo.diagnostics
    assert diag.outcome == "each NUMA node is taken as a socket of its own"
    assert "sub-numa-clustering" not in codes(plan(topo, PlanOptions(nproc=2)).warnings)


def test_bad_distances_are_assumed_with_a_warning(tmp_path):
    topo = discover(*broken(tmp_path, "bad-distance"))
    assert topo.distance(1, 0) == 20 and topo.distance(0, 1) == 21
    assert "distances 10 (local) and 20 (remote) are assumed" in topo.diagnostics[0].outcome


def test_binary_meminfo_is_unreadable_not_a_different_machine(tmp_path):
    topo = discover(*broken(tmp_path, "binary-meminfo"))
    assert topo.node(1).memory_total == 0
    messages = [str(d) for d in topo.diagnostics]
    assert any("node 1: meminfo is missing or unreadable" in m for m in messages)
    assert any("meminfo: not text" in m for m in messages)


def test_a_fifo_in_place_of_meminfo_never_blocks(tmp_path):
    topo = _discover_in_time(*broken(tmp_path, "fifo-meminfo"))
    assert any("node0/meminfo: is a FIFO" in str(d) for d in topo.diagnostics)


def test_a_binary_node_cpulist_is_a_one_line_error(tmp_path, capsys):
    s, p = build_tree(tmp_path, TWO_GPUS)
    (Path(s) / "devices/system/node/node1/cpulist").write_bytes(b"\x00\x01\xff")
    with pytest.raises(TopologyError, match="node1/cpulist: not text"):
        discover(s, p)
    assert cli.main(["report", "--sysfs-root", s, "--proc-root", p]) == 2
    assert capsys.readouterr().err.count("\n") == 1


_BOUNDED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB: a 10^8-element list would not fit
from composer_numa import cli
sys.exit(cli.main(["report", "--sysfs-root", sys.argv[1], "--proc-root", sys.argv[2]]))
"""


def test_a_huge_cpulist_is_refused_without_building_it(tmp_path):
    s, p = build_tree(tmp_path, TWO_GPUS)
    (Path(s) / "devices/system/cpu/online").write_text("0-99999999\n")
    out = subprocess.run([sys.executable, "-c", _BOUNDED, s, p], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "id 99999999 is beyond the largest possible" in line


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_files_a_user_may_not_read_are_reported_not_misread(tmp_path):
    s, p = build_tree(tmp_path, TWO_GPUS)
    for root, _, files in os.walk(tmp_path):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    for parent in tmp_path.parents:  # let the unprivileged user reach the tree
        if parent == Path("/"):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o005)
    os.chmod(Path(s) / "devices/system/node/node1/meminfo", 0o000)
    os.chmod(_gpu(s, "0000:b1:00.0") / "numa_node", 0o000)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child drops to nobody and reads the tree as that user would
        try:
            os.setgid(65534)
            os.setuid(65534)
            t = discover(s, p)
            os.write(write, json.dumps([t.node(1).memory_total, t.gpus[1].numa_node,
                                        [str(d) for d in t.diagnostics]]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        data = f.read()
    os.waitpid(pid, 0)
    total, gpu_node, diags = json.loads(data)
    assert total == 0 and gpu_node == 1  # the GPU's node comes from its local CPUs instead
    assert any("node1/meminfo: Permission denied" in d for d in diags)
    assert any("numa_node: Permission denied" in d for d in diags)


# ------------------------------------------------------------------ the corpus


def _check_invariants(topo, p, mode: Mode) -> None:
    online = {c.id for c in topo.cpus}
    allowed = set(topo.allowed_cpus) or online
    for r in p.ranks:
        assert r.cpus and set(r.cpus) <= online & allowed, r
        if mode is not Mode.NONE:  # each rank's nodes own its CPUs, as the node table shows them
            assert set(r.numa_nodes) == {n.id for n in topo.nodes if set(n.cpus) & set(r.cpus)}, r
    pairs = [(d.code, d.text) for d in (*topo.diagnostics, *p.warnings)]
    assert len(pairs) == len(set(pairs)), pairs  # one warning per problem
    unknown = [d.message for d in p.warnings if d.code == "gpu-numa-unknown"]
    assert len(unknown) == len({m.split(":")[0] for m in unknown})  # at most one per GPU
    if mode is Mode.EXCLUSIVE and "too-few-cores" not in [d.code for d in p.warnings]:
        shares = [set(r.cpus) for r in p.ranks]
        assert all(not a & b for i, a in enumerate(shares) for b in shares[i + 1:]), shares


@pytest.mark.parametrize("mode", list(Mode), ids=[m.value for m in Mode])
@pytest.mark.parametrize("name", sorted(BREAKERS))
def test_every_mode_on_every_broken_tree(tmp_path, name, mode, capsys):
    s, p = broken(tmp_path, name)
    topo = _discover_in_time(s, p)
    for nproc in (1, 2, 4):
        result = plan(topo, PlanOptions(nproc=nproc, mode=mode, memory="bind", memory_need="1G"))
        _check_invariants(topo, result, mode)
    rc = cli.main(["report", "--sysfs-root", s, "--proc-root", p, "--mode", mode.value, "--format", "json"])
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err

