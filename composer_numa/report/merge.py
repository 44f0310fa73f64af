"""One binding table for a multi-host job: every rank's binding, and the hosts that stand out.

A job on 64 hosts has 512 ranks. Two sources give one row per rank:

* the ``NumaAffinity`` callback: each rank makes a :func:`record` of what is in force (its
  CPUs, memory policy, threads, local-memory fraction, warning codes and its machine's facts),
  the records are gathered (``all_gather_object``) and rank 0 calls :func:`from_records`;
* ``composer-numa report --merge a.json b.json ...``: per-host JSON reports (``"schema": 1``,
  each made with ``composer-numa report --format json -o host.json``), read by
  :func:`from_reports` (the plan is what they show; no fraction is measured).

Then the same renderers (:func:`render_table`, :func:`render_markdown`, :func:`render_json`,
:func:`render_svg`) show the table and the warnings about hosts that differ from the majority:
another machine layout (``host-machine-differs``: another SNC/NPS setting, socket, CPU or GPU
count), another plan (``host-plan-differs``), GPUs whose node is unknown (``gpu-numa-unknown``)
and ranks whose pages are mostly remote (``rank-memory-remote``).

Pure functions of plain data: nothing here imports torch or reads the machine.
"""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from composer_numa._version import __version__
from composer_numa.diagnostics import (
    GPU_NUMA_UNKNOWN,
    HOST_MACHINE_DIFFERS,
    HOST_PLAN_DIFFERS,
    RANK_MEMORY_REMOTE,
    Diagnostic,
)
from composer_numa.errors import ComposerNumaError
from composer_numa.machine.topology import Topology
from composer_numa.units import format_cpulist

__all__ = ["RankRow", "Host", "Merged", "REMOTE_BELOW", "machine_facts", "record", "from_records",
           "from_reports", "render", "render_table", "render_markdown", "render_json", "render_svg"]

#: A rank with less than this share of its resident memory on its planned nodes is "mostly remote".
REMOTE_BELOW = 0.5

_MACHINE_KEYS = ("sockets", "cpu_nodes", "cpus", "gpus", "gpus_node_unknown", "gpu_memory_nodes")


@dataclass(frozen=True)
class RankRow:
    """One rank of the job.

    Attributes:
        host: host name (for a per-host report without one: its file name).
        local_rank: rank on its host.
        rank: global rank; None for rows from per-host reports (not known there).
        gpu_pci_bus_id: the rank's GPU, when it drives one.
        nodes: NUMA nodes of its CPUs.
        cpus: CPUs its threads run on.
        memory_policy: ``preferred``, ``bind``, ``interleave``, ``local``, ``none`` (or what the
            kernel reported, e.g. ``default``).
        memory_nodes: nodes of that policy.
        threads: intra-op threads.
        local_memory_fraction: share of its resident memory on its memory nodes; None if not measured.
        warnings: codes of the warnings raised for this rank (or its host).
    """

    host: str
    local_rank: int
    rank: int | None
    gpu_pci_bus_id: str | None
    nodes: tuple[int, ...]
    cpus: tuple[int, ...]
    memory_policy: str
    memory_nodes: tuple[int, ...]
    threads: int
    local_memory_fraction: float | None = None
    warnings: tuple[str, ...] = ()

    @property
    def memory(self) -> str:
        if self.memory_policy in ("none", "local", "default") or not self.memory_nodes:
            return self.memory_policy
        return f"{self.memory_policy} {format_cpulist(self.memory_nodes)}"

    def to_json(self) -> dict:
        return {"host": self.host, "rank": self.rank, "local_rank": self.local_rank,
                "gpu_pci_bus_id": self.gpu_pci_bus_id, "numa_nodes": list(self.nodes), "cpus": list(self.cpus),
                "memory_policy": self.memory_policy, "memory_nodes": list(self.memory_nodes),
                "num_threads": self.threads, "local_memory_fraction": self.local_memory_fraction,
                "warnings": list(self.warnings)}


@dataclass(frozen=True)
class Host:
    """One host: its name, its machine's facts (:func:`machine_facts`) and a one-line summary."""

    name: str
    machine: Mapping[str, int]
    summary: str


@dataclass(frozen=True)
class Merged:
    """Every rank of the job, the hosts in first-seen order, and the warnings across hosts."""

    rows: tuple[RankRow, ...]
    hosts: tuple[Host, ...]
    warnings: tuple[Diagnostic, ...]


