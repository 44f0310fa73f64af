"""Reading sysfs and procfs into a :class:`~composer_numa.topology.Topology`.

Only standard files are required (node and CPU topology, PCI ``class``/
``vendor``/``numa_node``/``local_cpulist``, ``/proc/self/status``); anything
else is optional, so containers and fake trees with a subset still work.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from composer_numa import gpus as gpumod
from composer_numa.cpulist import format_cpulist, parse_cpulist
from composer_numa.diagnostics import GPU_NUMA_UNKNOWN, Diagnostic
from composer_numa.errors import TopologyError
from composer_numa.topology import Cpu, Gpu, Nic, Node, Topology

__all__ = ["discover_topology"]

_VENDORS = {0x10DE: "nvidia", 0x1002: "amd", 0x8086: "intel", 0x15B3: "mellanox",
            0x14E4: "broadcom", 0x1D0F: "amazon", 0x1A03: "aspeed"}
_GPU_VENDORS = {0x10DE: "nvidia", 0x1002: "amd"}
_GPU_CLASSES = {0x0300, 0x0302, 0x0380}
_NIC_CLASSES = {0x0200: "ethernet", 0x0207: "infiniband"}
_VISIBLE_VARS = {"nvidia": ("CUDA_VISIBLE_DEVICES",),
                 "amd": ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")}


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path, base: int = 10) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text, base)
    except ValueError:
        return None


def _cpulist(path: Path) -> tuple[int, ...] | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return parse_cpulist(text)
    except ValueError as e:
        raise TopologyError(f"{path}: {e}") from None


def _meminfo(path: Path) -> dict[str, int]:
    """``Key: value kB`` lines (node meminfo prefixes them with ``Node N``) -> bytes."""
    out: dict[str, int] = {}
    text = _read(path) or ""
    for line in text.splitlines():
        m = re.match(r"(?:Node\s+\d+\s+)?([\w()]+):\s+(\d+)(?:\s*kB)?", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if "kB" in line else 1)
    return out


def _read_nodes(sys_root: Path) -> list[tuple[int, tuple[int, ...], int, int, list[int]]]:
    node_dir = sys_root / "devices/system/node"
    ids = _cpulist(node_dir / "online")
    if ids is None:
        ids = tuple(sorted(int(p.name[4:]) for p in node_dir.glob("node[0-9]*"))) if node_dir.is_dir() else ()
    out = []
    for nid in ids:
        d = node_dir / f"node{nid}"
        cpus = _cpulist(d / "cpulist") or ()
        mem = _meminfo(d / "meminfo")
        dist_text = _read(d / "distance") or ""
        try:
            dist = [int(x) for x in dist_text.split()]
        except ValueError:
            raise TopologyError(f"{d / 'distance'}: not a list of distances: {dist_text!r}") from None
        out.append((nid, cpus, mem.get("MemTotal", 0), mem.get("MemFree", 0), dist))
    return out


def _cache_domain(cpu_dir: Path) -> tuple[int, ...] | None:
    """CPUs sharing the highest-level unified (or data) cache of this CPU."""
    levels = []
    for idx in cpu_dir.glob("cache/index[0-9]*"):
        level = _read_int(idx / "level")
        if level is not None:
            levels.append((level, idx))
    for _, idx in sorted(levels, key=lambda t: (-t[0], t[1].name)):
        if _read(idx / "type") in ("Unified", "Data"):
            shared = _cpulist(idx / "shared_cpu_list")
            if shared is not None:
                return shared
    return None


def _read_cpus(sys_root: Path, node_of: dict[int, int]) -> list[Cpu]:
    cpu_dir = sys_root / "devices/system/cpu"
    ids = _cpulist(cpu_dir / "online")
    if ids is None:
        ids = tuple(sorted(int(p.name[3:]) for p in cpu_dir.glob("cpu[0-9]*")))
    online = set(ids)
    node_cpus: dict[int, list[int]] = {}
    for c, n in node_of.items():
        node_cpus.setdefault(n, []).append(c)
    # Sibling sets and cache domains are the same for every member, so each is read once:
    # a 256-CPU machine costs a few hundred file reads instead of thousands.
    core_of: dict[int, tuple[int, int, tuple[int, ...]]] = {}
    l3_of: dict[int, tuple[int, ...]] = {}
    out = []
    for cid in ids:
        d = cpu_dir / f"cpu{cid}"
        node = node_of.get(cid, 0)
        if cid not in core_of:
            socket = _read_int(d / "topology/physical_package_id")
            core = _read_int(d / "topology/core_id")
            siblings = tuple(s for s in (_cpulist(d / "topology/thread_siblings_list") or ()) if s in online)
            if cid not in siblings:
                siblings = (cid,)
            entry = (socket if socket is not None and socket >= 0 else 0, core if core is not None else cid, siblings)
            for s in siblings:
                core_of[s] = entry
        if cid not in l3_of:
            l3 = tuple(s for s in (_cache_domain(d) or ()) if s in online)
            if cid not in l3:
                l3 = tuple(sorted(node_cpus.get(node, [cid])))
            for s in l3:
                l3_of.setdefault(s, l3)
        socket, core, siblings = core_of[cid]
        out.append(Cpu(id=cid, node=node, socket=socket, core=core, siblings=siblings, l3=l3_of[cid]))
    return out


def _read_pci(sys_root: Path) -> list[dict]:
    pci_dir = sys_root / "bus/pci/devices"
    if not pci_dir.is_dir():
        return []
    out = []
    for dev in pci_dir.iterdir():
        try:
            addr = gpumod.normalize_pci(dev.name)
        except ValueError:
            continue
        cls = _read_int(dev / "class", 16)
        vendor = _read_int(dev / "vendor", 16)
        if cls is None or vendor is None:
            continue
        local = _read(dev / "local_cpulist")
        out.append({
            "address": addr,
            "class": cls >> 8,
            "vendor": vendor,
            "numa_node": _read_int(dev / "numa_node"),
            "local_cpus": parse_cpulist(local) if local else (),
        })
    out.sort(key=lambda d: d["address"])
    return out


def _device_node(
    dev: dict, nodes: list[Node], cpu_node: dict[int, int]
) -> tuple[int | None, str | None]:
    """The device's node, and a reason when it is unknown."""
    n = dev["numa_node"]
    if n is not None and n >= 0 and any(x.id == n for x in nodes):
        return n, None
    if len([x for x in nodes if x.has_cpus]) <= 1 and len(nodes) <= 1:
        return (nodes[0].id if nodes else 0), None
    spanned = {cpu_node[c] for c in dev["local_cpus"] if c in cpu_node}
    if len(spanned) == 1:
        return spanned.pop(), None
    if not dev["local_cpus"]:
        why = "its local_cpulist is missing"
    else:
        why = f"its local CPUs {format_cpulist(dev['local_cpus'])} span nodes {format_cpulist(spanned)}"
    return None, f"sysfs numa_node is {n if n is not None else 'missing'} and {why}"


