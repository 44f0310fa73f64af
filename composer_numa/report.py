"""``composer-numa report``: the machine and the per-rank plan, as a table, JSON,
Markdown or an SVG picture.

The JSON form (``--format json``) is a stable interface, ``"schema": 1``,
documented in ``docs/report-json.md``. Rendering is pure: every ``render_*``
function takes a :class:`~composer_numa.topology.Topology` and a
:class:`~composer_numa.plan.Plan` and returns text, so it can be tested from
fake trees and reused by other tools. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Iterable, Sequence

from composer_numa._version import __version__
from composer_numa.cpulist import format_cpulist, format_size
from composer_numa.diagnostics import Diagnostic
from composer_numa.errors import ComposerNumaError
from composer_numa.plan import MemoryPolicy, Plan, RankPlan
from composer_numa.topology import Node, Topology

__all__ = [
    "SCHEMA",
    "FORMATS",
    "register",
    "run",
    "to_json",
    "render",
    "render_json",
    "render_table",
    "render_markdown",
    "warnings_of",
    "node_sockets",
]

SCHEMA = 1
FORMATS = ("table", "json", "markdown", "svg")


# --------------------------------------------------------------------------- CLI


def register(subparsers) -> None:
    """Add the ``report`` subcommand to the ``composer-numa`` parser."""
    from composer_numa.cli import add_plan_options

    p = subparsers.add_parser(
        "report",
        help="show the NUMA nodes, GPUs, NICs and each rank's planned binding",
        description="Show the machine (NUMA nodes, sockets, GPUs, NICs, cpuset) and the "
        "binding planned for each local rank, with any warnings. Nothing is applied.",
    )
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="output format (default: table); json is a stable interface")
    p.add_argument("--output", "-o", metavar="FILE", default=None,
                   help="write the report to FILE instead of standard output")
    p.add_argument("--nproc", type=_nproc_arg, default=None, metavar="N",
                   help="local ranks to plan (default: the visible GPUs, or 1)")
    add_plan_options(p)
    p.set_defaults(func=run)


def _nproc_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of ranks, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    """Discover, plan and write the report. Returns the exit status."""
    from composer_numa.cli import plan_from_args

    if args.nproc is not None and args.nproc < 1:
        raise ComposerNumaError(f"--nproc must be at least 1, got {args.nproc}")
    if args.output is not None:
        parent = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(parent):
            raise ComposerNumaError(f"cannot write {args.output}: directory {parent} does not exist")
    topology, plan = plan_from_args(args, args.nproc)
    text = render(topology, plan, args.format)
    if args.output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return 0
    try:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise ComposerNumaError(f"cannot write {args.output}: {e.strerror or e}") from None
    return 0


def render(topology: Topology, plan: Plan, fmt: str = "table") -> str:
    """Render the report in ``fmt`` (one of :data:`FORMATS`); the text ends with a newline."""
    if fmt == "table":
        return render_table(topology, plan)
    if fmt == "json":
        return render_json(topology, plan)
    if fmt == "markdown":
        return render_markdown(topology, plan)
    if fmt == "svg":
        from composer_numa.svg import render_svg

        return render_svg(topology, plan)
    raise ComposerNumaError(f"unknown report format {fmt!r}; choose from {', '.join(FORMATS)}")


# --------------------------------------------------------------------------- shared facts


def warnings_of(topology: Topology, plan: Plan) -> list[Diagnostic]:
    """Discovery's and the planner's warnings, in that order, each (code, message) once."""
    seen: set[tuple[str, str]] = set()
    out: list[Diagnostic] = []
    for d in (*topology.diagnostics, *plan.warnings):
        key = (d.code, d.message)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def node_sockets(topology: Topology, node: Node) -> list[int]:
    """Sockets the node's CPUs sit in (empty for a CPU-less node)."""
    return sorted({c.socket for c in topology.cpus if c.node == node.id})


def _socket_nodes(topology: Topology) -> dict[int, list[int]]:
    out: dict[int, set[int]] = {}
    for c in topology.cpus:
        out.setdefault(c.socket, set()).add(c.node)
    return {s: sorted(v) for s, v in sorted(out.items())}


def _cores(topology: Topology, cpus: Iterable[int]) -> int:
    wanted = set(cpus)
    return len({c.core_key for c in topology.cpus if c.id in wanted})


def _memory_text(r: RankPlan) -> str:
    if r.memory_policy in (MemoryPolicy.NONE, MemoryPolicy.LOCAL) or not r.memory_nodes:
        return r.memory_policy.value
    return f"{r.memory_policy.value} {format_cpulist(r.memory_nodes)}"


def _dash(value) -> str:
    return "-" if value is None or value == "" else str(value)


def _balancing_text(value: bool | None) -> str:
    return "unknown" if value is None else ("on" if value else "off")


def _summary(topology: Topology, plan: Plan) -> str:
    nodes = len(topology.nodes)
    cpu_nodes = len(topology.cpu_nodes)
    parts = [
        f"{len(topology.sockets)} socket{'s' if len(topology.sockets) != 1 else ''}",
        f"{nodes} NUMA node{'s' if nodes != 1 else ''}"
        + (f" ({nodes - cpu_nodes} without CPUs)" if cpu_nodes != nodes else ""),
        f"{len(topology.cpus)} CPUs ({_cores(topology, (c.id for c in topology.cpus))} cores)",
        f"{len(topology.gpus)} GPU{'s' if len(topology.gpus) != 1 else ''}",
        f"{len(topology.nics)} NIC{'s' if len(topology.nics) != 1 else ''}",
    ]
    return ", ".join(parts)


