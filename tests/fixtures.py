"""Machine specs for tests/fakesys.build_tree.

The first three follow published machines (their numbers are transcribed from
the records in the project's shared/topologies), and so do ``gh200`` and
``gb200-tray`` (from the published listings named above each); the rest are
the corner cases the planner and discovery must handle.
"""

from __future__ import annotations

NV = 0x10DE
AMD = 0x1002


def _ccx(first: int, last: int, size: int, sibling_offset: int | None = None) -> list[str]:
    out = []
    for lo in range(first, last + 1, size):
        group = f"{lo}-{lo + size - 1}"
        if sibling_offset is not None:
            group += f",{lo + sibling_offset}-{lo + sibling_offset + size - 1}"
        out.append(group)
    return out


SPECS: dict[str, dict] = {
    # AWS p4d.24xlarge: 2 sockets, 48 cores with SMT split enumeration, 8 GPUs 4/4, 4 EFA NICs.
    "aws-p4d": {
        "sockets": 2,
        "smt": "split",
        "nodes": [
            {"cpus": "0-23,48-71", "mem_gib": 576},
            {"cpus": "24-47,72-95", "mem_gib": 576},
        ],
        "distances": [[10, 21], [21, 10]],
        "gpus": [{"pci": f"0000:{bus}:{dev}.0", "node": node}
                 for bus, node in (("10", 0), ("20", 0), ("90", 1), ("a0", 1)) for dev in ("1c", "1d")],
        "nics": [{"pci": f"0000:{bus}:1b.0", "node": node, "vendor": 0x1D0F, "class": 0x020000}
                 for bus, node in (("10", 0), ("20", 0), ("90", 1), ("a0", 1))],
    },
    # ASUS ESC8000A-E12: 2x EPYC 9374F (SMT off, 4-core CCDs), 4 GPUs 2/2, two ConnectX-7, ASPEED BMC.
    "asus-epyc-4gpu": {
        "sockets": 2,
        "nodes": [
            {"cpus": "0-31", "mem_gib": 188.6, "l3": _ccx(0, 31, 4)},
            {"cpus": "32-63", "mem_gib": 188.94, "l3": _ccx(32, 63, 4)},
        ],
        "distances": [[10, 32], [32, 10]],
        "gpus": [{"pci": "0000:01:00.0", "node": 0}, {"pci": "0000:41:00.0", "node": 0},
                 {"pci": "0000:c1:00.0", "node": 1}, {"pci": "0000:e1:00.0", "node": 1}],
        "nics": [{"pci": "0000:21:00.0", "node": 0, "class": 0x020000},
                 {"pci": "0000:81:00.0", "node": 1, "class": 0x020000}],
        "pci": [{"pci": "0000:c4:00.0", "node": 1, "vendor": 0x1A03, "class": 0x030000}],
    },
    # Threadripper PRO workstation: one node, 2 GPUs whose sysfs numa_node is -1.
    "threadripper-2gpu": {
        "nodes": [{"cpus": "0-23", "mem_gib": 125.29}],
        "gpus": [{"pci": "0000:c1:00.0", "node": -1, "local_cpus": "0-23"},
                 {"pci": "0000:c2:00.0", "node": -1, "local_cpus": "0-23"}],
    },
    # 2 sockets x 4 nodes (NPS4), 256 CPUs with SMT (split), 2 L3 domains per node, 2 GPUs per node.
    "nps4-256": {
        "sockets": 2,
        "smt": "split",
        "nodes": [{"cpus": f"{16 * i}-{16 * i + 15},{128 + 16 * i}-{128 + 16 * i + 15}", "mem_gib": 192,
                   "l3": _ccx(16 * i, 16 * i + 15, 8, sibling_offset=128)} for i in range(8)],
        "gpus": [{"pci": f"0000:{0x08 * (2 * i + j) + 0x08:02x}:00.0", "node": i} for i in range(8) for j in range(2)],
    },
    # PCI order puts node 1's GPUs first: GPU index order is the reverse of node order.
    "reversed-gpus": {
        "sockets": 2,
        "nodes": [{"cpus": "0-7", "mem_gib": 64}, {"cpus": "8-15", "mem_gib": 64}],
        "gpus": [{"pci": "0000:17:00.0", "node": 1}, {"pci": "0000:31:00.0", "node": 1},
                 {"pci": "0000:b1:00.0", "node": 0}, {"pci": "0000:ca:00.0", "node": 0}],
    },
    # Azure-style PCI domains other than 0000.
    "azure-domains": {
        "sockets": 2,
        "nodes": [{"cpus": "0-47", "mem_gib": 900}, {"cpus": "48-95", "mem_gib": 900}],
        "gpus": [{"pci": "0001:00:00.0", "node": 0}, {"pci": "0002:00:00.0", "node": 0},
                 {"pci": "0003:00:00.0", "node": 1}, {"pci": "0004:00:00.0", "node": 1}],
        "nics": [{"pci": "0101:00:00.0", "node": 0}, {"pci": "0103:00:00.0", "node": 1}],
    },
    # GH200 (one Grace CPU + one H100 over NVLink-C2C), as `numactl --hardware` lists it once the
    # driver has onlined the GPU's memory (quoted in the Linux commit "mm/fake-numa: allow later numa
    # node hotplug", NVIDIA, 2025): node 0 = 72 Grace cores (no SMT) and 490037 MB of LPDDR5X, node 1 =
    # no CPUs and 97280 MB (the GPU's HBM3), nodes 2-8 = no CPUs and no memory (reserved for MIG
    # partitions of the GPU memory). Distances: 80 from node 0 to every other node, 255 between the
    # CPU-less nodes. The GPU is 0009:01:00.0 (device 0x2342) with CPU affinity 0-71, NUMA affinity 0
    # (`nvidia-smi topo -m`), so sysfs puts it on node 0; its memory is node 1.
    "gh200": {
        "nodes": [{"cpus": "0-71", "mem_gib": 490037 / 1024}, {"cpus": "", "mem_gib": 97280 / 1024}]
                 + [{"cpus": "", "mem_gib": 0} for _ in range(7)],
        "distances": [[10] + [80] * 8] + [[80] + [10 if i == j else 255 for j in range(1, 9)] for i in range(1, 9)],
        "gpus": [{"pci": "0009:01:00.0", "node": 0, "device": 0x2342}],
    },
    # A GB200 compute tray: 2 Grace CPUs (72 cores each) and 4 B200 GPUs, two per Grace, each GPU's
    # memory a CPU-less node followed by 7 empty MIG nodes. From `nvidia-smi topo -m` on such a tray
    # (sglang issue 11208): GPU0/GPU1 CPU affinity 0-71, NUMA affinity "0,3-9,11-17", GPU NUMA ID 2 and
    # 10; GPU2/GPU3 CPU affinity 72-143, GPU NUMA ID 18 and 26 (vLLM PR 39361 names the same memory-only
    # nodes 2, 10, 18, 26), so 34 nodes. PCI addresses 0008:01:00.0, 0009:01:00.0, 0018:01:00.0,
    # 0019:01:00.0, device 0x2941, 189471 MiB each (nvidia-smi on GB200 trays); 480 GiB of LPDDR5X per
    # Grace. No GB200 distance matrix was found published: distances follow the 4x GH200 `numactl -H`
    # (numactl issue 224): a Grace to its own GPUs' nodes 80, to the other GPUs' nodes 120, Grace to
    # Grace 40, between CPU-less nodes 255.
    "gb200-tray": {
        "sockets": 2,
        "nodes": [{"cpus": "0-71", "mem_gib": 480}, {"cpus": "72-143", "mem_gib": 480}]
                 + [{"cpus": "", "mem_gib": 189471 / 1024 if (i - 2) % 8 == 0 else 0} for i in range(2, 34)],
        "distances": [
            [10 if i == j else 40 if j < 2 else 80 if (j - 2) // 16 == i else 120 for j in range(34)]
            if i < 2 else
            [(80 if (i - 2) // 16 == j else 120) if j < 2 else 10 if i == j else 255 for j in range(34)]
            for i in range(34)
        ],
        "gpus": [{"pci": pci, "node": node, "device": 0x2941}
                 for pci, node in (("0008:01:00.0", 0), ("0009:01:00.0", 0), ("0018:01:00.0", 1),
                                   ("0019:01:00.0", 1))],
    },
    # Grace-Hopper-like: node 0 has the CPUs, node 1 is the GPU's HBM (CPU-less), nodes 2-3 empty.
    "grace-hopper": {
        "nodes": [{"cpus": "0-71", "mem_gib": 480}, {"cpus": "", "mem_gib": 96},
                  {"cpus": "", "mem_gib": 0}, {"cpus": "", "mem_gib": 0}],
        "distances": [[10, 80, 80, 80], [80, 10, 80, 80], [80, 80, 10, 80], [80, 80, 80, 10]],
        "gpus": [{"pci": "0009:01:00.0", "node": 0}],
    },
    # Multi-node host where the GPUs' numa_node is -1: one derivable from local_cpulist, one not.
    "numa-minus1-multi": {
        "sockets": 2,
        "nodes": [{"cpus": "0-7", "mem_gib": 64}, {"cpus": "8-15", "mem_gib": 64}],
        "gpus": [{"pci": "0000:17:00.0", "node": -1, "local_cpus": "8-15"},
                 {"pci": "0000:65:00.0", "node": -1, "local_cpus": "0-15"}],
    },
    # A cpuset (container) that excludes GPU 1's node entirely.
    "cpuset-excludes": {
        "sockets": 2,
        "nodes": [{"cpus": "0-7", "mem_gib": 64}, {"cpus": "8-15", "mem_gib": 64}],
        "gpus": [{"pci": "0000:17:00.0", "node": 0}, {"pci": "0000:b1:00.0", "node": 1}],
        "cpus_allowed": "0-7",
        "mems_allowed": "0",
    },
    # CPU-only host, two sockets, automatic NUMA balancing on.
    "cpu-only": {
        "sockets": 2,
        "smt": "adjacent",
        "nodes": [{"cpus": "0-15", "mem_gib": 128}, {"cpus": "16-31", "mem_gib": 128}],
        "numa_balancing": 1,
    },
    # Sub-NUMA clustering: 2 sockets x 2 nodes, one GPU per node, an AMD GPU vendor.
    "snc-amd": {
        "sockets": 2,
        "nodes": [{"cpus": f"{8 * i}-{8 * i + 7}", "mem_gib": 32} for i in range(4)],
        "distances": [[10, 12, 21, 21], [12, 10, 21, 21], [21, 21, 10, 12], [21, 21, 12, 10]],
        "gpus": [{"pci": f"0000:{0x20 * (i + 1):02x}:00.0", "node": i, "vendor": AMD, "class": 0x038000}
                 for i in range(4)],
    },
}