# --- what each rank or host contributes ----------------------------------------------------------


def machine_facts(topology: Topology) -> dict[str, int]:
    """What two hosts of one job should agree on: sockets, nodes with CPUs (more than sockets is
    SNC / NPS), CPUs, GPUs, GPUs whose node is unknown, GPU memory nodes."""
    return {
        "sockets": len(topology.sockets),
        "cpu_nodes": len(topology.cpu_nodes),
        "cpus": len(topology.cpus),
        "gpus": len(topology.gpus),
        "gpus_node_unknown": sum(1 for g in topology.gpus if g.numa_node is None),
        "gpu_memory_nodes": sum(1 for g in topology.gpus if g.memory_node is not None),
    }


def _facts_of_report(doc: Mapping) -> dict[str, int]:
    nodes, gpus = doc["nodes"], doc["gpus"]
    return {
        "sockets": len(doc["sockets"]),
        "cpu_nodes": sum(1 for n in nodes if n["cpus"]),
        "cpus": sum(len(n["cpus"]) for n in nodes),
        "gpus": len(gpus),
        "gpus_node_unknown": sum(1 for g in gpus if g.get("numa_node") is None),
        "gpu_memory_nodes": sum(1 for g in gpus if g.get("memory_node") is not None),
    }


def _describe(m: Mapping[str, int]) -> str:
    s, n = m["sockets"], m["cpu_nodes"]
    parts = [f"{s} socket{'s' if s != 1 else ''}",
             f"{n} NUMA node{'s' if n != 1 else ''} with CPUs" + (" (SNC/NPS on)" if n > s else ""),
             f"{m['cpus']} CPUs", f"{m['gpus']} GPU{'s' if m['gpus'] != 1 else ''}"]
    if m.get("gpus_node_unknown"):
        parts.append(f"{m['gpus_node_unknown']} of them on an unknown node")
    if m.get("gpu_memory_nodes"):
        parts.append(f"{m['gpu_memory_nodes']} GPU memory nodes")
    return ", ".join(parts)


def record(*, host: str, node_rank: int | None = None, rank: int | None, local_rank: int,
           gpu_pci_bus_id: str | None,
           nodes: Iterable[int], cpus: Iterable[int], memory_policy: str, memory_nodes: Iterable[int],
           threads: int, local_memory_fraction: float | None, warnings: Iterable[str],
           topology: Topology | None) -> dict:
    """One rank's binding as plain data (what ``all_gather_object`` sends; JSON-ready).

    ``node_rank`` (the launcher's) tells apart hosts that report the same name.
    """
    return {
        "node_rank": node_rank,
        "row": RankRow(host=str(host), local_rank=int(local_rank), rank=None if rank is None else int(rank),
                       gpu_pci_bus_id=gpu_pci_bus_id, nodes=tuple(sorted(set(nodes))),
                       cpus=tuple(sorted(set(cpus))), memory_policy=str(memory_policy),
                       memory_nodes=tuple(sorted(set(memory_nodes))), threads=int(threads),
                       local_memory_fraction=None if local_memory_fraction is None else float(local_memory_fraction),
                       warnings=tuple(sorted(set(warnings)))).to_json(),
        "machine": None if topology is None else machine_facts(topology),
        "summary": None if topology is None else topology.summary(),
    }


def _row(d: Mapping) -> RankRow:
    return RankRow(host=str(d["host"]), local_rank=int(d["local_rank"]),
                   rank=None if d.get("rank") is None else int(d["rank"]),
                   gpu_pci_bus_id=d.get("gpu_pci_bus_id"), nodes=tuple(int(x) for x in d["numa_nodes"]),
                   cpus=tuple(int(x) for x in d["cpus"]), memory_policy=str(d["memory_policy"]),
                   memory_nodes=tuple(int(x) for x in d.get("memory_nodes") or ()), threads=int(d["num_threads"]),
                   local_memory_fraction=(None if d.get("local_memory_fraction") is None
                                          else float(d["local_memory_fraction"])),
                   warnings=tuple(str(c) for c in d.get("warnings") or ()))


