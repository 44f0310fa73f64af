"""An SVG picture of the machine and the plan, for ``composer-numa report --format svg``.

Sockets are boxes holding their NUMA nodes; each node shows its CPU ranges,
memory and distances, and a grid with one column per physical core (SMT
siblings stacked) whose cells are coloured by the rank that owns the CPU. GPUs
and NICs hang off the node they are attached to. A GPU whose memory is a CPU-less
node (Grace Hopper, Grace Blackwell) has that node drawn right under it, dashed;
other nodes without CPUs (HBM, CXL) are drawn dashed in a band of their own, and
nodes with neither CPUs nor memory as small tags there. A legend lists every rank
with its colour, GPU, CPUs, memory policy and threads; the warnings follow.

Plain string building, no dependencies: the output is a standalone SVG 1.1
document that browsers and ``rsvg-convert`` render alike.
"""

from __future__ import annotations

import colorsys
import textwrap
from dataclasses import dataclass, field

from composer_numa._version import __version__
from composer_numa.machine.topology import Gpu, Nic, Node, Topology
from composer_numa.plan import MemoryPolicy, Plan, RankPlan
from composer_numa.report.facts import balancing_text, warnings_of
from composer_numa.units import format_cpulist, format_size

__all__ = ["render_svg", "rank_colour"]

# Geometry (px). Cells are big enough for a three-digit CPU id at FONT_CELL.
CELL_W, CELL_H, CELL_GAP = 19, 16, 2
SHARE_BAR = 5  # height of the rank bar under a CPU shared by several ranks
MAX_CORE_COLS = 16
NODE_PAD = 8
NODE_MIN_W = 300
NODE_GAP = 14
SOCKET_PAD = 12
SOCKET_HEAD = 24
MAX_NODES_PER_ROW = 4
CHIP_H, CHIP_GAP, CHIP_SPINE = 34, 6, 16
GPU_MEM_H, GPU_MEM_GAP = 44, 8  # a GPU's own memory node, drawn under the GPU
EMPTY_W, EMPTY_H, EMPTY_GAP = 58, 20, 4  # a node with neither CPUs nor memory
MARGIN = 16
FONT = "DejaVu Sans, Verdana, Helvetica, Arial, sans-serif"
MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"
FONT_CELL = 7.5
MAX_STRIPES = 4

# Colours: rank colours are a qualitative palette (no greys: grey means "not planned").
_PALETTE = (
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1",
    "#edc948", "#76b7b2", "#ff9da7", "#9c755f", "#6b5b95",
)
C_UNPLANNED = "#e4e6e8"
C_TEXT = "#1f2328"
C_MUTED = "#57606a"
C_SOCKET_FILL, C_SOCKET_LINE = "#f6f8fa", "#8c959f"
C_NODE_FILL, C_NODE_LINE = "#ffffff", "#57606a"
C_MEMNODE_FILL, C_MEMNODE_LINE = "#f4effb", "#8250df"
C_GPU_FILL, C_GPU_TEXT, C_GPU_SUB = "#24292f", "#ffffff", "#c9d1d9"
C_NIC_FILL, C_NIC_LINE = "#ddf4ff", "#0969da"
C_WARN = "#9a6700"
C_UNKNOWN_LINE = "#bc4c00"


def escape(text: str) -> str:
    """Escape text for an XML text node or a double-quoted attribute."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def _xml_id(text: str | None) -> str:
    """``0000:17:00.0`` -> ``0000-17-00.0`` (ids may not contain colons)."""
    return "".join(ch if ch.isalnum() or ch in "-._" else "-" for ch in (text or "unknown"))


def rank_colour(rank: int) -> str:
    """The fill colour of ``rank`` (a fixed palette, then evenly spread hues)."""
    if rank < len(_PALETTE):
        return _PALETTE[rank]
    hue = (rank * 0.61803398875) % 1.0
    r, g, b = colorsys.hls_to_rgb(hue, 0.55, 0.55)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def _ink_on(fill: str) -> str:
    """Black or white, whichever reads better on ``fill``."""
    r, g, b = (int(fill[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "#ffffff"


def _text_w(text: str, size: float) -> float:
    """A generous estimate of rendered text width (no font metrics available)."""
    return len(text) * size * 0.62


def _fit(text: str, size: float, width: float) -> str:
    """``text`` cut with an ellipsis so that it fits in ``width``."""
    if _text_w(text, size) <= width:
        return text
    keep = max(1, int(width / (size * 0.62)) - 1)
    return text[:keep] + "\u2026"


class _Svg:
    """A list of SVG fragments with small helpers for the shapes used here."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def rect(self, x, y, w, h, fill, stroke="none", *, rx=0, sw=1.0, dash=None, extra=""):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" rx="{rx}" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="{sw}"{d}{extra}/>'
        )

    def line(self, x1, y1, x2, y2, stroke, sw=1.5):
        self.parts.append(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
            f'stroke="{stroke}" stroke-width="{sw}"/>'
        )

    def text(self, x, y, s, *, size=11.0, fill=C_TEXT, weight="normal", anchor="start",
             mono=False, extra=""):
        fam = MONO if mono else FONT
        w = ' font-weight="bold"' if weight == "bold" else ""
        a = f' text-anchor="{anchor}"' if anchor != "start" else ""
        self.parts.append(
            f'<text x="{x:.1f}" y="{y:.1f}" font-family="{fam}" font-size="{size}" '
            f'fill="{fill}"{w}{a}{extra}>{escape(s)}</text>'
        )

    def raw(self, s: str) -> None:
        self.parts.append(s)


