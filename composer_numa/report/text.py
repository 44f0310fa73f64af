"""The report as text: aligned tables for a terminal, or GitHub-flavoured Markdown."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from composer_numa._version import __version__
from composer_numa.machine.topology import Topology
from composer_numa.plan import Plan
from composer_numa.report.facts import (
    balancing_text,
    capacity_text,
    memory_text,
    node_sockets,
    options_text,
    socket_nodes,
    warnings_of,
)
from composer_numa.units import format_cpulist, format_size

__all__ = ["render_table", "render_markdown"]


def _dash(value) -> str:
    return "-" if value is None or value == "" else str(value)


def _sections(topology: Topology, plan: Plan) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, headers, rows, alignment) for every table of the report."""
    node_ids = [n.id for n in topology.nodes]
    by_socket = socket_nodes(topology)
    nodes = [
        [
            str(n.id),
            format_cpulist(n.cpus) if n.cpus else f"(none: memory only, near node {topology.attached_cpu_node(n.id)})",
            ",".join(str(s) for s in node_sockets(topology, n)) or "-",
            format_size(n.memory_total),
            format_size(n.memory_free),
            format_size(n.available),
            " ".join(str(d) for d in n.distances),
        ]
        for n in topology.nodes
    ]
    sockets = [
        [str(s), format_cpulist(cpus), str(topology.cores(cpus)),
         format_cpulist(by_socket.get(s, []))]
        for s, cpus in topology.sockets.items()
    ]
    gpus = [
        [str(g.index), _dash(g.pci_bus_id), g.vendor, _dash(g.numa_node),
         format_cpulist(g.local_cpus) or "-", _dash(g.memory_node)]
        for g in topology.gpus
    ]
    nics = [
        [_dash(n.pci_bus_id), n.kind, n.vendor, _dash(n.numa_node),
         format_cpulist(n.local_cpus) or "-"]
        for n in topology.nics
    ]
    ranks = [
        [str(r.local_rank), _dash(r.gpu), _dash(r.gpu_pci_bus_id),
         format_cpulist(r.numa_nodes) or "-", format_cpulist(r.cpus), memory_text(r),
         str(r.num_threads)]
        for r in plan.ranks
    ]
    dist_header = "distances to " + " ".join(str(i) for i in node_ids)
    return [
        ("NUMA nodes", ["node", "cpus", "socket", "memory", "free", "available", dist_header], nodes,
         "lllrrrl"),
        ("Sockets", ["socket", "cpus", "cores", "nodes"], sockets, "llrl"),
        ("GPUs", ["gpu", "pci address", "vendor", "node", "local cpus", "memory node"], gpus, "llllll"),
        ("NICs", ["pci address", "kind", "vendor", "node", "local cpus"], nics, "lllll"),
        (f"Plan ({options_text(plan)})",
         ["rank", "gpu", "gpu pci address", "nodes", "cpus", "memory", "threads"], ranks,
         "llllllr"),
    ]


def _machine_facts(topology: Topology) -> list[tuple[str, str]]:
    allowed_cpus = topology.allowed_cpus
    return [
        ("allowed CPUs", f"{format_cpulist(allowed_cpus) or '-'} "
                         f"({len(allowed_cpus)} of {len(topology.cpus)})"),
        ("allowed memory nodes", format_cpulist(topology.allowed_mems) or "-"),
        ("automatic NUMA balancing", balancing_text(topology.numa_balancing)),
        ("memory-need checks use", capacity_text(topology)),
    ]


def _aligned(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align, strict=True)]
        return "  ".join(out).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def render_table(topology: Topology, plan: Plan) -> str:
    """Plain text with aligned columns, for a terminal."""
    where = "this machine" if topology.live else "a recorded sysfs tree"
    lines = [f"composer-numa {__version__} report for {where}: {topology.summary()}", ""]
    for title, headers, rows, align in _sections(topology, plan):
        lines.append(title)
        if rows:
            lines.extend("  " + ln for ln in _aligned(headers, rows, align))
        else:
            lines.append("  (none)")
        lines.append("")
    width = max(len(k) for k, _ in _machine_facts(topology))
    lines.append("Process")
    lines.extend(f"  {k.ljust(width)}  {v}" for k, v in _machine_facts(topology))
    lines.append("")
    warns = warnings_of(topology, plan)
    lines.append(f"Warnings ({len(warns)})" if warns else "Warnings: none")
    for d in warns:
        lines.extend(textwrap.wrap(f"[{d.code}] {d.message}", 100, initial_indent="  ",
                                   subsequent_indent="    ", break_on_hyphens=False))
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(topology: Topology, plan: Plan) -> str:
    """GitHub-flavoured Markdown: a heading and a table per section."""
    where = "this machine" if topology.live else "a recorded sysfs tree"
    lines = ["# composer-numa report", "",
             f"{topology.summary()} ({where}, composer-numa {__version__}).", ""]
    for title, headers, rows, align in _sections(topology, plan):
        lines += [f"## {title}", ""]
        if not rows:
            lines += ["None.", ""]
            continue
        lines.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
        lines.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
        lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
        lines.append("")
    lines += ["## Process", ""]
    lines += [f"- {k}: {_md_cell(v)}" for k, v in _machine_facts(topology)]
    lines.append("")
    warns = warnings_of(topology, plan)
    lines += ["## Warnings", ""]
    if warns:
        lines += [f"- `{d.code}`: {_md_cell(d.message)}" for d in warns]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"