def from_records(records: Sequence[Mapping]) -> Merged:
    """Merge the gathered :func:`record` of every rank (in any order). A host name that comes with
    several node ranks (containers with one name, hosts simulated on one machine) becomes
    ``name/node<N>`` for each."""
    node_ranks: dict[str, set] = {}
    for r in records:
        node_ranks.setdefault(str(r["row"]["host"]), set()).add(r.get("node_rank"))
    records = [dict(r, row=dict(r["row"], host=f"{r['row']['host']}/node{r.get('node_rank')}"))
               if len(node_ranks[str(r["row"]["host"])]) > 1 else r for r in records]
    rows = [_row(r["row"]) for r in records]
    hosts: dict[str, Host] = {}
    for r in sorted(records, key=lambda r: (r.get("node_rank") is None, r.get("node_rank") or 0)):
        name = str(r["row"]["host"])
        if name not in hosts or (not hosts[name].machine and r.get("machine")):
            hosts[name] = Host(name, dict(r.get("machine") or {}), r.get("summary") or "machine not read")
    return _merge(rows, list(hosts.values()))


def from_reports(reports: Sequence[tuple[str, Mapping]]) -> Merged:
    """Merge per-host JSON reports, each given as (label, document); the label names a host whose
    document has no ``host`` (a recorded tree), and two reports of one host get ``#2``, ``#3``.

    Raises:
        ComposerNumaError: a document is not a schema-1 report, in one line naming it.
    """
    rows: list[RankRow] = []
    hosts: list[Host] = []
    seen: Counter[str] = Counter()
    for label, doc in reports:
        try:
            if not isinstance(doc, Mapping) or doc.get("schema") != 1:
                found = doc.get("schema") if isinstance(doc, Mapping) else type(doc).__name__
                raise ComposerNumaError(f"{label}: not a composer-numa report with \"schema\": 1 (found {found!r})")
            name = str(doc.get("host") or label)
            seen[name] += 1
            if seen[name] > 1:
                name = f"{name}#{seen[name]}"
            codes = {str(w["code"]) for w in doc.get("warnings") or ()} - {GPU_NUMA_UNKNOWN}
            unknown_gpus = {int(g["index"]) for g in doc["gpus"] if g.get("numa_node") is None}
            facts = _facts_of_report(doc)
            for r in doc["plan"]:
                mine = codes | ({GPU_NUMA_UNKNOWN} if r.get("gpu") in unknown_gpus else set())
                rows.append(RankRow(host=name, local_rank=int(r["local_rank"]), rank=None,
                                    gpu_pci_bus_id=r.get("gpu_pci_bus_id"),
                                    nodes=tuple(int(x) for x in r["numa_nodes"]),
                                    cpus=tuple(int(x) for x in r["cpus"]), memory_policy=str(r["memory_policy"]),
                                    memory_nodes=tuple(int(x) for x in r["memory_nodes"]),
                                    threads=int(r["num_threads"]), warnings=tuple(sorted(mine))))
            hosts.append(Host(name, facts, _describe(facts)))
        except ComposerNumaError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ComposerNumaError(f"{label}: malformed report ({type(e).__name__}: {e})") from None
    return _merge(rows, hosts)


# --- the merge: order, majority, warnings ----------------------------------------------------


def _plan_shape(rows: Sequence[RankRow]) -> tuple:
    """What a host's plan looks like, host-independently: per local rank, its share."""
    return tuple((r.local_rank, len(r.nodes), len(r.cpus), r.threads, r.memory_policy,
                  len(r.memory_nodes)) for r in sorted(rows, key=lambda r: r.local_rank))


def _shape_text(shape: tuple) -> str:
    if not shape:
        return "no ranks"
    parts = []
    for local, nodes, cpus, threads, policy, _ in shape[:2]:
        parts.append(f"local rank {local}: {cpus} CPU{'s' if cpus != 1 else ''} on {nodes} "
                     f"node{'s' if nodes != 1 else ''}, {threads} thread{'s' if threads != 1 else ''}, {policy}")
    more = f" (+{len(shape) - 2} ranks)" if len(shape) > 2 else ""
    return "; ".join(parts) + more


