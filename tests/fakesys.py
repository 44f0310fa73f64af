"""Build fake sysfs/procfs trees from compact machine specs.

A spec is a dict::

    {
        "nodes": [                        # required, node ids are the list positions
            {"cpus": "0-15,64-79",        # cpulist ("" for a CPU-less node)
             "mem_gib": 256,              # MemTotal (0 = memory-less)
             "free_gib": 200,             # MemFree (default: 90 % of total)
             "cache_gib": 30,             # clean page cache (Active/Inactive(file)), default 0
             "dirty_gib": 1,              # of which dirty (not reclaimable at once), default 0
             "slab_gib": 2,               # SReclaimable, default 0
             "low_gib": 0.5,              # low watermark in /proc/zoneinfo, default 0 (no zoneinfo)
             "socket": 0,                 # default: spread evenly over "sockets"
             "l3": ["0-7,64-71", "8-15,72-79"]},   # default: one L3 per node
        ],
        "sockets": 2,                     # default 1
        "smt": "split" | "adjacent" | None,   # siblings (c, c+N/2) or (2k, 2k+1)
        "distances": [[10, 21], [21, 10]],    # default: 10 local, 12 same socket, 21 else
        "gpus": [{"pci": "0000:17:00.0", "node": 0,        # node -1 = unknown
                  "vendor": 0x10de, "class": 0x030200,
                  "local_cpus": "0-15"}],                # default: the node's CPUs
        "nics": [{"pci": "0000:18:00.0", "node": 0, "class": 0x020700, "vendor": 0x15b3}],
        "pci": [...],                     # other devices, same keys
        "cpus_allowed": "0-3",            # /proc/self/status (default: all)
        "mems_allowed": "0",              # default: all nodes
        "numa_balancing": 0,              # default 0; None = file absent
        "cgroup": {"version": 2, "limit_gib": 16, "usage_gib": 10, "file_gib": 4},  # memory cgroup
    }

``build_tree(tmp_path, spec)`` writes ``tmp_path/sys`` and ``tmp_path/proc`` and
returns their paths as strings.
"""

from __future__ import annotations

from pathlib import Path

from composer_numa.units import format_cpulist, parse_cpulist

__all__ = ["build_tree"]

GIB = 1 << 30


