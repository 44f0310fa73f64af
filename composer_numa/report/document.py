"""The report as a JSON document, ``"schema": 1``: a stable interface (``docs/report-json.md``)."""

from __future__ import annotations

import json
import socket

from composer_numa._version import __version__
from composer_numa.machine.topology import Topology
from composer_numa.plan import Plan
from composer_numa.report.facts import node_sockets, socket_nodes, warnings_of

__all__ = ["SCHEMA", "to_json", "render_json"]

SCHEMA = 1


def to_json(topology: Topology, plan: Plan) -> dict:
    """The report as a JSON-ready dict, ``"schema": 1`` (see ``docs/report-json.md``)."""
    by_socket = socket_nodes(topology)
    o = plan.options
    return {
        "schema": SCHEMA,
        "version": __version__,
        "live": bool(topology.live),
        "host": _host() if topology.live else None,
        "nodes": [
            {
                "id": n.id,
                "cpus": list(n.cpus),
                "memory_total_bytes": n.memory_total,
                "memory_free_bytes": n.memory_free,
                "memory_available_bytes": n.available,
                "distances": list(n.distances),
                "has_cpus": n.has_cpus,
                "has_memory": n.has_memory,
                "sockets": node_sockets(topology, n),
            }
            for n in topology.nodes
        ],
        "sockets": [
            {"id": s, "cpus": list(cpus), "numa_nodes": by_socket.get(s, [])}
            for s, cpus in topology.sockets.items()
        ],
        "gpus": [
            {
                "index": g.index,
                "pci_bus_id": g.pci_bus_id,
                "vendor": g.vendor,
                "numa_node": g.numa_node,
                "local_cpus": list(g.local_cpus),
                "numa_unknown_reason": g.numa_unknown_reason,
                "memory_node": g.memory_node,
            }
            for g in topology.gpus
        ],
        "nics": [
            {
                "pci_bus_id": n.pci_bus_id,
                "kind": n.kind,
                "vendor": n.vendor,
                "numa_node": n.numa_node,
                "local_cpus": list(n.local_cpus),
            }
            for n in topology.nics
        ],
        "cpuset": {"cpus": list(topology.allowed_cpus), "mems": list(topology.allowed_mems)},
        "numa_balancing": topology.numa_balancing,
        "memory_room_bytes": topology.memory_room,
        "plan": [r.to_json() for r in plan.ranks],
        "options": {
            "nproc": o.nproc,
            "mode": o.mode.value,
            "memory": o.memory.value,
            "memory_need_bytes": o.memory_need,
            "memory_target": o.memory_target.value,
        },
        "warnings": [d.to_json() for d in warnings_of(topology, plan)],
    }


def _host() -> str | None:
    """This machine's name, as ``composer-numa report --merge`` labels its rows."""
    try:
        return socket.gethostname() or None
    except OSError:
        return None


def render_json(topology: Topology, plan: Plan) -> str:
    """:func:`to_json` as indented text."""
    return json.dumps(to_json(topology, plan), indent=2) + "\n"