def _options_text(plan: Plan) -> str:
    o = plan.options
    need = "" if o.memory_need is None else f", memory need {format_size(o.memory_need)}"
    return f"nproc {o.nproc}, mode {o.mode.value}, memory {o.memory.value}{need}"


# --------------------------------------------------------------------------- JSON


def to_json(topology: Topology, plan: Plan) -> dict:
    """The report as a JSON-ready dict, ``"schema": 1`` (see ``docs/report-json.md``)."""
    socket_nodes = _socket_nodes(topology)
    o = plan.options
    return {
        "schema": SCHEMA,
        "version": __version__,
        "live": bool(topology.live),
        "nodes": [
            {
                "id": n.id,
                "cpus": list(n.cpus),
                "memory_total_bytes": n.memory_total,
                "memory_free_bytes": n.memory_free,
                "distances": list(n.distances),
                "has_cpus": n.has_cpus,
                "has_memory": n.has_memory,
                "sockets": node_sockets(topology, n),
            }
            for n in topology.nodes
        ],
        "sockets": [
            {"id": s, "cpus": list(cpus), "numa_nodes": socket_nodes.get(s, [])}
            for s, cpus in topology.sockets.items()
        ],
        "gpus": [
            {
                "index": g.index,
                "pci_bus_id": g.pci_bus_id,
                "vendor": g.vendor,
                "numa_node": g.numa_node,
                "local_cpus": list(g.local_cpus),
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
        "plan": [r.to_json() for r in plan.ranks],
        "options": {
            "nproc": o.nproc,
            "mode": o.mode.value,
            "memory": o.memory.value,
            "memory_need_bytes": o.memory_need,
        },
        "warnings": [d.to_json() for d in warnings_of(topology, plan)],
    }


def render_json(topology: Topology, plan: Plan) -> str:
    """:func:`to_json` as indented text."""
    return json.dumps(to_json(topology, plan), indent=2) + "\n"


# --------------------------------------------------------------------------- tables


def _sections(topology: Topology, plan: Plan) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, headers, rows, alignment) for every table of the report."""
    node_ids = [n.id for n in topology.nodes]
    socket_nodes = _socket_nodes(topology)
    nodes = [
        [
            str(n.id),
            format_cpulist(n.cpus) if n.cpus else "(none: memory only)",
            ",".join(str(s) for s in node_sockets(topology, n)) or "-",
            format_size(n.memory_total),
            format_size(n.memory_free),
            " ".join(str(d) for d in n.distances),
        ]
        for n in topology.nodes
    ]
    sockets = [
        [str(s), format_cpulist(cpus), str(_cores(topology, cpus)),
         format_cpulist(socket_nodes.get(s, []))]
        for s, cpus in topology.sockets.items()
    ]
    gpus = [
        [str(g.index), _dash(g.pci_bus_id), g.vendor, _dash(g.numa_node),
         format_cpulist(g.local_cpus) or "-"]
        for g in topology.gpus
    ]
    nics = [
        [_dash(n.pci_bus_id), n.kind, n.vendor, _dash(n.numa_node),
         format_cpulist(n.local_cpus) or "-"]
        for n in topology.nics
    ]
    ranks = [
        [str(r.local_rank), _dash(r.gpu), _dash(r.gpu_pci_bus_id),
         format_cpulist(r.numa_nodes) or "-", format_cpulist(r.cpus), _memory_text(r),
         str(r.num_threads)]
        for r in plan.ranks
    ]
    dist_header = "distances to " + " ".join(str(i) for i in node_ids)
    return [
        ("NUMA nodes", ["node", "cpus", "socket", "memory", "free", dist_header], nodes, "lllrrl"),
        ("Sockets", ["socket", "cpus", "cores", "nodes"], sockets, "llrl"),
        ("GPUs", ["gpu", "pci address", "vendor", "node", "local cpus"], gpus, "lllll"),
        ("NICs", ["pci address", "kind", "vendor", "node", "local cpus"], nics, "lllll"),
        (f"Plan ({_options_text(plan)})",
         ["rank", "gpu", "gpu pci address", "nodes", "cpus", "memory", "threads"], ranks,
         "llllllr"),
    ]


def _machine_facts(topology: Topology) -> list[tuple[str, str]]:
    allowed_cpus = topology.allowed_cpus
    return [
        ("allowed CPUs", f"{format_cpulist(allowed_cpus) or '-'} "
                         f"({len(allowed_cpus)} of {len(topology.cpus)})"),
        ("allowed memory nodes", format_cpulist(topology.allowed_mems) or "-"),
        ("automatic NUMA balancing", _balancing_text(topology.numa_balancing)),
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
    lines = [f"composer-numa {__version__} report for {where}: {_summary(topology, plan)}", ""]
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
             f"{_summary(topology, plan)} ({where}, composer-numa {__version__}).", ""]
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