def discover_topology(
    sysfs_root: str | None, proc_root: str | None, env: Mapping[str, str] | None = None
) -> Topology:
    live = sysfs_root is None and proc_root is None
    sys_root = Path(sysfs_root if sysfs_root is not None else "/sys")
    proc = Path(proc_root) if proc_root is not None else (Path("/proc") if sysfs_root is None else None)

    if not sys_root.is_dir():
        raise TopologyError(f"sysfs root {sys_root} does not exist or is not a directory")
    if not (sys_root / "devices/system/cpu").is_dir():
        raise TopologyError(f"{sys_root} is not a sysfs tree (no devices/system/cpu)")
    if proc is not None and not proc.is_dir():
        raise TopologyError(f"procfs root {proc} does not exist or is not a directory")

    raw_nodes = _read_nodes(sys_root)
    diags: list[Diagnostic] = []
    if not raw_nodes:  # kernel without NUMA: the whole machine is node 0
        cpu_ids = _cpulist(sys_root / "devices/system/cpu/online") or ()
        mem = _meminfo(proc / "meminfo") if proc is not None else {}
        raw_nodes = [(0, cpu_ids, mem.get("MemTotal", 0), mem.get("MemFree", 0), [10])]

    node_of = {c: nid for nid, cpus, *_ in raw_nodes for c in cpus}
    cpus = _read_cpus(sys_root, node_of)
    online = {c.id for c in cpus}
    nodes = [Node(id=nid, cpus=tuple(c for c in cpu_ids if c in online), memory_total=total,
                  memory_free=free, distances=tuple(dist))
             for nid, cpu_ids, total, free, dist in raw_nodes]

    # The process's cpuset and memory nodes.
    allowed_cpus: tuple[int, ...] = tuple(sorted(online))
    allowed_mems = tuple(n.id for n in nodes if n.has_memory) or tuple(n.id for n in nodes)
    numa_balancing = None
    if proc is not None:
        status = _read(proc / "self/status") or ""
        for line in status.splitlines():
            key, _, value = line.partition(":")
            try:
                if key == "Cpus_allowed_list":
                    allowed_cpus = tuple(c for c in parse_cpulist(value) if c in online)
                elif key == "Mems_allowed_list":
                    mems = set(parse_cpulist(value))
                    allowed_mems = tuple(n for n in allowed_mems if n in mems)
            except ValueError:
                raise TopologyError(f"{proc / 'self/status'}: malformed {key}: {value.strip()!r}") from None
        nb = _read_int(proc / "sys/kernel/numa_balancing")
        numa_balancing = None if nb is None else nb != 0

    # PCI devices: GPUs in CUDA numbering, NICs.
    pci = _read_pci(sys_root)
    by_addr = {d["address"]: d for d in pci}
    phys = [d for d in pci if d["class"] in _GPU_CLASSES and d["vendor"] in _GPU_VENDORS]
    vendor = "nvidia" if any(d["vendor"] == 0x10DE for d in phys) else "amd"
    phys = [d for d in phys if _GPU_VENDORS[d["vendor"]] == vendor]
    env = os.environ if env is None else env
    override = env.get("COMPOSER_NUMA_GPUS")
    if override is not None:
        visible: list[str | None] = []
        for item in override.split(","):
            if not item.strip():
                continue
            try:
                visible.append(gpumod.normalize_pci(item))
            except ValueError as e:
                raise TopologyError(f"COMPOSER_NUMA_GPUS: {e}") from None
    else:
        physical = [d["address"] for d in phys]
        if live:
            torch_ids = gpumod.torch_cuda_bus_ids()
            if torch_ids is not None and all(b in by_addr for b in torch_ids):
                physical, env = torch_ids, {}  # already the visible ordinals
        need_uuid = live and any(
            x.strip().upper().startswith(("GPU-", "MIG-"))
            for v in _VISIBLE_VARS[vendor] for x in env.get(v, "").split(",")
        )
        uuid_map = gpumod.nvml_bus_ids_by_uuid() if need_uuid else None
        visible, uuid_diags = gpumod.visible_order(physical, env, _VISIBLE_VARS[vendor], uuid_map)
        diags.extend(uuid_diags)

    cpu_node = {c.id: c.node for c in cpus}
    gpu_list = []
    for index, addr in enumerate(visible):
        dev = by_addr.get(addr) if addr else None
        if dev is None:
            node, why = None, ("its PCI address is unknown" if addr is None
                               else f"{addr} is not in {sys_root / 'bus/pci/devices'}")
        else:
            node, why = _device_node(dev, nodes, cpu_node)
        if why is not None:
            label = addr or "unresolved"
            diags.append(Diagnostic(GPU_NUMA_UNKNOWN, f"GPU {index} ({label}): NUMA node unknown: {why}"))
        gpu_list.append(Gpu(
            index=index,
            pci_bus_id=addr,
            vendor=_GPU_VENDORS.get(dev["vendor"], "unknown") if dev else "unknown",
            numa_node=node,
            local_cpus=dev["local_cpus"] if dev else (),
        ))

    nics = []
    for d in pci:
        kind = _NIC_CLASSES.get(d["class"])
        if kind is None:
            continue
        node, _ = _device_node(d, nodes, cpu_node)
        nics.append(Nic(pci_bus_id=d["address"], kind=kind,
                        vendor=_VENDORS.get(d["vendor"], f"{d['vendor']:#06x}"),
                        numa_node=node, local_cpus=d["local_cpus"]))

    return Topology(
        nodes=tuple(nodes),
        cpus=tuple(cpus),
        gpus=tuple(gpu_list),
        nics=tuple(nics),
        allowed_cpus=allowed_cpus,
        allowed_mems=allowed_mems,
        numa_balancing=numa_balancing,
        diagnostics=tuple(diags),
        live=live,
    )