@dataclass
class _NodeView:
    node: Node
    cores: list[list[int]]  # physical cores of the node, each its CPUs (siblings) sorted
    devices: list[Gpu | Nic] = field(default_factory=list)


def _memory_label(r: RankPlan) -> str:
    if r.memory_policy in (MemoryPolicy.NONE, MemoryPolicy.LOCAL) or not r.memory_nodes:
        return r.memory_policy.value
    return f"{r.memory_policy.value} {format_cpulist(r.memory_nodes)}"


class _Picture:
    def __init__(self, topology: Topology, plan: Plan) -> None:
        self.t = topology
        self.plan = plan
        self.svg = _Svg()
        self.allowed = set(topology.allowed_cpus) if topology.allowed_cpus else {
            c.id for c in topology.cpus}
        self.owners: dict[int, list[int]] = {}
        for r in plan.ranks:
            for c in r.cpus:
                self.owners.setdefault(c, []).append(r.local_rank)
        self.gpu_ranks: dict[int, list[int]] = {}
        for r in plan.ranks:
            if r.gpu is not None:
                self.gpu_ranks.setdefault(r.gpu, []).append(r.local_rank)
        self.mem_ranks: dict[int, list[int]] = {}
        for r in plan.ranks:
            for n in r.memory_nodes:
                self.mem_ranks.setdefault(n, []).append(r.local_rank)
        node_ids = {n.id for n in topology.nodes}
        cpu_by_id = {c.id: c for c in topology.cpus}
        self.views: dict[int, _NodeView] = {}
        for n in topology.nodes:
            cores: dict[int, list[int]] = {}
            for cid in n.cpus:
                c = cpu_by_id.get(cid)
                key = c.core_key if c is not None else cid
                cores.setdefault(key, []).append(cid)
            self.views[n.id] = _NodeView(n, [sorted(v) for _, v in sorted(cores.items())])
        self.unattached: list[Gpu | Nic] = []
        for dev in (*topology.gpus, *topology.nics):
            if dev.numa_node is not None and dev.numa_node in node_ids:
                self.views[dev.numa_node].devices.append(dev)
            else:
                self.unattached.append(dev)
        # a GPU's own memory node is drawn under that GPU (once, even if two GPUs claimed it)
        self.gpu_memory: dict[int, Node] = {}
        for g in topology.gpus:
            mem = g.memory_node
            if (mem is not None and mem in node_ids and not self.views[mem].node.cpus and g not in self.unattached
                    and mem not in {n.id for n in self.gpu_memory.values()}):
                self.gpu_memory[g.index] = self.views[mem].node
        cpu_views = [v for v in self.views.values() if v.node.cpus]
        max_cores = max((len(v.cores) for v in cpu_views), default=1)
        self.cols = max(1, min(MAX_CORE_COLS, max_cores))
        self.node_w = max(NODE_MIN_W, 2 * NODE_PAD + self.cols * (CELL_W + CELL_GAP) - CELL_GAP)
        self.chip_w = (self.node_w - CHIP_SPINE) / 2
        # few cores per node: widen the cells to fill the node instead of leaving a gap
        fill_w = (self.node_w - 2 * NODE_PAD + CELL_GAP) / self.cols - CELL_GAP
        self.cell_w = max(CELL_W, min(28.0, fill_w))

    # ---------------------------------------------------------------- sizes

    def _threads_per_core(self, v: _NodeView) -> int:
        return max((len(c) for c in v.cores), default=1)

    def _grid_h(self, v: _NodeView) -> float:
        if not v.cores:
            return 0.0
        rows = -(-len(v.cores) // self.cols)
        core_h = self._threads_per_core(v) * (CELL_H + 1) - 1
        return rows * core_h + (rows - 1) * 5

    HEAD_H = 62  # title, memory line + bar, distances, memory-policy tags

    def _node_h(self, v: _NodeView) -> float:
        grid = self._grid_h(v)
        return self.HEAD_H + (grid + 6 if grid else 0) + NODE_PAD

    def _device_rows(self, v: _NodeView) -> list[float]:
        """Height of each row of two devices: a chip, and the GPU memory node under it if any."""
        rows = []
        for i in range(0, len(v.devices), 2):
            pair = v.devices[i:i + 2]
            mem = any(isinstance(d, Gpu) and d.index in self.gpu_memory for d in pair)
            rows.append(CHIP_H + CHIP_GAP + (GPU_MEM_H + GPU_MEM_GAP if mem else 0))
        return rows

    def _devices_h(self, v: _NodeView) -> float:
        if not v.devices:
            return 0.0
        return 10 + sum(self._device_rows(v))

    # ---------------------------------------------------------------- pieces

    def node_box(self, v: _NodeView, x: float, y: float, h: float) -> None:
        s, n = self.svg, v.node
        memory_only = not n.cpus
        fill, line = (C_MEMNODE_FILL, C_MEMNODE_LINE) if memory_only else (C_NODE_FILL,
                                                                          C_NODE_LINE)
        s.raw(f"<g><title>{escape(self._node_tooltip(n))}</title>")
        cls = "node memory-only" if memory_only else "node"
        s.rect(x, y, self.node_w, h, fill, line, rx=6, sw=1.5 if not memory_only else 1.8,
               dash="6 3" if memory_only else None, extra=f' id="node-{n.id}" class="{cls}"')
        ix, iw = x + NODE_PAD, self.node_w - 2 * NODE_PAD
        label = f"node {n.id}"
        s.text(ix, y + 16, label, size=13, weight="bold")
        what = f"CPUs {format_cpulist(n.cpus)}" if n.cpus else "memory only, no CPUs"
        what_x = ix + _text_w(label, 13) * 1.1 + 6
        s.text(what_x, y + 16, _fit(what, 11, ix + iw - what_x), size=11,
               fill=C_MUTED if memory_only else C_TEXT, mono=bool(n.cpus))
        # memory: text, then a bar whose dark part is the memory in use
        if n.memory_total > 0:
            mem = f"{format_size(n.memory_total)} memory, {format_size(n.available)} available"
            if self.t.allowed_mems and n.id not in self.t.allowed_mems:
                mem += ", outside the cpuset"
            s.text(ix, y + 30, _fit(mem, 10, iw), size=10, fill=C_MUTED)
            used = 1.0 - min(1.0, max(0.0, n.available / n.memory_total))
            s.rect(ix, y + 34, iw, 5, "#d0d7de", rx=2)
            if used > 0:
                s.rect(ix, y + 34, iw * used, 5, "#6e7781", rx=2)
        else:
            s.text(ix, y + 30, "no memory", size=10, fill=C_WARN, weight="bold")
        tags = self.mem_ranks.get(n.id, [])
        right = ix + iw
        if tags:
            right = self._rank_tags(right, y + 41, tags, "mem") - 6
        dist = "distances " + " ".join(str(d) for d in n.distances)
        s.text(ix, y + 50, _fit(dist, 9.5, right - ix), size=9.5, fill=C_MUTED)
        if v.cores:
            self.cpu_grid(v, ix, y + self.HEAD_H)
        s.raw("</g>")

    def _node_tooltip(self, n: Node) -> str:
        parts = [f"NUMA node {n.id}"]
        parts.append(f"CPUs {format_cpulist(n.cpus)}" if n.cpus else "no CPUs")
        parts.append(f"memory {format_size(n.memory_total)} ({format_size(n.memory_free)} free, "
                     f"{format_size(n.available)} available)")
        parts.append("distances " + " ".join(str(d) for d in n.distances))
        return ", ".join(parts)

    def _rank_tags(self, right: float, y: float, ranks: list[int], label: str) -> float:
        """Small coloured ``r3`` tags ending at ``right``, preceded by ``label``.

        Returns the left edge of what was drawn.
        """
        s = self.svg
        shown = ranks[:6]
        more = len(ranks) - len(shown)
        x = right
        if more:
            txt = f"+{more}"
            x -= _text_w(txt, 9) + 2
            s.text(x, y + 8, txt, size=9, fill=C_MUTED)
        for r in reversed(shown):
            txt = f"r{r}"
            w = _text_w(txt, 9) + 6
            x -= w + 2
            col = rank_colour(r)
            s.rect(x, y, w, 11, col, rx=2)
            s.text(x + w / 2, y + 8.5, txt, size=9, fill=_ink_on(col), anchor="middle",
                   weight="bold")
        s.text(x - 3, y + 8.5, label, size=9, fill=C_MUTED, anchor="end")
        return x - 3 - _text_w(label, 9)

    def cpu_grid(self, v: _NodeView, x0: float, y0: float) -> None:
        tpc = self._threads_per_core(v)
        core_h = tpc * (CELL_H + 1) - 1
        for k, core in enumerate(v.cores):
            row, col = divmod(k, self.cols)
            cx = x0 + col * (self.cell_w + CELL_GAP)
            cy = y0 + row * (core_h + 5)
            for j, cpu in enumerate(core):
                self.cpu_cell(cpu, cx, cy + j * (CELL_H + 1))

    def cpu_cell(self, cpu: int, x: float, y: float) -> None:
        s = self.svg
        owners = self.owners.get(cpu, [])
        allowed = cpu in self.allowed
        tip = f"CPU {cpu}"
        c = self._cpu(cpu)
        if c is not None:
            tip += f", core {c.core}, socket {c.socket}, node {c.node}"
        if not allowed:
            tip += ", outside the cpuset"
        elif owners:
            tip += ", rank " + ", ".join(str(r) for r in owners)
        else:
            tip += ", not planned"
        s.raw(f"<g><title>{escape(tip)}</title>")
        ink = C_TEXT
        baseline = y + CELL_H - 4.5
        # id and classes let tools (and the tests) read the picture back
        ranks = " ".join(f"r{r}" for r in owners)
        if not allowed:
            tag = f' id="cpu-{cpu}" class="cpu outside"'
            s.rect(x, y, self.cell_w, CELL_H, "url(#outside)", "#afb8c1", sw=0.8, extra=tag)
            ink = C_MUTED
        elif not owners:
            tag = f' id="cpu-{cpu}" class="cpu unplanned"'
            s.rect(x, y, self.cell_w, CELL_H, C_UNPLANNED, "#afb8c1", sw=0.6, extra=tag)
            ink = C_MUTED
        elif len(owners) == 1:
            col = rank_colour(owners[0])
            s.rect(x, y, self.cell_w, CELL_H, col, sw=0,
                   extra=f' id="cpu-{cpu}" class="cpu {ranks}"')
            ink = _ink_on(col)
        else:
            # shared: the id on white, a bar of the sharing ranks' colours underneath
            s.rect(x, y, self.cell_w, CELL_H, "#ffffff", "#8c959f", sw=0.6,
                   extra=f' id="cpu-{cpu}" class="cpu shared {ranks}"')
            bar_y = y + CELL_H - SHARE_BAR
            if len(owners) <= MAX_STRIPES:
                w = self.cell_w / len(owners)
                for i, r in enumerate(owners):
                    s.rect(x + i * w, bar_y, w, SHARE_BAR, rank_colour(r), sw=0)
            else:
                s.rect(x, bar_y, self.cell_w, SHARE_BAR, "url(#many)", sw=0)
            baseline = bar_y - 1.5
        s.text(x + self.cell_w / 2, baseline, str(cpu), size=FONT_CELL, fill=ink,
               anchor="middle", mono=True)
        s.raw("</g>")

    def _cpu(self, cpu: int):
        try:
            return self.t.cpu(cpu)
        except KeyError:
            return None

    def chip(self, dev: Gpu | Nic, x: float, y: float, w: float, unknown: bool = False) -> None:
        s = self.svg
        if isinstance(dev, Gpu):
            fill, stroke, ink, sub = C_GPU_FILL, C_GPU_FILL, C_GPU_TEXT, C_GPU_SUB
            title = f"GPU {dev.index}"
            kind = dev.vendor if dev.vendor != "unknown" else ""
        else:
            fill, stroke, ink, sub = C_NIC_FILL, C_NIC_LINE, C_TEXT, C_MUTED
            title = "NIC"
            kind = " ".join(p for p in (dev.kind, dev.vendor) if p and p != "unknown")
        tip = f"{title} {dev.pci_bus_id or 'unknown PCI address'}, node " + (
            "unknown" if dev.numa_node is None else str(dev.numa_node))
        if dev.local_cpus:
            tip += f", local CPUs {format_cpulist(dev.local_cpus)}"
        s.raw(f"<g><title>{escape(tip)}</title>")
        if isinstance(dev, Gpu):
            tag = f' id="gpu-{dev.index}" class="gpu'
        else:
            tag = f' id="nic-{_xml_id(dev.pci_bus_id)}" class="nic'
        tag += ' unknown-node"' if unknown else '"'
        s.rect(x, y, w, CHIP_H, fill, C_UNKNOWN_LINE if unknown else stroke, rx=4,
               sw=2 if unknown else 1.2, dash="4 2" if unknown else None, extra=tag)
        badges = 0.0
        if isinstance(dev, Gpu):
            ranks = self.gpu_ranks.get(dev.index, [])
            badges = sum(_text_w(f"r{r}", 10) + 11 for r in ranks[:3]) + (14 if len(ranks) > 3
                                                                        else 0)
        s.text(x + 7, y + 14, title, size=11.5, fill=ink, weight="bold")
        room = w - 14 - badges - _text_w(title, 11.5) * 1.1 - 6
        if kind and room > 20:
            s.text(x + 13 + _text_w(title, 11.5) * 1.1, y + 14, _fit(kind, 9.5, room), size=9.5,
                   fill=sub)
        s.text(x + 7, y + 27, _fit(dev.pci_bus_id or "PCI address unknown", 9.5, w - 12),
               size=9.5, fill=sub, mono=True)
        if isinstance(dev, Gpu):
            ranks = self.gpu_ranks.get(dev.index, [])
            if ranks:
                self._chip_badges(x + w - 5, y + 5, ranks)
        s.raw("</g>")

    def _chip_badges(self, right: float, y: float, ranks: list[int]) -> None:
        s = self.svg
        shown = ranks[:3]
        x = right
        if len(ranks) > len(shown):
            txt = f"+{len(ranks) - len(shown)}"
            x -= _text_w(txt, 9)
            s.text(x, y + 10, txt, size=9, fill=C_GPU_SUB)
            x -= 2
        for r in reversed(shown):
            txt = f"r{r}"
            w = _text_w(txt, 10) + 8
            x -= w
            col = rank_colour(r)
            s.rect(x, y, w, 14, col, rx=3)
            s.text(x + w / 2, y + 10.5, txt, size=10, fill=_ink_on(col), anchor="middle",
                   weight="bold")
            x -= 3

    def devices(self, v: _NodeView, x: float, y: float) -> None:
        """GPUs and NICs hanging off a spine under the node, two per row; a GPU's memory node under it."""
        if not v.devices:
            return
        s = self.svg
        spine_x = x + self.node_w / 2
        heights = self._device_rows(v)
        tops = [y + 10 + sum(heights[:k]) for k in range(len(heights))]
        s.line(spine_x, y, spine_x, tops[-1] + CHIP_H / 2, "#8c959f", 2)
        for i, dev in enumerate(v.devices):
            row, side = divmod(i, 2)
            cy = tops[row]
            cx = x if side == 0 else x + self.node_w - self.chip_w
            stub_from = cx + self.chip_w if side == 0 else cx
            s.line(stub_from, cy + CHIP_H / 2, spine_x, cy + CHIP_H / 2, "#8c959f", 2)
            self.chip(dev, cx, cy, self.chip_w)
            mem = self.gpu_memory.get(dev.index) if isinstance(dev, Gpu) else None
            if mem is not None:
                my = cy + CHIP_H + GPU_MEM_GAP
                s.line(cx + self.chip_w / 2, cy + CHIP_H, cx + self.chip_w / 2, my, C_MEMNODE_LINE, 2)
                self.gpu_memory_box(mem, dev, cx, my, self.chip_w)

    def gpu_memory_box(self, n: Node, gpu: Gpu, x: float, y: float, w: float) -> None:
        """A GPU's own memory node (CPU-less), compact, right under the GPU."""
        s = self.svg
        s.raw(f"<g><title>{escape(self._node_tooltip(n) + f', the memory of GPU {gpu.index}')}</title>")
        s.rect(x, y, w, GPU_MEM_H, C_MEMNODE_FILL, C_MEMNODE_LINE, rx=5, sw=1.8, dash="6 3",
               extra=f' id="node-{n.id}" class="node memory-only gpu-memory" data-gpu="{gpu.index}"')
        label = f"node {n.id}"
        s.text(x + 7, y + 14, label, size=11.5, weight="bold")
        right = x + w - 5
        tags = self.mem_ranks.get(n.id, [])
        if tags:
            right = self._rank_tags(right, y + 5, tags, "mem") - 4
        if n.memory_total > 0:
            mem = f"GPU {gpu.index} memory, {format_size(n.memory_total)}"
            if self.t.allowed_mems and n.id not in self.t.allowed_mems:
                mem += ", outside the cpuset"
            s.text(x + 7, y + 28, _fit(mem, 9.5, w - 14), size=9.5, fill=C_MEMNODE_LINE)
            used = 1.0 - min(1.0, max(0.0, n.available / n.memory_total))
            s.rect(x + 7, y + 33, w - 14, 4, "#d0d7de", rx=2)
            if used > 0:
                s.rect(x + 7, y + 33, (w - 14) * used, 4, "#6e7781", rx=2)
        else:
            s.text(x + 7, y + 28, "no memory online", size=9.5, fill=C_WARN, weight="bold")
        s.raw("</g>")

    # ---------------------------------------------------------------- layout

    def sockets(self) -> list[tuple[int | None, list[_NodeView]]]:
        """(socket id, its CPU nodes) in socket order; a node goes to its first CPU's socket."""
        by_socket: dict[int, list[_NodeView]] = {}
        cpu_by_id = {c.id: c for c in self.t.cpus}
        for v in self.views.values():
            if not v.node.cpus:
                continue
            first = cpu_by_id.get(v.node.cpus[0])
            by_socket.setdefault(first.socket if first else -1, []).append(v)
        return sorted(by_socket.items())

    def draw_socket(self, sid: int, views: list[_NodeView], x: float, y: float) -> tuple[float,
                                                                                          float]:
        """Draw one socket box at (x, y); returns its (width, height)."""
        s = self.svg
        per_row = min(MAX_NODES_PER_ROW, len(views))
        rows = [views[i:i + per_row] for i in range(0, len(views), per_row)]
        w = 2 * SOCKET_PAD + per_row * self.node_w + (per_row - 1) * NODE_GAP
        heights = []
        for row in rows:
            nh = max(self._node_h(v) for v in row)
            dh = max(self._devices_h(v) for v in row)
            heights.append((nh, dh))
        h = SOCKET_HEAD + sum(nh + dh for nh, dh in heights) + NODE_GAP * (len(rows) - 1) + \
            SOCKET_PAD
        s.rect(x, y, w, h, C_SOCKET_FILL, C_SOCKET_LINE, rx=10, sw=1.5,
               extra=f' id="socket-{sid}" class="socket"' if sid >= 0 else ' class="socket"')
        cpus = self.t.sockets.get(sid, ())
        cores = len({self.t.cpu(c).core_key for c in cpus})
        label = f"socket {sid}" if sid >= 0 else "socket unknown"
        s.text(x + SOCKET_PAD, y + 17, label, size=13.5, weight="bold")
        s.text(x + SOCKET_PAD + _text_w(label, 13.5) + 8, y + 17,
               f"{len(cpus)} CPUs, {cores} cores", size=11, fill=C_MUTED)
        cy = y + SOCKET_HEAD
        for row, (nh, dh) in zip(rows, heights, strict=True):
            for i, v in enumerate(row):
                nx = x + SOCKET_PAD + i * (self.node_w + NODE_GAP)
                self.node_box(v, nx, cy, nh)
                self.devices(v, nx, cy + nh)
            cy += nh + dh + NODE_GAP
        return w, h

    def draw(self) -> str:
        s = self.svg
        title = f"composer-numa report: {self.t.summary()}"
        o = self.plan.options
        need = "" if o.memory_need is None else f", memory need {format_size(o.memory_need)}"
        sub = (f"plan: {o.nproc} rank{'s' if o.nproc != 1 else ''}, mode {o.mode.value}, "
               f"memory {o.memory.value}{need}")
        proc = (f"cpuset: CPUs {format_cpulist(self.t.allowed_cpus) or '-'}, memory nodes "
                f"{format_cpulist(self.t.allowed_mems) or '-'}; automatic NUMA balancing "
                f"{balancing_text(self.t.numa_balancing)}")

        y = MARGIN + 50
        # sockets, packed into rows of at most MAX_NODES_PER_ROW node columns
        socket_list = self.sockets()
        placed_w = 0.0
        x = MARGIN
        row_h = 0.0
        cols_in_row = 0
        for sid, views in socket_list:
            ncols = min(MAX_NODES_PER_ROW, len(views))
            if cols_in_row and cols_in_row + ncols > MAX_NODES_PER_ROW:
                y += row_h + NODE_GAP
                x, row_h, cols_in_row = MARGIN, 0.0, 0
            w, h = self.draw_socket(sid, views, x, y)
            x += w + NODE_GAP
            placed_w = max(placed_w, x - NODE_GAP - MARGIN)
            row_h = max(row_h, h)
            cols_in_row += ncols
        if socket_list:
            y += row_h + NODE_GAP

        beside = {n.id for n in self.gpu_memory.values()}
        mem_views = [v for v in self.views.values() if not v.node.cpus and v.node.id not in beside]
        if mem_views:
            y, w = self._band("memory-only nodes (no CPUs: HBM, CXL or GPU memory)", mem_views,
                              y, C_MEMNODE_LINE, max(placed_w, 760.0))
            placed_w = max(placed_w, w)
        if self.unattached:
            y, w = self._unattached(y)
            placed_w = max(placed_w, w)

        width = max(placed_w, 760.0, _text_w(title, 15) * 1.08)
        y = self._legend(MARGIN, y + 6, width)
        y = self._warnings(MARGIN, y + 8, width)
        height = y + MARGIN
        total_w = width + 2 * MARGIN

        head = [
            '<?xml version="1.0" encoding="UTF-8"?>',
            f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{total_w:.0f}" '
            f'height="{height:.0f}" viewBox="0 0 {total_w:.0f} {height:.0f}">',
            f"<title>{escape(title)}</title>",
            f"<desc>{escape(sub + '. ' + proc + '. composer-numa ' + __version__)}</desc>",
            "<defs>",
            '<pattern id="outside" width="5" height="5" patternUnits="userSpaceOnUse" '
            'patternTransform="rotate(45)"><rect width="5" height="5" fill="#ffffff"/>'
            '<line x1="0" y1="0" x2="0" y2="5" stroke="#afb8c1" stroke-width="1.5"/></pattern>',
            '<pattern id="many" width="6" height="6" patternUnits="userSpaceOnUse" '
            'patternTransform="rotate(45)"><rect width="6" height="6" fill="#d0d7de"/>'
            '<line x1="0" y1="0" x2="0" y2="6" stroke="#6e7781" stroke-width="3"/></pattern>',
            "</defs>",
            f'<rect x="0" y="0" width="{total_w:.0f}" height="{height:.0f}" fill="#ffffff"/>',
        ]
        top = _Svg()
        top.text(MARGIN, MARGIN + 12, title, size=15, weight="bold")
        top.text(MARGIN, MARGIN + 29, sub, size=11.5)
        top.text(MARGIN, MARGIN + 44, proc, size=11.5, fill=C_MUTED)
        return "\n".join([*head, *top.parts, *s.parts, "</svg>"]) + "\n"

    def _band(self, label: str, views: list[_NodeView], y: float, line: str, room: float) -> tuple[float,
                                                                                                   float]:
        """Nodes outside any socket (CPU-less nodes); returns (next y, width).

        Nodes with memory get a full box; nodes with neither CPUs nor memory (the MIG
        reservations of Grace GPUs: seven per GPU) a small tag each, in rows ``room`` wide.
        """
        s = self.svg
        full = [v for v in views if v.node.memory_total > 0 or v.devices]
        empty = [v for v in views if not (v.node.memory_total > 0 or v.devices)]
        per_row = max(1, min(MAX_NODES_PER_ROW, len(full)))
        w = 2 * SOCKET_PAD + per_row * self.node_w + (per_row - 1) * NODE_GAP if full else 0.0
        rows = [full[i:i + per_row] for i in range(0, len(full), per_row)]
        dims = [(max(self._node_h(v) for v in r), max(self._devices_h(v) for v in r))
                for r in rows]
        h = SOCKET_HEAD + sum(a + b for a, b in dims) + NODE_GAP * max(0, len(rows) - 1) + SOCKET_PAD
        tag_w = max(w, room) - 2 * SOCKET_PAD
        per_tag_row = max(1, int((tag_w + EMPTY_GAP) // (EMPTY_W + EMPTY_GAP)))
        tag_rows = -(-len(empty) // per_tag_row)
        if empty:
            w = max(w, 2 * SOCKET_PAD + min(len(empty), per_tag_row) * (EMPTY_W + EMPTY_GAP) - EMPTY_GAP)
            tags_h = tag_rows * (EMPTY_H + EMPTY_GAP) - EMPTY_GAP
            h = h + NODE_GAP + 16 + tags_h if full else SOCKET_HEAD + tags_h + SOCKET_PAD
        empty_label = (f"{len(empty)} node{'s' if len(empty) > 1 else ''} with neither CPUs nor memory "
                       "(reserved, e.g. for GPU memory partitions)")
        w = max(w, 2 * SOCKET_PAD + _text_w(label if full else empty_label, 12.5))
        s.rect(MARGIN, y, w, h, "#fbfaff", line, rx=10, sw=1.2, dash="6 3")
        s.text(MARGIN + SOCKET_PAD, y + 17, label if full else empty_label, size=12.5, weight="bold", fill=line)
        cy = y + SOCKET_HEAD
        for row, (nh, dh) in zip(rows, dims, strict=True):
            for i, v in enumerate(row):
                nx = MARGIN + SOCKET_PAD + i * (self.node_w + NODE_GAP)
                self.node_box(v, nx, cy, nh)
                self.devices(v, nx, cy + nh)
            cy += nh + dh + NODE_GAP
        if empty and full:
            s.text(MARGIN + SOCKET_PAD, cy + 10, empty_label, size=10, fill=C_MUTED)
            cy += 16
        for k, v in enumerate(empty):
            r, c = divmod(k, per_tag_row)
            self.empty_node(v.node, MARGIN + SOCKET_PAD + c * (EMPTY_W + EMPTY_GAP), cy + r * (EMPTY_H + EMPTY_GAP))
        return y + h + NODE_GAP, w

    def empty_node(self, n: Node, x: float, y: float) -> None:
        s = self.svg
        s.raw(f"<g><title>{escape(self._node_tooltip(n))}</title>")
        s.rect(x, y, EMPTY_W, EMPTY_H, "#ffffff", C_MEMNODE_LINE, rx=4, sw=1, dash="3 2",
               extra=f' id="node-{n.id}" class="node memory-only empty"')
        s.text(x + EMPTY_W / 2, y + 14, f"node {n.id}", size=9.5, fill=C_MUTED, anchor="middle")
        s.raw("</g>")

    def _unattached(self, y: float) -> tuple[float, float]:
        """Devices whose NUMA node is unknown, in a dashed band."""
        s = self.svg
        per_row = 2 * MAX_NODES_PER_ROW
        n = len(self.unattached)
        cols = min(per_row, n)
        w = 2 * SOCKET_PAD + cols * self.chip_w + (cols - 1) * CHIP_GAP
        rows = -(-n // per_row)
        h = SOCKET_HEAD + rows * (CHIP_H + CHIP_GAP) - CHIP_GAP + SOCKET_PAD
        s.rect(MARGIN, y, w, h, "#fff8f2", C_UNKNOWN_LINE, rx=10, sw=1.2, dash="6 3")
        s.text(MARGIN + SOCKET_PAD, y + 17, "devices on an unknown NUMA node", size=12.5,
               weight="bold", fill=C_UNKNOWN_LINE)
        for i, dev in enumerate(self.unattached):
            row, col = divmod(i, per_row)
            self.chip(dev, MARGIN + SOCKET_PAD + col * (self.chip_w + CHIP_GAP),
                      y + SOCKET_HEAD + row * (CHIP_H + CHIP_GAP), self.chip_w, unknown=True)
        return y + h + NODE_GAP, w

    def _legend(self, x: float, y: float, width: float) -> float:
        """The rank table (colour, GPU, nodes, CPUs, memory, threads) and the cell key."""
        s = self.svg
        s.text(x, y + 14, "Ranks", size=13, weight="bold")
        y += 22
        headers = ["rank", "GPU", "nodes", "CPUs", "memory", "threads"]
        rows = []
        for r in self.plan.ranks:
            gpu = "-" if r.gpu is None else f"{r.gpu}" + (
                f" ({r.gpu_pci_bus_id})" if r.gpu_pci_bus_id else "")
            rows.append([f"{r.local_rank}", gpu, format_cpulist(r.numa_nodes) or "-",
                         format_cpulist(r.cpus) or "-", _memory_label(r), str(r.num_threads)])
        size = 11.0
        widths = [max(_text_w(h, size), *(_text_w(row[i], size) for row in rows)) + 16
                  if rows else _text_w(h, size) + 16 for i, h in enumerate(headers)]
        # long cpulists (odd cpusets) would push the table off the page: cap the CPU column
        widths[3] = min(widths[3], max(160.0, width - sum(widths) + widths[3] - 30))
        sw = 22
        cx = [x + sw]
        for w in widths[:-1]:
            cx.append(cx[-1] + w)
        for i, h in enumerate(headers):
            s.text(cx[i], y + 11, h, size=10, fill=C_MUTED, weight="bold")
        y += 16
        for k, (r, row) in enumerate(zip(self.plan.ranks, rows, strict=True)):
            if k % 2 == 0:
                s.rect(x, y, min(width, cx[-1] + widths[-1] - x), 17, "#f6f8fa")
            col = rank_colour(r.local_rank)
            s.rect(x + 4, y + 3, 12, 11, col, rx=2)
            for i, cell in enumerate(row):
                text = cell
                limit = widths[i] - 12
                if _text_w(text, size) > limit:
                    keep = max(4, int(limit / (size * 0.62)) - 1)
                    text = text[:keep] + "…"
                s.text(cx[i], y + 12.5, text, size=size, mono=i in (3,))
            y += 17
        if not rows:
            s.text(x, y + 12, "no ranks planned", size=11, fill=C_MUTED)
            y += 17
        # key to the cell colours
        y += 10
        items = [
            ("plain", C_UNPLANNED, "allowed, not planned"),
            ("outside", "url(#outside)", "outside the cpuset"),
            ("stripes", None, f"shared by 2-{MAX_STRIPES} ranks (their colours)"),
            ("many", "url(#many)", f"shared by more than {MAX_STRIPES} ranks"),
            ("memnode", C_MEMNODE_FILL, "node without CPUs"),
            ("gpu", C_GPU_FILL, "GPU (rN: rank driving it)"),
            ("nic", C_NIC_FILL, "NIC"),
        ]
        kx = x
        for kind, fill, label in items:
            item_w = 22 + _text_w(label, 10) + 18
            if kx + item_w > x + width:
                kx = x
                y += 18
            if kind == "stripes":
                s.rect(kx, y, 15, 12, "#ffffff", "#8c959f", sw=0.6)
                for i in range(3):
                    s.rect(kx + i * 5, y + 8, 5, 4, rank_colour(i))
            elif kind == "many":
                s.rect(kx, y, 15, 12, "#ffffff", "#8c959f", sw=0.6)
                s.rect(kx, y + 8, 15, 4, fill)
            elif kind == "memnode":
                s.rect(kx, y, 15, 12, fill, C_MEMNODE_LINE, sw=1.2, dash="3 2")
            elif kind == "nic":
                s.rect(kx, y, 15, 12, fill, C_NIC_LINE, sw=1)
            else:
                s.rect(kx, y, 15, 12, fill, "#afb8c1", sw=0.6)
            s.text(kx + 20, y + 10, label, size=10, fill=C_MUTED)
            kx += item_w
        s.text(x, y + 30, "Each column in a node is one physical core; SMT siblings are stacked. "
               "'mem' tags show the ranks whose memory policy uses the node.", size=10,
               fill=C_MUTED)
        return y + 36

    def _warnings(self, x: float, y: float, width: float) -> float:
        s = self.svg
        warns = warnings_of(self.t, self.plan)
        if not warns:
            s.text(x, y + 14, "No warnings.", size=11, fill=C_MUTED)
            return y + 20
        s.text(x, y + 14, f"Warnings ({len(warns)})", size=13, weight="bold", fill=C_WARN)
        y += 20
        chars = max(40, int((width - 20) / (11 * 0.6)))
        for d in warns:
            lines = textwrap.wrap(f"[{d.code}] {d.message}", chars) or [f"[{d.code}]"]
            s.rect(x, y + 3, 4, 14 * len(lines) - 2, C_WARN)
            for k, ln in enumerate(lines):
                s.text(x + 10, y + 13 + 14 * k, ln, size=11)
            y += 14 * len(lines) + 5
        return y


def render_svg(topology: Topology, plan: Plan) -> str:
    """The machine and the plan as a standalone SVG document (text)."""
    return _Picture(topology, plan).draw()