def _w(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")


def build_tree(tmp_path: Path, spec: dict) -> tuple[str, str]:
    sys_root = Path(tmp_path) / "sys"
    proc_root = Path(tmp_path) / "proc"
    nodes = spec["nodes"]
    n_sockets = spec.get("sockets", 1)
    node_cpus = [parse_cpulist(n.get("cpus", "")) for n in nodes]
    cpu_nodes = [i for i, c in enumerate(node_cpus) if c]
    sockets = {}
    for rank, i in enumerate(cpu_nodes):
        sockets[i] = nodes[i].get("socket", rank * n_sockets // max(1, len(cpu_nodes)))
    all_cpus = sorted(c for cpus in node_cpus for c in cpus)
    n_cpu = len(all_cpus)

    # Nodes.
    ndir = sys_root / "devices/system/node"
    ids = format_cpulist(range(len(nodes)))
    _w(ndir / "online", ids)
    _w(ndir / "possible", ids)
    _w(ndir / "has_cpu", format_cpulist(cpu_nodes))
    _w(ndir / "has_memory", format_cpulist(i for i, n in enumerate(nodes) if n.get("mem_gib", 0) > 0))
    dist = spec.get("distances")
    for i, n in enumerate(nodes):
        d = ndir / f"node{i}"
        _w(d / "cpulist", format_cpulist(node_cpus[i]))
        total = int(n.get("mem_gib", 0) * GIB)
        free = int(n.get("free_gib", n.get("mem_gib", 0) * 0.9) * GIB)
        cache, dirty = int(n.get("cache_gib", 0) * GIB), int(n.get("dirty_gib", 0) * GIB)
        slab = int(n.get("slab_gib", 0) * GIB)
        _w(d / "meminfo", f"Node {i} MemTotal:       {total // 1024} kB\n"
                          f"Node {i} MemFree:        {free // 1024} kB\n"
                          f"Node {i} MemUsed:        {(total - free) // 1024} kB\n"
                          f"Node {i} Active(file):   {cache // 2048} kB\n"
                          f"Node {i} Inactive(file): {(cache - cache // 2) // 1024} kB\n"
                          f"Node {i} Dirty:          {dirty // 1024} kB\n"
                          f"Node {i} Writeback:      0 kB\n"
                          f"Node {i} FilePages:      {cache // 1024} kB\n"
                          f"Node {i} SReclaimable:   {slab // 1024} kB\n")
        if dist is not None:
            row = dist[i]
        else:
            row = [10 if i == j else (12 if sockets.get(i, -1) == sockets.get(j, -2) else 21)
                   for j in range(len(nodes))]
        _w(d / "distance", " ".join(str(x) for x in row))

    # CPUs.
    cdir = sys_root / "devices/system/cpu"
    _w(cdir / "online", format_cpulist(all_cpus))
    _w(cdir / "possible", format_cpulist(all_cpus))
    smt = spec.get("smt")
    node_of = {c: i for i, cpus in enumerate(node_cpus) for c in cpus}
    per_socket_core: dict[tuple[int, int], int] = {}
    for c in all_cpus:
        if smt == "split":
            half = n_cpu // 2
            first = c % half
            sib = (first, first + half)
        elif smt == "adjacent":
            first = c - c % 2
            sib = (first, first + 1)
        else:
            first, sib = c, (c,)
        sock = sockets[node_of[c]]
        core_id = per_socket_core.setdefault((sock, first), len([k for k in per_socket_core if k[0] == sock]))
        d = cdir / f"cpu{c}"
        (d / f"node{node_of[c]}").mkdir(parents=True, exist_ok=True)  # sysfs links cpuN/nodeM
        _w(d / "topology/physical_package_id", str(sock))
        _w(d / "topology/core_id", str(core_id))
        _w(d / "topology/thread_siblings_list", format_cpulist(sib))
        l3s = [parse_cpulist(x) for x in nodes[node_of[c]].get("l3", [])] or [node_cpus[node_of[c]]]
        l3 = next((g for g in l3s if c in g), node_cpus[node_of[c]])
        _w(d / "cache/index0/level", "1")
        _w(d / "cache/index0/type", "Data")
        _w(d / "cache/index0/shared_cpu_list", format_cpulist(sib))
        _w(d / "cache/index1/level", "1")
        _w(d / "cache/index1/type", "Instruction")
        _w(d / "cache/index1/shared_cpu_list", format_cpulist(sib))
        _w(d / "cache/index2/level", "2")
        _w(d / "cache/index2/type", "Unified")
        _w(d / "cache/index2/shared_cpu_list", format_cpulist(sib))
        _w(d / "cache/index3/level", "3")
        _w(d / "cache/index3/type", "Unified")
        _w(d / "cache/index3/shared_cpu_list", format_cpulist(l3))

    # PCI devices.
    pdir = sys_root / "bus/pci/devices"
    pdir.mkdir(parents=True, exist_ok=True)
    defaults = {"gpus": (0x10DE, 0x030200), "nics": (0x15B3, 0x020700), "pci": (0x8086, 0x060400)}
    for key, (vendor, cls) in defaults.items():
        for dev in spec.get(key, []):
            d = pdir / dev["pci"]
            node = dev.get("node", -1)
            _w(d / "vendor", f"{dev.get('vendor', vendor):#06x}")
            _w(d / "device", f"{dev.get('device', 0x20b0):#06x}")
            _w(d / "class", f"{dev.get('class', cls):#08x}")
            _w(d / "numa_node", str(node))
            local = dev.get("local_cpus")
            if local is None:
                local = format_cpulist(node_cpus[node]) if 0 <= node < len(nodes) else format_cpulist(all_cpus)
            _w(d / "local_cpulist", local)

    # procfs.
    allowed = spec.get("cpus_allowed", format_cpulist(all_cpus))
    mems = spec.get("mems_allowed", ids)
    _w(proc_root / "self/status", f"Name:\tpython3\nPid:\t4242\nCpus_allowed_list:\t{allowed}\n"
                                   f"Mems_allowed_list:\t{mems}\n")
    zones = [(i, n["low_gib"]) for i, n in enumerate(nodes) if "low_gib" in n]
    if zones:
        _w(proc_root / "zoneinfo", "".join(
            f"Node {i}, zone   Normal\n  pages free     1000\n        min      10\n"
            f"        low      {int(low * GIB) // 4096}\n        high     {int(low * GIB) // 2048}\n"
            for i, low in zones))
    cg = spec.get("cgroup")
    if cg is not None:
        limit, usage, file = (int(cg.get(k, 0) * GIB) for k in ("limit_gib", "usage_gib", "file_gib"))
        if cg.get("version", 2) == 2:
            _w(proc_root / "self/cgroup", "0::/job\n")
            base = sys_root / "fs/cgroup/job"
            _w(base / "memory.max", str(limit) if limit else "max")
            _w(base / "memory.current", str(usage))
            _w(base / "memory.stat", f"anon {usage - file}\nfile {file}\nfile_dirty 0\nfile_writeback 0\n")
        else:
            _w(proc_root / "self/cgroup", "4:memory:/job\n0::/\n")
            base = sys_root / "fs/cgroup/memory/job"
            _w(base / "memory.limit_in_bytes", str(limit or 9223372036854771712))
            _w(base / "memory.usage_in_bytes", str(usage))
            _w(base / "memory.stat", f"cache {file}\nrss {usage - file}\ntotal_cache {file}\n")
    nb = spec.get("numa_balancing", 0)
    if nb is not None:
        _w(proc_root / "sys/kernel/numa_balancing", str(nb))
    total = sum(int(n.get("mem_gib", 0) * GIB) for n in nodes)
    _w(proc_root / "meminfo", f"MemTotal:       {total // 1024} kB\nMemFree:        {total // 2048} kB\n")
    return str(sys_root), str(proc_root)
