"""Facts every report format shows the same way: warnings, sockets per node, labels.

Pure functions of a :class:`~composer_numa.machine.topology.Topology` and a
:class:`~composer_numa.plan.Plan`, shared by the text, JSON and SVG renderers.
"""

from __future__ import annotations

from composer_numa.diagnostics import Diagnostic
from composer_numa.machine.topology import Node, Topology
from composer_numa.plan import MemoryPolicy, Plan, RankPlan
from composer_numa.units import format_cpulist, format_size

__all__ = ["warnings_of", "node_sockets", "socket_nodes", "memory_text", "balancing_text", "options_text",
           "capacity_text"]


def warnings_of(topology: Topology, plan: Plan) -> list[Diagnostic]:
    """Discovery's and the planner's warnings, in that order, each (code, message) once."""
    return list(dict.fromkeys((*topology.diagnostics, *plan.warnings)))


def node_sockets(topology: Topology, node: Node) -> list[int]:
    """Sockets the node's CPUs sit in (empty for a CPU-less node)."""
    return sorted({c.socket for c in topology.cpus if c.node == node.id})


def socket_nodes(topology: Topology) -> dict[int, list[int]]:
    """Socket id -> the nodes of its CPUs."""
    out: dict[int, set[int]] = {}
    for c in topology.cpus:
        out.setdefault(c.socket, set()).add(c.node)
    return {s: sorted(v) for s, v in sorted(out.items())}


def memory_text(r: RankPlan) -> str:
    """``"bind 0"``, ``"preferred 1,0"``, ``"local"``."""
    if r.memory_policy in (MemoryPolicy.NONE, MemoryPolicy.LOCAL) or not r.memory_nodes:
        return r.memory_policy.value
    return f"{r.memory_policy.value} {','.join(str(n) for n in r.memory_nodes)}"


def balancing_text(value: bool | None) -> str:
    return "unknown" if value is None else ("on" if value else "off")


def options_text(plan: Plan) -> str:
    o = plan.options
    need = "" if o.memory_need is None else f", memory need {format_size(o.memory_need)}"
    target = "" if o.memory_target.value == "local" else f", memory target {o.memory_target.value}"
    return f"nproc {o.nproc}, mode {o.mode.value}, memory {o.memory.value}{need}{target}"


def capacity_text(topology: Topology) -> str:
    """What memory-need checks compare with: each node's available memory and the cgroup's room."""
    room = ("no memory cgroup limit" if topology.memory_room is None
            else f"memory cgroup room {format_size(topology.memory_room)}")
    return f"available memory (free + clean page cache + reclaimable slab - low watermark); {room}"


def cpus_text(cpus) -> str:
    return format_cpulist(cpus, "-")
