"""Discovery from fake sysfs/procfs trees and from the live machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from composer_numa.errors import TopologyError
from composer_numa.machine.gpus import normalize_pci, visible_order
from composer_numa.machine.sysfs import discover
from composer_numa.plan import PlanOptions, plan
from tests.fakesys import build_tree
from tests.fixtures import SPECS


def _topo(tmp_path, name_or_spec, env=None):
    spec = SPECS[name_or_spec] if isinstance(name_or_spec, str) else name_or_spec
    s, p = build_tree(tmp_path, spec)
    return discover(s, p, env={} if env is None else env)


def test_live_machine_has_its_nodes_and_cpus():
    t = discover()
    assert t.live
    assert t.nodes and all(n.memory_total >= n.memory_free >= 0 for n in t.nodes)
    assert set(t.allowed_cpus) == os.sched_getaffinity(0)
    assert {c.id for c in t.cpus} >= os.sched_getaffinity(0)
    assert sum(len(n.cpus) for n in t.nodes) == len(t.cpus)


def test_two_sockets_smt_split_and_gpus_4_4(tmp_path):
    t = _topo(tmp_path, "aws-p4d")
    assert [n.cpus[:3] for n in t.nodes] == [(0, 1, 2), (24, 25, 26)]
    assert len(t.cpus) == 96 and t.sockets[1][0] == 24
    assert t.cpu(5).siblings == (5, 53) and t.cpu(53).core_key == 5
    assert [g.numa_node for g in t.gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert t.gpus[4].pci_bus_id == "0000:90:1c.0"
    assert [(n.kind, n.vendor, n.numa_node) for n in t.nics][2] == ("ethernet", "amazon", 1)
    assert t.node(1).distances == (21, 10) and t.distance(0, 1) == 21
    assert t.nodes[0].memory_total == 576 << 30


def test_bmc_vga_is_not_a_gpu_and_l3_domains_are_ccds(tmp_path):
    t = _topo(tmp_path, "asus-epyc-4gpu")
    assert [g.pci_bus_id for g in t.gpus] == ["0000:01:00.0", "0000:41:00.0", "0000:c1:00.0", "0000:e1:00.0"]
    assert all(g.vendor == "nvidia" for g in t.gpus)
    assert t.cpu(5).l3 == (4, 5, 6, 7)
    assert [n.kind for n in t.nics] == ["ethernet", "ethernet"]


def test_reverse_node_order_and_pci_domains(tmp_path):
    t = _topo(tmp_path / "a", "reversed-gpus")
    assert [g.numa_node for g in t.gpus] == [1, 1, 0, 0]
    t = _topo(tmp_path / "b", "azure-domains")
    assert [g.pci_bus_id for g in t.gpus] == ["0001:00:00.0", "0002:00:00.0", "0003:00:00.0", "0004:00:00.0"]
    assert [g.numa_node for g in t.gpus] == [0, 0, 1, 1]


def test_cuda_visible_devices_selects_and_reorders(tmp_path):
    t = _topo(tmp_path, "aws-p4d", env={"CUDA_VISIBLE_DEVICES": "6,1"})
    assert [(g.index, g.pci_bus_id, g.numa_node) for g in t.gpus] == [
        (0, "0000:a0:1c.0", 1), (1, "0000:10:1d.0", 0)]


def test_cuda_visible_devices_stops_at_invalid_and_empty_hides_all(tmp_path):
    s, p = build_tree(tmp_path, SPECS["aws-p4d"])
    assert [g.index for g in discover(s, p, env={"CUDA_VISIBLE_DEVICES": "0,1,99,2"}).gpus] == [0, 1]
    assert discover(s, p, env={"CUDA_VISIBLE_DEVICES": ""}).gpus == ()
    assert discover(s, p, env={"CUDA_VISIBLE_DEVICES": "-1"}).gpus == ()


def test_uuid_without_nvml_warns_and_node_is_unknown(tmp_path):
    t = _topo(tmp_path, "aws-p4d", env={"CUDA_VISIBLE_DEVICES": "GPU-8f3e0c2a,3"})
    assert t.gpus[0].pci_bus_id is None and t.gpus[0].numa_node is None
    assert t.gpus[1].pci_bus_id == "0000:20:1d.0"
    assert [d.code for d in t.diagnostics] == ["gpu-uuid-unresolved"]
    assert "PCI address is unknown" in t.gpus[0].numa_unknown_reason
    assert [d.code for d in plan(t, PlanOptions(nproc=2)).warnings] == ["gpu-numa-unknown"]


def test_uuid_resolution_through_an_nvml_map():
    order, diags = visible_order(["0000:01:00.0", "0000:02:00.0"], {"CUDA_VISIBLE_DEVICES": "MIG-ab12,0"},
                                 ["CUDA_VISIBLE_DEVICES"], {"MIG-ab12cd": "0000:02:00.0"})
    assert order == ["0000:02:00.0", "0000:01:00.0"] and diags == []


def test_amd_gpus_follow_hip_visible_devices(tmp_path):
    t = _topo(tmp_path, "snc-amd", env={"HIP_VISIBLE_DEVICES": "3,2", "CUDA_VISIBLE_DEVICES": "0"})
    assert [(g.vendor, g.numa_node) for g in t.gpus] == [("amd", 3), ("amd", 2)]


def test_composer_numa_gpus_overrides_everything(tmp_path):
    t = _topo(tmp_path, "aws-p4d", env={"COMPOSER_NUMA_GPUS": "00000000:A0:1D.0, 0000:10:1c.0",
                                        "CUDA_VISIBLE_DEVICES": "1"})
    assert [(g.pci_bus_id, g.numa_node) for g in t.gpus] == [("0000:a0:1d.0", 1), ("0000:10:1c.0", 0)]
    t = _topo(tmp_path / "x", "aws-p4d", env={"COMPOSER_NUMA_GPUS": "0000:ee:00.0"})
    assert t.gpus[0].numa_node is None and "is not in" in t.gpus[0].numa_unknown_reason
    with pytest.raises(TopologyError, match="COMPOSER_NUMA_GPUS"):
        _topo(tmp_path / "y", "aws-p4d", env={"COMPOSER_NUMA_GPUS": "not-an-address"})


def test_numa_node_minus_one(tmp_path):
    single = _topo(tmp_path / "a", "threadripper-2gpu")
    assert [g.numa_node for g in single.gpus] == [0, 0] and not single.diagnostics
    multi = _topo(tmp_path / "b", "numa-minus1-multi")
    assert multi.gpus[0].numa_node == 1  # local_cpulist names node 1's CPUs only
    assert multi.gpus[1].numa_node is None  # spans both nodes: never silently node 0
    assert not multi.diagnostics
    assert multi.gpus[1].numa_unknown_reason == "sysfs numa_node is -1 and its local CPUs 0-15 span nodes 0-1"
    (diag,) = plan(multi, PlanOptions(nproc=2)).warnings
    assert diag.code == "gpu-numa-unknown" and "0000:65:00.0" in diag.message and "span nodes 0-1" in diag.message


def test_grace_hopper_cpu_less_and_memory_less_nodes(tmp_path):
    t = _topo(tmp_path, "grace-hopper")
    assert [n.has_cpus for n in t.nodes] == [True, False, False, False]
    assert [n.has_memory for n in t.nodes] == [True, True, False, False]
    assert [n.id for n in t.cpu_nodes] == [0]
    assert t.allowed_mems == (0, 1)


def test_cpuset_and_numa_balancing_come_from_the_proc_tree(tmp_path):
    t = _topo(tmp_path / "a", "cpuset-excludes")
    assert t.allowed_cpus == tuple(range(8)) and t.allowed_mems == (0,)
    t = _topo(tmp_path / "b", "cpu-only")
    assert t.numa_balancing is True and t.cpu(3).siblings == (2, 3)
    s, _ = build_tree(tmp_path / "c", SPECS["cpu-only"])
    t = discover(s, None, env={})  # fake sysfs alone: the live cpuset must not leak in
    assert t.allowed_cpus == tuple(range(32)) and t.numa_balancing is None and not t.live


def test_sub_numa_distances(tmp_path):
    t = _topo(tmp_path, "snc-amd")
    assert t.distance(0, 1) == 12 and t.distance(0, 2) == 21 and len(t.sockets) == 2


def test_non_numa_kernel_is_one_node(tmp_path):
    s, p = build_tree(tmp_path, {"nodes": [{"cpus": "0-3", "mem_gib": 8}]})
    import shutil

    shutil.rmtree(os.path.join(s, "devices/system/node"))
    t = discover(s, p, env={})
    assert [(n.id, n.cpus) for n in t.nodes] == [(0, (0, 1, 2, 3))]
    assert t.nodes[0].memory_total == 8 << 30


@pytest.mark.parametrize("bad", ["missing", "file", "empty-dir"])
def test_bad_roots_are_clear_errors(tmp_path, bad):
    path = tmp_path / "root"
    if bad == "file":
        path.write_text("x")
    elif bad == "empty-dir":
        path.mkdir()
    with pytest.raises(TopologyError, match=str(path)):
        discover(str(path), None)
    s, _ = build_tree(tmp_path / "ok", SPECS["cpu-only"])
    with pytest.raises(TopologyError, match="procfs root"):
        discover(s, str(tmp_path / "nope"))


def test_malformed_files_name_the_file(tmp_path):
    s, p = build_tree(tmp_path, SPECS["cpu-only"])
    with open(os.path.join(s, "devices/system/node/node1/cpulist"), "w") as f:
        f.write("16-x\n")
    with pytest.raises(TopologyError, match="node1/cpulist"):
        discover(s, p)


def test_normalize_pci():
    assert normalize_pci("00000000:C1:00.0") == "0000:c1:00.0"
    assert normalize_pci("1:0a:1f.7") == "0001:0a:1f.7"
    assert normalize_pci("c1:00.0") == "0000:c1:00.0"
    with pytest.raises(ValueError, match="not a PCI address"):
        normalize_pci("c1:00")


def test_import_and_discovery_do_not_import_torch():
    code = ("import sys, composer_numa; from composer_numa.machine.sysfs import discover; discover(); "
            "assert 'torch' not in sys.modules and 'composer' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("value, count", [
    ("²", 0),                     # a unicode digit is not a device index
    ("0" * 5000, 1),              # 5,000 zeros are index 0 (and not a 5,000-digit int)
    (",".join(["0"] * 5000), 1),  # CUDA stops at the first repeated device
    ("1,1,0", 1),
    ("99999999999999999999,0", 0),
])
def test_odd_visible_devices_values_never_crash(tmp_path, value, count):
    t = _topo(tmp_path, "aws-p4d", env={"CUDA_VISIBLE_DEVICES": value})
    assert len(t.gpus) == count


def test_mixed_gpu_models_without_pci_bus_order_warn(tmp_path):
    spec = dict(SPECS["aws-p4d"])
    spec["gpus"] = [dict(g, device=0x2330 if i % 2 else 0x20B0) for i, g in enumerate(spec["gpus"])]
    s, p = build_tree(tmp_path, spec)
    (diag,) = discover(s, p, env={}).diagnostics
    assert diag.code == "gpu-order-uncertain" and "2 different models" in diag.message
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in diag.outcome
    assert discover(s, p, env={"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}).diagnostics == ()
    same, _ = build_tree(tmp_path / "same", SPECS["aws-p4d"]), None
    assert discover(*same, env={}).diagnostics == ()
