"""Reading sysfs and procfs into a :class:`~composer_numa.machine.topology.Topology`.

Only standard files are required (node and CPU topology, PCI ``class``/
``vendor``/``numa_node``/``local_cpulist``, ``/proc/self/status``); anything
else is optional, so containers and recorded trees with a subset still work.

A damaged tree never gives a silently different machine: a file the plan
cannot do without (the node and CPU lists, the cpuset) that is unreadable or
malformed is a :class:`~composer_numa.errors.TopologyError` naming it; an
optional one is worked around and reported with ``topology-incomplete`` saying
what was assumed. Reads are bounded and never block (see :mod:`.files`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from composer_numa.diagnostics import GPU_ORDER_UNCERTAIN, TOPOLOGY_INCOMPLETE, Diagnostic
from composer_numa.errors import TopologyError
from composer_numa.machine import capacity, gpus, procfs
from composer_numa.machine.files import UnreadableFile, read_cpulist, read_int, read_optional, read_text
from composer_numa.machine.topology import Cpu, Gpu, Nic, Node, Topology
from composer_numa.units import format_cpulist, parse_cpulist

__all__ = ["discover", "read_numastat"]

_VENDORS = {0x10DE: "nvidia", 0x1002: "amd", 0x8086: "intel", 0x15B3: "mellanox",
            0x14E4: "broadcom", 0x1D0F: "amazon", 0x1A03: "aspeed"}
_GPU_VENDORS = {0x10DE: "nvidia", 0x1002: "amd"}
_GPU_CLASSES = {0x0300, 0x0302, 0x0380}
_NIC_CLASSES = {0x0200: "ethernet", 0x0207: "infiniband"}
_VISIBLE_VARS = {"nvidia": ("CUDA_VISIBLE_DEVICES",),
                 "amd": ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")}


def discover(
    sysfs_root: str | None = None,
    proc_root: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Topology:
    """Read the machine.

    Args:
        sysfs_root: root of a sysfs tree; None reads the live ``/sys``.
        proc_root: root of a procfs tree; None reads the live ``/proc`` when
            ``sysfs_root`` is None too, otherwise no cpuset restriction applies.
        env: environment holding ``CUDA_VISIBLE_DEVICES`` and friends,
            ``CUDA_DEVICE_ORDER`` and ``COMPOSER_NUMA_GPUS``; None uses ``os.environ``.

    With a non-live root, NVML and torch.cuda are never consulted.

    Raises:
        TopologyError: a root is missing, or a file the plan needs is unreadable or malformed.
    """
    live = sysfs_root is None and proc_root is None
    sys_root = str(sysfs_root) if sysfs_root is not None else "/sys"
    proc = str(proc_root) if proc_root is not None else ("/proc" if sysfs_root is None else None)
    if not os.path.isdir(sys_root):
        raise TopologyError(f"sysfs root {sys_root} does not exist or is not a directory")
    if not os.path.isdir(os.path.join(sys_root, "devices/system/cpu")):
        raise TopologyError(f"{sys_root} is not a sysfs tree (no devices/system/cpu)")
    if proc is not None and not os.path.isdir(proc):
        raise TopologyError(f"procfs root {proc} does not exist or is not a directory")
    return _Reader(sys_root, proc, os.environ if env is None else env, live).read()


def _required_list(path: str) -> tuple[int, ...] | None:
    """A cpulist the plan cannot do without: None when absent, TopologyError when bad."""
    try:
        text = read_text(path)
    except FileNotFoundError:
        return None
    except UnreadableFile as e:
        raise TopologyError(f"{e}") from None
    try:
        return parse_cpulist(text)
    except ValueError as e:
        raise TopologyError(f"{path}: {e}") from None


class _Reader:
    """One discovery: the roots, the warnings found so far, and the steps in order."""

    def __init__(self, sys_root: str, proc: str | None, env: Mapping[str, str], live: bool) -> None:
        self.sys, self.proc, self.env, self.live = sys_root, proc, env, live
        self.diags: list[Diagnostic] = []
        self.problems: list[str] = []  # unreadable optional files, reported together

    def path(self, rel: str) -> str:
        return os.path.join(self.sys, rel)

    def incomplete(self, message: str, outcome: str) -> None:
        self.diags.append(Diagnostic(TOPOLOGY_INCOMPLETE, message, outcome))

    def read(self) -> Topology:
        node_ids, node_cpus = self._nodes()
        online = self._online_cpus(node_cpus)
        node_of = self._assign_cpus(node_ids, node_cpus, online)
        cpus = self._cpus(sorted(node_of), node_of)
        claimed = {c.id for c in cpus}
        memory = capacity.read_nodes(node_ids, self.sys, self.proc, self.problems)
        nodes = []
        for nid in node_ids:
            m = memory.get(nid)
            if m is None and nid in self.meminfo_expected:
                self.incomplete(f"node {nid}: meminfo is missing or unreadable",
                                "its memory is unknown and it is treated as having none")
            nodes.append(Node(
                id=nid, cpus=tuple(c for c in node_cpus.get(nid, ()) if c in claimed),
                memory_total=m.total if m else 0, memory_free=m.free if m else 0,
                distances=self._distances(nid, node_ids), memory_available=m.available if m else None))
        allowed_cpus, allowed_mems, balancing = self._process(claimed, nodes)
        gpu_list, nic_list = self._pci(nodes, {c.id: c.node for c in cpus})
        room = None
        if self.proc is not None:
            room = procfs.cgroup_memory_room(self.proc, self.path("fs/cgroup"), self.problems)
        problems = list(dict.fromkeys(self.problems))
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            self.incomplete(f"cannot read {len(problems)} file(s): " + "; ".join(problems[:3]) + more,
                            "what they would say is assumed as described in the other warnings, or ignored")
        return Topology(
            nodes=tuple(nodes), cpus=tuple(cpus), gpus=tuple(gpu_list), nics=tuple(nic_list),
            allowed_cpus=allowed_cpus, allowed_mems=allowed_mems, numa_balancing=balancing,
            diagnostics=tuple(dict.fromkeys(self.diags)), live=self.live, memory_room=room)

    # -- nodes and CPUs --------------------------------------------------------------

    def _nodes(self) -> tuple[list[int], dict[int, tuple[int, ...]]]:
        node_dir = self.path("devices/system/node")
        ids = _required_list(os.path.join(node_dir, "online"))
        if ids is None:
            try:
                names = os.listdir(node_dir)
            except OSError:
                names = []
            ids = tuple(sorted(int(n[4:]) for n in names if n.startswith("node") and n[4:].isdigit()))
        self.numa = bool(ids)
        if not ids:  # a kernel without NUMA: the whole machine is node 0
            self.meminfo_expected = set()
            return [0], {}
        node_cpus = {nid: _required_list(os.path.join(node_dir, f"node{nid}/cpulist")) or () for nid in ids}
        self.meminfo_expected = set(ids)
        return list(ids), node_cpus

    def _online_cpus(self, node_cpus: dict[int, tuple[int, ...]]) -> tuple[int, ...]:
        cpu_dir = self.path("devices/system/cpu")
        ids = _required_list(os.path.join(cpu_dir, "online"))
        if ids is None:
            ids = tuple(sorted(int(n[3:]) for n in os.listdir(cpu_dir) if n.startswith("cpu") and n[3:].isdigit()))
        if not ids and node_cpus:
            ids = tuple(sorted({c for cpus in node_cpus.values() for c in cpus}))
        if not ids:
            raise TopologyError(f"{cpu_dir}: no online CPU is listed")
        return ids

    def _assign_cpus(self, node_ids: list[int], node_cpus: dict[int, tuple[int, ...]],
                     online: tuple[int, ...]) -> dict[int, int]:
        """CPU -> node for every online CPU some node claims (or whose ``cpuN/nodeM`` link says)."""
        if not self.numa:
            node_cpus[0] = online
            return dict.fromkeys(online, 0)
        on = set(online)
        node_of: dict[int, int] = {}
        for nid in node_ids:
            for c in node_cpus.get(nid, ()):
                if c in on:
                    node_of.setdefault(c, nid)
        stray = [c for c in online if c not in node_of]
        recovered = []
        for c in stray:
            links = [n for n in _listdir(self.path(f"devices/system/cpu/cpu{c}"))
                     if n.startswith("node") and n[4:].isdigit() and int(n[4:]) in node_ids]
            if len(links) == 1:
                nid = int(links[0][4:])
                node_of[c] = nid
                node_cpus[nid] = tuple(sorted({*node_cpus.get(nid, ()), c}))
                recovered.append(c)
        lost = [c for c in stray if c not in node_of]
        empty = [n for n in node_ids if not node_cpus.get(n)]
        if recovered:
            self.incomplete(f"CPUs {format_cpulist(recovered)} are online but no node's cpulist names them",
                            "their node was taken from the cpuN/nodeM links")
        if lost:
            hint = f" (node {format_cpulist(empty)}'s cpulist is empty)" if empty else ""
            self.incomplete(f"CPUs {format_cpulist(lost)} are online but belong to no NUMA node{hint}",
                            "they are left out of the plan")
        if not node_of:
            raise TopologyError(f"{self.path('devices/system/node')}: no NUMA node lists an online CPU")
        return node_of

    def _cpus(self, ids: list[int], node_of: dict[int, int]) -> list[Cpu]:
        cpu_dir = self.path("devices/system/cpu")
        online = set(ids)
        node_members: dict[int, list[int]] = {}
        for c in ids:
            node_members.setdefault(node_of[c], []).append(c)
        package: dict[int, int | None] = {}
        core_id: dict[int, int | None] = {}
        siblings: dict[int, tuple[int, ...]] = {}
        l3_of: dict[int, tuple[int, ...]] = {}
        no_package, no_core, no_siblings = [], [], []
        # Sibling sets and cache domains are the same for every member, so each is read once:
        # a 256-CPU machine costs a few hundred file reads instead of thousands.
        for cid in ids:
            d = os.path.join(cpu_dir, f"cpu{cid}")
            pkg = read_int(os.path.join(d, "topology/physical_package_id"), self.problems)
            package[cid] = pkg if pkg is not None and pkg >= 0 else None
            core_id[cid] = read_int(os.path.join(d, "topology/core_id"), self.problems)
            if package[cid] is None:
                no_package.append(cid)
            if core_id[cid] is None:
                no_core.append(cid)
            if cid not in siblings:
                sib = read_cpulist(os.path.join(d, "topology/thread_siblings_list"), self.problems)
                if sib is None or cid not in sib:
                    no_siblings.append(cid)
                else:
                    group = tuple(s for s in sib if s in online)
                    for s in group:
                        siblings.setdefault(s, group)
            if cid not in l3_of:
                l3 = tuple(s for s in (self._cache_domain(d) or ()) if s in online and node_of[s] == node_of[cid])
                if cid not in l3:
                    l3 = tuple(node_members[node_of[cid]])
                for s in l3:
                    l3_of.setdefault(s, l3)
        sockets = self._sockets(ids, node_of, package, no_package)
        if no_siblings:
            by_core: dict[tuple[int, int], list[int]] = {}
            for c in no_siblings:
                if core_id[c] is not None and c not in siblings:
                    by_core.setdefault((sockets[c], core_id[c]), []).append(c)
            for group in by_core.values():
                for s in group:
                    siblings[s] = tuple(sorted(group))
            paired = [c for c in no_siblings if len(siblings.get(c, ())) > 1]
            self.incomplete(f"thread_siblings_list is missing or unreadable for CPUs {format_cpulist(no_siblings)}",
                            "SMT siblings were paired by (physical_package_id, core_id)" if paired
                            else "each of them is taken as a core of its own")
        if no_core:
            self.incomplete(f"core_id is missing or unreadable for CPUs {format_cpulist(no_core)}",
                            "each of them is taken as a core of its own")
        return [Cpu(id=c, node=node_of[c], socket=sockets[c],
                    core=core_id[c] if core_id[c] is not None else c,
                    siblings=siblings.get(c, (c,)), l3=l3_of[c]) for c in ids]

    def _sockets(self, ids: list[int], node_of: dict[int, int], package: dict[int, int | None],
                 missing: list[int]) -> dict[int, int]:
        if not missing:
            return {c: package[c] for c in ids}  # type: ignore[misc]
        known: dict[int, dict[int, int]] = {}  # node -> package -> count
        for c in ids:
            if package[c] is not None:
                per = known.setdefault(node_of[c], {})
                per[package[c]] = per.get(package[c], 0) + 1  # type: ignore[index]
        out: dict[int, int] = {}
        if known:
            for c in ids:
                votes = known.get(node_of[c])
                out[c] = package[c] if package[c] is not None else (
                    max(votes, key=lambda p: votes[p]) if votes else max(
                        (p for v in known.values() for p in v), default=0) + 1 + node_of[c])
            outcome = "they were given the socket of their node's other CPUs"
        else:
            out = {c: node_of[c] for c in ids}
            outcome = "each NUMA node is taken as a socket of its own"
        self.incomplete(f"physical_package_id is missing or unreadable for CPUs {format_cpulist(missing)}", outcome)
        return out

    def _cache_domain(self, cpu_dir: str) -> tuple[int, ...] | None:
        """CPUs sharing the highest-level unified (or data) cache of this CPU."""
        levels = []
        for name in _listdir(os.path.join(cpu_dir, "cache")):
            if name.startswith("index") and name[5:].isdigit():
                level = read_int(os.path.join(cpu_dir, "cache", name, "level"))
                if level is not None:
                    levels.append((level, name))
        for _, name in sorted(levels, key=lambda t: (-t[0], t[1])):
            idx = os.path.join(cpu_dir, "cache", name)
            if read_optional(os.path.join(idx, "type")) in ("Unified", "Data"):
                shared = read_cpulist(os.path.join(idx, "shared_cpu_list"))
                if shared is not None:
                    return shared
        return None

    def _distances(self, nid: int, node_ids: list[int]) -> tuple[int, ...]:
        if not self.numa:
            return (10,)
        path = self.path(f"devices/system/node/node{nid}/distance")
        text = read_optional(path, self.problems)
        if text is None:
            return ()
        try:
            row = tuple(int(x) for x in text.split())
        except ValueError:
            row = ()
        if len(row) != len(node_ids) or any(d <= 0 or d > 255 for d in row):
            self.incomplete(f"{path}: not a list of {len(node_ids)} distances: {text[:60]!r}",
                            "distances 10 (local) and 20 (remote) are assumed for this node")
            return ()
        return row

    # -- the process --------------------------------------------------------------------

    def _process(self, claimed: set[int], nodes: list[Node]
                 ) -> tuple[tuple[int, ...], tuple[int, ...], bool | None]:
        allowed_cpus: tuple[int, ...] = tuple(sorted(claimed))
        allowed_mems = tuple(n.id for n in nodes if n.has_memory) or tuple(n.id for n in nodes)
        if self.proc is None:
            return allowed_cpus, allowed_mems, None
        status_path = os.path.join(self.proc, "self/status")
        fields = procfs.status(self.proc, problems=self.problems)
        cpus_text, mems_text = fields.get("Cpus_allowed_list"), fields.get("Mems_allowed_list")
        try:
            if cpus_text is not None:
                listed = parse_cpulist(cpus_text)
                allowed_cpus = tuple(c for c in listed if c in claimed)
                if not allowed_cpus:
                    raise TopologyError(
                        f"{status_path}: the cpuset allows CPUs {format_cpulist(listed, 'none')}, none of which "
                        f"is an online CPU of a NUMA node ({format_cpulist(claimed)})")
            if mems_text is not None:
                mems = set(parse_cpulist(mems_text))
                allowed_mems = tuple(n for n in allowed_mems if n in mems)
        except ValueError as e:
            raise TopologyError(f"{status_path}: malformed cpuset: {e}") from None
        nb = read_int(os.path.join(self.proc, "sys/kernel/numa_balancing"), self.problems)
        return allowed_cpus, allowed_mems, (None if nb is None else nb != 0)

    # -- PCI devices: GPUs in CUDA numbering, NICs ----------------------------------------

    def _pci(self, nodes: list[Node], cpu_node: dict[int, int]) -> tuple[list[Gpu], list[Nic]]:
        pci_dir = self.path("bus/pci/devices")
        devices: dict[str, dict] = {}
        for name in sorted(_listdir(pci_dir)):
            try:
                addr = gpus.normalize_pci(name)
            except ValueError:
                continue
            d = os.path.join(pci_dir, name)
            cls = read_int(os.path.join(d, "class"), self.problems, 16)
            vendor = read_int(os.path.join(d, "vendor"), self.problems, 16)
            if cls is None or vendor is None:
                continue
            devices[addr] = {"dir": d, "address": addr, "class": cls >> 8, "vendor": vendor}
        phys = [x for x in devices.values() if x["class"] in _GPU_CLASSES and x["vendor"] in _GPU_VENDORS]
        vendor = "nvidia" if any(x["vendor"] == 0x10DE for x in phys) else "amd"
        phys = [x for x in phys if _GPU_VENDORS[x["vendor"]] == vendor]
        visible = self._visible(phys, devices, vendor)
        own_memory = self._gpu_memory(phys, nodes, vendor)
        gpu_list = []
        for index, addr in enumerate(visible):
            dev = devices.get(addr) if addr else None
            if dev is None:
                node, local = None, ()
                why = ("its PCI address is unknown (name the GPUs' PCI addresses in COMPOSER_NUMA_GPUS)"
                       if addr is None else f"{addr} is not in {pci_dir}")
            else:
                node, local, why = self._device_node(dev, nodes, cpu_node)
            model = read_optional(os.path.join(dev["dir"], "device")) if dev else None
            gpu_list.append(Gpu(index=index, pci_bus_id=addr,
                                vendor=_GPU_VENDORS.get(dev["vendor"], "unknown") if dev else "unknown",
                                numa_node=node, local_cpus=local, numa_unknown_reason=why, model=model,
                                memory_node=own_memory.get(addr) if addr else None))
        nics = []
        for dev in devices.values():
            kind = _NIC_CLASSES.get(dev["class"])
            if kind is not None:
                node, local, _ = self._device_node(dev, nodes, cpu_node)
                nics.append(Nic(pci_bus_id=dev["address"], kind=kind,
                                vendor=_VENDORS.get(dev["vendor"], f"{dev['vendor']:#06x}"),
                                numa_node=node, local_cpus=local))
        return gpu_list, nics

    def _gpu_memory(self, phys: list[dict], nodes: list[Node], vendor: str) -> dict[str, int]:
        """PCI address -> the CPU-less node holding that GPU's memory (Grace Hopper / Blackwell)."""
        if vendor != "nvidia" or not phys:
            return {}
        cpu_ids = [n.id for n in nodes if n.has_cpus]
        ids = [n.id for n in nodes]

        def nearest_cpu_node(n: Node) -> int | None:
            if not cpu_ids:
                return None
            row = n.distances if len(n.distances) == len(ids) else ()
            return min(cpu_ids, key=lambda c: (row[ids.index(c)] if row else 20, c))

        cpu_less = {n.id: nearest_cpu_node(n) for n in nodes if not n.has_cpus and n.has_memory}
        if not cpu_less:
            return {}
        physical = [(x["address"], read_int(os.path.join(x["dir"], "numa_node"))) for x in phys]
        physical = [(a, n if n is not None and n >= 0 else None) for a, n in physical]
        reported = gpus.nvml_memory_nodes() if self.live else None
        return gpus.memory_nodes(physical, cpu_less, reported)

    def _visible(self, phys: list[dict], devices: dict[str, dict], vendor: str) -> list[str | None]:
        override = self.env.get("COMPOSER_NUMA_GPUS")
        if override is not None:
            out: list[str | None] = []
            for item in override.split(","):
                if item.strip():
                    try:
                        out.append(gpus.normalize_pci(item))
                    except ValueError as e:
                        raise TopologyError(f"COMPOSER_NUMA_GPUS: {e}") from None
            return out
        physical = [x["address"] for x in phys]
        env = self.env
        exact = False
        if self.live:
            torch_ids = gpus.torch_cuda_bus_ids()
            if torch_ids is not None and all(b in devices for b in torch_ids):
                physical, env, exact = torch_ids, {}, True  # already the visible ordinals
        if not exact and vendor == "nvidia" and env.get("CUDA_DEVICE_ORDER", "") != "PCI_BUS_ID":
            models = {read_optional(os.path.join(x["dir"], "device")) for x in phys}
            if len(models - {None}) > 1:
                self.diags.append(Diagnostic(
                    GPU_ORDER_UNCERTAIN,
                    f"the GPUs are of {len(models - {None})} different models and CUDA_DEVICE_ORDER is "
                    f"{env.get('CUDA_DEVICE_ORDER') or 'unset (FASTEST_FIRST)'}, so CUDA may number them "
                    "fastest first rather than in PCI bus order",
                    "ranks are planned in PCI bus order; set CUDA_DEVICE_ORDER=PCI_BUS_ID to make CUDA agree"))
        variables = _VISIBLE_VARS[vendor]
        need_uuid = self.live and any(
            x.strip().upper().startswith(("GPU-", "MIG-"))
            for v in variables for x in env.get(v, "").split(","))
        uuid_map = gpus.nvml_bus_ids_by_uuid() if need_uuid else None
        visible, uuid_diags = gpus.visible_order(physical, env, variables, uuid_map)
        self.diags.extend(uuid_diags)
        return visible

    def _device_node(self, dev: dict, nodes: list[Node], cpu_node: dict[int, int]
                     ) -> tuple[int | None, tuple[int, ...], str | None]:
        """The device's node, its local CPUs, and why the node is unknown (None when known)."""
        n = read_int(os.path.join(dev["dir"], "numa_node"), self.problems)
        local_path = os.path.join(dev["dir"], "local_cpulist")
        bad: list[str] = []
        local = read_cpulist(local_path, bad) or ()
        if bad:
            self.incomplete(f"PCI device {dev['address']}: {bad[0]}", "its local CPUs are unknown")
        if n is not None and n >= 0 and any(x.id == n for x in nodes):
            return n, local, None
        if len(nodes) <= 1:
            return (nodes[0].id if nodes else 0), local, None
        spanned = {cpu_node[c] for c in local if c in cpu_node}
        if len(spanned) == 1:
            return spanned.pop(), local, None
        said = ("missing" if n is None else f"{n}, which is not a node" if n >= 0 else str(n))
        if bad:
            why = "its local_cpulist is unreadable"
        elif not local:
            why = "its local_cpulist is missing"
        else:
            why = f"its local CPUs {format_cpulist(local)} span nodes {format_cpulist(spanned)}"
        return None, local, f"sysfs numa_node is {said} and {why}"


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def read_numastat(sysfs_root: str = "/sys") -> dict[int, dict[str, int]]:
    """``nodeN/numastat`` counters per node (``numa_hit``, ``numa_miss``, ``other_node`` ...);
    empty when not readable (no NUMA, no sysfs)."""
    node_dir = os.path.join(sysfs_root, "devices/system/node")
    out: dict[int, dict[str, int]] = {}
    for name in _listdir(node_dir):
        if not (name.startswith("node") and name[4:].isdigit()):
            continue
        text = read_optional(os.path.join(node_dir, name, "numastat"))
        values = {}
        for line in (text or "").splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                values[key] = int(value)
        if values:
            out[int(name[4:])] = values
    return dict(sorted(out.items()))
