"""The machine as composer-numa sees it: NUMA nodes, CPUs, GPUs, NICs, the cpuset and capacity.

Immutable dataclasses filled by :func:`composer_numa.machine.sysfs.discover`
(or built by hand in tests). Reading the machine decides nothing:
:mod:`composer_numa.plan` turns a :class:`Topology` into bindings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from composer_numa.diagnostics import Diagnostic

__all__ = ["Cpu", "Node", "Gpu", "Nic", "Topology"]


@dataclass(frozen=True)
class Cpu:
    """One logical CPU.

    Attributes:
        id: logical CPU number.
        node: NUMA node holding it.
        socket: ``physical_package_id``.
        core: ``core_id`` (unique only within a socket).
        siblings: SMT siblings including itself, sorted.
        l3: CPUs sharing its highest-level unified cache (its L3 domain), sorted.
    """

    id: int
    node: int
    socket: int
    core: int
    siblings: tuple[int, ...]
    l3: tuple[int, ...]

    @property
    def core_key(self) -> int:
        """A machine-wide id of the physical core: its lowest SMT sibling."""
        return min(self.siblings) if self.siblings else self.id


@dataclass(frozen=True)
class Node:
    """One NUMA node.

    Attributes:
        id: node number.
        cpus: online CPUs of the node (empty for CPU-less HBM/CXL/GPU-memory nodes).
        memory_total: ``MemTotal`` in bytes (0 for a memory-less node).
        memory_free: ``MemFree`` in bytes.
        distances: SLIT distances to every node, in the order of ``Topology.nodes``.
        memory_available: bytes the kernel can give now (free + clean page cache +
            reclaimable slab - low watermark, see :mod:`composer_numa.machine.capacity`);
            None when unknown, in which case ``memory_free`` stands in.
    """

    id: int
    cpus: tuple[int, ...]
    memory_total: int
    memory_free: int
    distances: tuple[int, ...]
    memory_available: int | None = None

    @property
    def has_cpus(self) -> bool:
        return bool(self.cpus)

    @property
    def has_memory(self) -> bool:
        return self.memory_total > 0

    @property
    def available(self) -> int:
        """What capacity checks use: ``memory_available``, else ``memory_free``."""
        return self.memory_free if self.memory_available is None else self.memory_available


@dataclass(frozen=True)
class Gpu:
    """A GPU as CUDA/HIP numbers it in this process.

    Attributes:
        index: device ordinal after ``CUDA_VISIBLE_DEVICES`` (or the HIP/ROCR variables).
        pci_bus_id: normalised ``dddd:bb:dd.f``; None when it could not be resolved.
        vendor: ``"nvidia"``, ``"amd"`` or ``"unknown"``.
        numa_node: the node it hangs off; None when unknown.
        local_cpus: sysfs ``local_cpulist`` of the device.
        numa_unknown_reason: why ``numa_node`` is None (what sysfs said), else None.
        model: the PCI device id (``0x2330``), when known.
        memory_node: the CPU-less NUMA node that is this GPU's own memory, on machines whose
            GPU memory the kernel manages as a node (Grace Hopper, Grace Blackwell); None elsewhere.
    """

    index: int
    pci_bus_id: str | None
    vendor: str
    numa_node: int | None
    local_cpus: tuple[int, ...] = ()
    numa_unknown_reason: str | None = None
    model: str | None = None
    memory_node: int | None = None


@dataclass(frozen=True)
class Nic:
    """A network adapter (Ethernet or InfiniBand) and its node."""

    pci_bus_id: str
    kind: str
    vendor: str
    numa_node: int | None
    local_cpus: tuple[int, ...] = ()


@dataclass(frozen=True)
class Topology:
    """Everything the planner needs to know about the machine.

    Attributes:
        nodes: NUMA nodes in id order (a non-NUMA kernel gives one node 0).
        cpus: online CPUs in id order (those no node claims are left out).
        gpus: visible GPUs in device-ordinal order.
        nics: network adapters in PCI order.
        allowed_cpus: the process's cpuset (``Cpus_allowed_list``) within the online CPUs;
            empty means "no restriction".
        allowed_mems: the process's memory nodes (``Mems_allowed_list``).
        numa_balancing: ``/proc/sys/kernel/numa_balancing`` is on; None when unreadable.
        diagnostics: warnings found while reading the machine.
        live: read from this running machine (not from a fake tree).
        memory_room: bytes the memory cgroup still allows (reclaimable page cache
            counted as available); None when there is no limit.
    """

    nodes: tuple[Node, ...]
    cpus: tuple[Cpu, ...]
    gpus: tuple[Gpu, ...] = ()
    nics: tuple[Nic, ...] = ()
    allowed_cpus: tuple[int, ...] = ()
    allowed_mems: tuple[int, ...] = ()
    numa_balancing: bool | None = None
    diagnostics: tuple[Diagnostic, ...] = ()
    live: bool = False
    memory_room: int | None = None
    _cpu_index: dict = field(default=None, init=False, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_cpu_index", {c.id: c for c in self.cpus})

    def node(self, node_id: int) -> Node:
        """The node with id ``node_id`` (KeyError if there is none)."""
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(f"no NUMA node {node_id}")

    def cpu(self, cpu_id: int) -> Cpu:
        """The CPU with id ``cpu_id`` (KeyError if it is not online)."""
        return self._cpu_index[cpu_id]

    def distance(self, a: int, b: int) -> int:
        """SLIT distance from node ``a`` to node ``b`` (10 local, 20 remote if unknown)."""
        ids = [n.id for n in self.nodes]
        row = self.node(a).distances
        j = ids.index(b)
        if j < len(row):
            return row[j]
        return 10 if a == b else 20

    @property
    def sockets(self) -> dict[int, tuple[int, ...]]:
        """Socket id -> its online CPUs."""
        out: dict[int, list[int]] = {}
        for c in self.cpus:
            out.setdefault(c.socket, []).append(c.id)
        return {s: tuple(sorted(v)) for s, v in sorted(out.items())}

    @property
    def cpu_nodes(self) -> tuple[Node, ...]:
        """Nodes that have CPUs (the only ones a rank's threads may be planned on)."""
        return tuple(n for n in self.nodes if n.has_cpus)

    def cores(self, cpus) -> int:
        """Physical cores among ``cpus`` (SMT siblings count once)."""
        wanted = set(cpus)
        return len({c.core_key for c in self.cpus if c.id in wanted})

    def attached_cpu_node(self, node_id: int) -> int | None:
        """The CPU node a CPU-less memory node belongs to: its nearest node with CPUs."""
        cpu_nodes = [n.id for n in self.cpu_nodes]
        if not cpu_nodes:
            return None
        return min(cpu_nodes, key=lambda c: (self.distance(node_id, c), c))

    def summary(self) -> str:
        """One line: sockets, nodes (and how many lack CPUs), CPUs and cores, GPUs, NICs."""
        nodes, memory_only = len(self.nodes), len(self.nodes) - len(self.cpu_nodes)
        parts = [
            _count(len(self.sockets), "socket"),
            _count(nodes, "NUMA node") + (f" ({memory_only} without CPUs)" if memory_only else ""),
            f"{_count(len(self.cpus), 'CPU')} ({_count(self.cores(c.id for c in self.cpus), 'core')})",
            _count(len(self.gpus), "GPU"),
            _count(len(self.nics), "NIC"),
        ]
        return ", ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
