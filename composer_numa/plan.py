"""The rank planner: a pure function from a :class:`~composer_numa.topology.Topology`
and options to one binding per local rank.

No I/O happens here, so every decision can be tested from fake topologies and
shown by ``composer-numa report`` before anything is applied.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import Enum

from composer_numa.diagnostics import Diagnostic
from composer_numa.topology import Topology

__all__ = ["Mode", "MemoryPolicy", "PlanOptions", "RankPlan", "Plan", "plan"]


class Mode(str, Enum):
    """Which CPUs a rank gets."""

    NODE = "node"  # the allowed CPUs of its GPU's node
    SOCKET = "socket"  # the allowed CPUs of its GPU's socket
    EXCLUSIVE = "exclusive"  # a contiguous, SMT-whole share of its node's physical cores
    CORE_COMPLEX = "core-complex"  # one L3 domain of its node
    NONE = "none"  # leave CPU affinity alone


class MemoryPolicy(str, Enum):
    """Where a rank's memory goes (Linux ``set_mempolicy`` modes)."""

    PREFERRED = "preferred"
    BIND = "bind"
    INTERLEAVE = "interleave"
    LOCAL = "local"
    NONE = "none"


@dataclass(frozen=True)
class PlanOptions:
    """What the user asked for.

    Attributes:
        nproc: ranks on this host (local world size), at least 1.
        mode: CPU placement mode.
        memory: memory policy.
        memory_need: bytes one rank needs on its node; a strict ``bind`` that
            cannot hold it falls back to ``preferred``.
    """

    nproc: int = 1
    mode: Mode = Mode.NODE
    memory: MemoryPolicy = MemoryPolicy.PREFERRED
    memory_need: int | None = None


@dataclass(frozen=True)
class RankPlan:
    """The binding of one local rank.

    Attributes:
        local_rank: rank on this host.
        gpu: device ordinal it drives; None for CPU-only ranks.
        gpu_pci_bus_id: that GPU's PCI address, when known.
        numa_nodes: nodes its CPUs belong to.
        cpus: CPUs its threads may run on (never empty, always allowed).
        memory_policy: the policy to apply.
        memory_nodes: nodes for the policy (empty for ``local`` and ``none``).
        num_threads: intra-op threads it should use.
    """

    local_rank: int
    gpu: int | None
    gpu_pci_bus_id: str | None
    numa_nodes: tuple[int, ...]
    cpus: tuple[int, ...]
    memory_policy: MemoryPolicy
    memory_nodes: tuple[int, ...]
    num_threads: int

    def to_json(self) -> dict:
        d = asdict(self)
        d["memory_policy"] = self.memory_policy.value
        for k in ("numa_nodes", "cpus", "memory_nodes"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict | str) -> RankPlan:
        if isinstance(d, str):
            d = json.loads(d)
        return cls(
            local_rank=int(d["local_rank"]),
            gpu=None if d.get("gpu") is None else int(d["gpu"]),
            gpu_pci_bus_id=d.get("gpu_pci_bus_id"),
            numa_nodes=tuple(int(x) for x in d["numa_nodes"]),
            cpus=tuple(int(x) for x in d["cpus"]),
            memory_policy=MemoryPolicy(d["memory_policy"]),
            memory_nodes=tuple(int(x) for x in d["memory_nodes"]),
            num_threads=int(d["num_threads"]),
        )


@dataclass(frozen=True)
class Plan:
    """Bindings for every local rank plus the warnings the planner raised."""

    options: PlanOptions
    ranks: tuple[RankPlan, ...]
    warnings: tuple[Diagnostic, ...] = ()


def plan(topology: Topology, options: PlanOptions) -> Plan:
    """Plan every local rank's CPUs, memory policy and thread count.

    Raises:
        PlanError: the options are invalid (``nproc`` < 1, negative memory need).
    """
    raise NotImplementedError("planner is being written")