def _names(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _odd_ones(values: dict[str, object], describe, code: str, what: str, outcome: str) -> list[Diagnostic]:
    """Hosts whose value differs from the majority's (or every group, when there is no majority)."""
    groups: dict[object, list[str]] = {}
    for host, v in values.items():
        groups.setdefault(v, []).append(host)
    if len(groups) < 2:
        return []
    ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    total = len(values)
    if len(ranked[0][1]) > len(ranked[1][1]):
        major, hosts = ranked[0]
        return [Diagnostic(code, f"host{'s' if len(names) > 1 else ''} {_names(names)}: {what} is {describe(v)}; "
                                 f"the majority ({len(hosts)} of {total} hosts) has {describe(major)}", outcome)
                for v, names in ranked[1:]]
    listing = "; ".join(f"{_names(names)}: {describe(v)}" for v, names in ranked)
    return [Diagnostic(code, f"the hosts disagree on their {what}, with no majority: {listing}", outcome)]


def _merge(rows: list[RankRow], hosts: list[Host]) -> Merged:
    order = {h.name: i for i, h in enumerate(hosts)}
    for r in rows:
        order.setdefault(r.host, len(order))
    rows.sort(key=lambda r: (r.rank is None, r.rank if r.rank is not None else 0, order[r.host], r.local_rank))
    if all(r.rank is None for r in rows):
        rows.sort(key=lambda r: (order[r.host], r.local_rank))
    known = [h for h in hosts if h.machine]
    hosts_all = list(hosts) + [Host(n, {}, "machine not read") for n in order if n not in {h.name for h in hosts}]
    diags: list[Diagnostic] = []
    diags += _odd_ones({h.name: tuple(h.machine.get(k, 0) for k in _MACHINE_KEYS) for h in known},
                       lambda v: _describe(dict(zip(_MACHINE_KEYS, v, strict=True))), HOST_MACHINE_DIFFERS,
                       "machine", "their ranks are planned for that layout: per-node thread counts and memory "
                       "differ from the other hosts'")
    by_host: dict[str, list[RankRow]] = {}
    for r in rows:
        by_host.setdefault(r.host, []).append(r)
    diags += _odd_ones({h: _plan_shape(rs) for h, rs in by_host.items()}, _shape_text, HOST_PLAN_DIFFERS,
                       "plan", "their ranks run with other CPU shares, thread counts or memory policies; check the "
                       "options and the cpuset there")
    unknown: dict[str, list[int]] = {}
    for r in rows:
        if GPU_NUMA_UNKNOWN in r.warnings:
            unknown.setdefault(r.host, []).append(r.local_rank)
    if unknown:
        where = "; ".join(f"{h} (local rank{'s' if len(ls) > 1 else ''} {format_cpulist(ls)})"
                          for h, ls in unknown.items())
        diags.append(Diagnostic(GPU_NUMA_UNKNOWN, f"GPU NUMA node unknown on {len(unknown)} "
                                f"host{'s' if len(unknown) > 1 else ''}: {where}",
                                "those ranks got CPUs no other rank holds and no memory policy; set "
                                "COMPOSER_NUMA_GPUS there or fix the firmware's NUMA information"))
    remote = [r for r in rows if r.local_memory_fraction is not None and r.local_memory_fraction < REMOTE_BELOW]
    if remote:
        listing = ", ".join(f"{r.host} local rank {r.local_rank}"
                            + (f" (rank {r.rank})" if r.rank is not None else "")
                            + f" {r.local_memory_fraction:.0%}" for r in remote[:8])
        more = f" and {len(remote) - 8} more" if len(remote) > 8 else ""
        diags.append(Diagnostic(RANK_MEMORY_REMOTE,
                                f"{len(remote)} rank{'s' if len(remote) > 1 else ''} with most resident memory "
                                f"off their memory nodes (local share below {REMOTE_BELOW:.0%}): {listing}{more}",
                                "their host-side work pays remote-memory latency; migrate=True, a memory policy, or "
                                "binding before the model is built keeps pages local"))
    return Merged(tuple(rows), tuple(hosts_all), tuple(dict.fromkeys(diags)))


# --- rendering -------------------------------------------------------------------------------


_HEADERS = ["host", "rank", "local rank", "gpu pci address", "nodes", "cpus", "memory", "threads", "local memory"]


_RIGHT = {"rank", "local rank", "threads", "local memory"}


def _cells(r: RankRow) -> list[str]:
    return [r.host, "-" if r.rank is None else str(r.rank), str(r.local_rank), r.gpu_pci_bus_id or "-",
            format_cpulist(r.nodes) or "-", format_cpulist(r.cpus) or "-", r.memory, str(r.threads),
            "-" if r.local_memory_fraction is None else f"{r.local_memory_fraction:.0%}"]


def _columns(m: Merged) -> tuple[list[str], list[list[str]]]:
    """Headers and cells; without the global-rank column when no row knows it (per-host reports)."""
    rows = [_cells(r) for r in m.rows]
    if m.rows and all(r.rank is None for r in m.rows):
        return [h for h in _HEADERS if h != "rank"], [c[:1] + c[2:] for c in rows]
    return list(_HEADERS), rows


def _title(m: Merged) -> str:
    return f"binding of {len(m.rows)} rank{'s' if len(m.rows) != 1 else ''} on {len(m.hosts)} " \
           f"host{'s' if len(m.hosts) != 1 else ''}"


def render_table(m: Merged) -> str:
    """Aligned text: one row per rank, then the hosts and the warnings."""
    headers, rows = _columns(m)
    right = {i for i, h in enumerate(headers) if h in _RIGHT}
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [f"composer-numa {__version__}: {_title(m)}", "", "  " + line(headers),
           "  " + line(["-" * w for w in widths])]
    out += ["  " + line(r) for r in rows]
    out += ["", "Hosts"]
    width = max((len(h.name) for h in m.hosts), default=0)
    out += [f"  {h.name.ljust(width)}  {h.summary}" for h in m.hosts]
    out.append("")
    out.append(f"Warnings ({len(m.warnings)})" if m.warnings else "Warnings: none")
    for d in m.warnings:
        out += textwrap.wrap(f"[{d.code}] {d.text}", 100, initial_indent="  ", subsequent_indent="    ",
                             break_on_hyphens=False)
    return "\n".join(out) + "\n"


def render_markdown(m: Merged) -> str:
    esc = lambda t: t.replace("|", "\\|")  # noqa: E731
    headers, rows = _columns(m)
    out = ["# composer-numa: " + _title(m), "", "| " + " | ".join(headers) + " |",
           "|" + "|".join("---:" if h in _RIGHT else "---" for h in headers) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    out += ["", "## Hosts", ""] + [f"- {esc(h.name)}: {esc(h.summary)}" for h in m.hosts]
    out += ["", "## Warnings", ""] + ([f"- `{d.code}`: {esc(d.text)}" for d in m.warnings] or ["None."])
    return "\n".join(out) + "\n"


def to_json(m: Merged) -> dict:
    """The merged table as JSON (``"schema": 1``, ``"kind": "merged"``; see docs/report-json.md)."""
    return {"schema": 1, "kind": "merged", "version": __version__,
            "hosts": [{"host": h.name, "machine": dict(h.machine) or None, "summary": h.summary} for h in m.hosts],
            "ranks": [r.to_json() for r in m.rows],
            "warnings": [d.to_json() for d in m.warnings]}


def render_json(m: Merged) -> str:
    return json.dumps(to_json(m), indent=2) + "\n"


def render_svg(m: Merged) -> str:
    """The table as a picture: a band per host with a card per rank, hosts that stand out in the
    warning colour, then the warnings."""
    from composer_numa.report import svg

    s = svg._Svg()
    margin, card_w, card_h, gap, head = 16.0, 190.0, 66.0, 8.0, 26.0
    per_row = 6
    flagged = {h for d in m.warnings for h in (x.name for x in m.hosts) if _mentions(d.text, h)}
    by_host: dict[str, list[RankRow]] = {}
    for r in m.rows:
        by_host.setdefault(r.host, []).append(r)
    width = max(760.0, 2 * 12 + min(per_row, max((len(v) for v in by_host.values()), default=1)) * (card_w + gap))
    y = margin + 40
    for h in m.hosts:
        ranks = sorted(by_host.get(h.name, []), key=lambda r: r.local_rank)
        rows = max(1, -(-len(ranks) // per_row))
        box_h = head + rows * (card_h + gap) + 4
        line = svg.C_WARN if h.name in flagged else svg.C_SOCKET_LINE
        s.rect(margin, y, width, box_h, svg.C_SOCKET_FILL, line, rx=8, sw=2 if h.name in flagged else 1.2,
               extra=f' id="host-{svg._xml_id(h.name)}" class="host{" flagged" if h.name in flagged else ""}"')
        s.text(margin + 12, y + 17, h.name, size=13, weight="bold")
        s.text(margin + 20 + svg._text_w(h.name, 13), y + 17, svg._fit(h.summary, 10.5, width - 200), size=10.5,
               fill=svg.C_MUTED)
        for k, r in enumerate(ranks):
            row, col = divmod(k, per_row)
            cx, cy = margin + 12 + col * (card_w + gap), y + head + row * (card_h + gap)
            colour = svg.rank_colour(r.local_rank)
            remote = r.local_memory_fraction is not None and r.local_memory_fraction < REMOTE_BELOW
            tag = f' id="rank-{svg._xml_id(h.name)}-{r.local_rank}" class="rank{" remote" if remote else ""}"'
            s.rect(cx, cy, card_w, card_h, "#ffffff", svg.C_WARN if remote else "#afb8c1", rx=5,
                   sw=1.8 if remote else 0.8, extra=tag)
            s.rect(cx, cy, 6, card_h, colour, rx=2)
            title = f"local rank {r.local_rank}" + (f" (rank {r.rank})" if r.rank is not None else "")
            s.text(cx + 12, cy + 14, title, size=10.5, weight="bold")
            s.text(cx + 12, cy + 27, svg._fit(f"GPU {r.gpu_pci_bus_id or '-'}", 9.5, card_w - 16), size=9.5,
                   mono=True, fill=svg.C_MUTED)
            s.text(cx + 12, cy + 40, svg._fit(f"nodes {format_cpulist(r.nodes) or '-'}  CPUs "
                                              f"{format_cpulist(r.cpus) or '-'}", 9.5, card_w - 16), size=9.5,
                   mono=True)
            frac = "-" if r.local_memory_fraction is None else f"{r.local_memory_fraction:.0%} local"
            s.text(cx + 12, cy + 53, svg._fit(f"{r.memory}, {r.threads} threads, {frac}", 9.5, card_w - 16),
                   size=9.5, fill=svg.C_WARN if remote else svg.C_TEXT)
        y += box_h + gap
    y += 6
    if m.warnings:
        s.text(margin, y + 14, f"Warnings ({len(m.warnings)})", size=13, weight="bold", fill=svg.C_WARN)
        y += 20
        chars = max(40, int((width - 20) / (11 * 0.6)))
        for d in m.warnings:
            lines = textwrap.wrap(f"[{d.code}] {d.text}", chars) or [f"[{d.code}]"]
            s.rect(margin, y + 3, 4, 14 * len(lines) - 2, svg.C_WARN)
            for k, ln in enumerate(lines):
                s.text(margin + 10, y + 13 + 14 * k, ln, size=11)
            y += 14 * len(lines) + 5
    else:
        s.text(margin, y + 14, "No warnings: every host has the same machine and plan.", size=11, fill=svg.C_MUTED)
        y += 20
    total_w, height = width + 2 * margin, y + margin
    title = f"composer-numa: {_title(m)}"
    head_parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{total_w:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {total_w:.0f} {height:.0f}">',
        f"<title>{svg.escape(title)}</title>",
        f'<rect x="0" y="0" width="{total_w:.0f}" height="{height:.0f}" fill="#ffffff"/>',
    ]
    top = svg._Svg()
    top.text(margin, margin + 12, title, size=15, weight="bold")
    top.text(margin, margin + 29, "one card per rank: its GPU, nodes, CPUs, memory policy, threads and the share "
             "of its resident memory on its memory nodes", size=11, fill=svg.C_MUTED)
    return "\n".join([*head_parts, *top.parts, *s.parts, "</svg>"]) + "\n"


def _mentions(text: str, host: str) -> bool:
    """Whether a warning names ``host`` as a whole word (host names may share prefixes)."""
    i = text.find(host)
    while i >= 0:
        before = text[i - 1] if i > 0 else " "
        after = text[i + len(host)] if i + len(host) < len(text) else " "
        if not (before.isalnum() or before in "-_.") and not (after.isalnum() or after in "-_#"):
            return True
        i = text.find(host, i + 1)
    return False


def render(m: Merged, fmt: str = "table") -> str:
    """``fmt``: ``table``, ``markdown``, ``json`` or ``svg``."""
    renderers = {"table": render_table, "markdown": render_markdown, "json": render_json, "svg": render_svg}
    if fmt not in renderers:
        raise ComposerNumaError(f"unknown report format {fmt!r}; choose from {', '.join(renderers)}")
    return renderers[fmt](m)
