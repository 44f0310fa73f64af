"""The report renderers: JSON schema 1, table, Markdown and SVG, for every fixture machine."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from composer_numa import diagnostics as dg
from composer_numa.diagnostics import Diagnostic
from composer_numa.machine.sysfs import discover
from composer_numa.machine.topology import Gpu, Nic, Topology
from composer_numa.plan import MemoryPolicy, Mode, Plan, PlanOptions, RankPlan, plan
from composer_numa.report import (
    render,
    render_json,
    render_markdown,
    render_table,
    to_json,
    warnings_of,
)
from composer_numa.report.svg import rank_colour, render_svg
from composer_numa.units import format_cpulist
from tests.fakesys import build_tree
from tests.fixtures import SPECS
from tests.topo_factory import GiB, make_topology

SVG = "{http://www.w3.org/2000/svg}"
KNOWN_CODES = set(dg.CODES)

# Each fixture with the options that exercise it most.
CASES = [(name, Mode.NODE) for name in SPECS] + [
    ("nps4-256", Mode.EXCLUSIVE),
    ("nps4-256", Mode.CORE_COMPLEX),
    ("aws-p4d", Mode.SOCKET),
    ("cpu-only", Mode.EXCLUSIVE),
    ("cpuset-excludes", Mode.EXCLUSIVE),
    ("grace-hopper", Mode.NONE),
]


_MACHINES: dict[str, Topology] = {}


@pytest.fixture(scope="module")
def machines(tmp_path_factory):
    """Discover each fixture machine once per module (the trees are read-only)."""

    def get(name: str) -> Topology:
        if name not in _MACHINES:
            sys_root, proc_root = build_tree(tmp_path_factory.mktemp(name), SPECS[name])
            _MACHINES[name] = discover(sys_root, proc_root, env={})
        return _MACHINES[name]

    return get


def _planned(machines, name: str, mode: Mode = Mode.NODE, **kw) -> tuple[Topology, Plan]:
    topo = machines(name)
    nproc = kw.pop("nproc", max(1, len(topo.gpus)))
    return topo, plan(topo, PlanOptions(nproc=nproc, mode=mode, **kw))


# ------------------------------------------------------------------ JSON


def _check_schema(d: dict, topo: Topology, p: Plan) -> None:
    """Every rule of docs/report-json.md, checked against the objects it came from."""
    assert d["schema"] == 1
    for key in ("nodes", "sockets", "gpus", "nics", "cpuset", "numa_balancing", "plan",
                "options", "warnings"):
        assert key in d, key
    ints = lambda xs: isinstance(xs, list) and all(type(x) is int for x in xs)  # noqa: E731

    node_ids = [n["id"] for n in d["nodes"]]
    assert node_ids == [n.id for n in topo.nodes]
    for jn, n in zip(d["nodes"], topo.nodes, strict=True):
        assert ints(jn["cpus"]) and jn["cpus"] == sorted(jn["cpus"]) == list(n.cpus)
        assert jn["memory_total_bytes"] == n.memory_total and type(n.memory_total) is int
        assert 0 <= jn["memory_free_bytes"] <= max(jn["memory_total_bytes"], 0) or \
            jn["memory_total_bytes"] == 0
        assert ints(jn["distances"]) and len(jn["distances"]) == len(node_ids)
        assert jn["distances"][node_ids.index(n.id)] == 10
        assert jn["has_cpus"] is bool(n.cpus) and jn["has_memory"] is (n.memory_total > 0)
        assert jn["sockets"] == sorted({topo.cpu(c).socket for c in n.cpus})

    all_cpus = sorted(c.id for c in topo.cpus)
    assert sorted(c for s in d["sockets"] for c in s["cpus"]) == all_cpus
    for s in d["sockets"]:
        assert {topo.cpu(c).node for c in s["cpus"]} == set(s["numa_nodes"])

    assert [g["index"] for g in d["gpus"]] == list(range(len(topo.gpus)))
    for g in d["gpus"]:
        assert g["numa_node"] is None or g["numa_node"] in node_ids
        assert g["vendor"] in ("nvidia", "amd", "unknown")
        assert g["pci_bus_id"] is None or re.fullmatch(
            r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]", g["pci_bus_id"])
        assert ints(g["local_cpus"])
        assert g["memory_node"] == topo.gpus[g["index"]].memory_node
        assert g["memory_node"] is None or not topo.node(g["memory_node"]).cpus
    assert d["host"] is None if not topo.live else isinstance(d["host"], str)
    for nic in d["nics"]:
        assert set(nic) >= {"pci_bus_id", "kind", "vendor", "numa_node", "local_cpus"}
        assert nic["numa_node"] is None or nic["numa_node"] in node_ids

    allowed, mems = d["cpuset"]["cpus"], d["cpuset"]["mems"]
    assert ints(allowed) and set(allowed) <= set(all_cpus) and ints(mems)
    assert d["numa_balancing"] in (True, False, None)

    assert d["options"] == {"nproc": p.options.nproc, "mode": p.options.mode.value,
                            "memory": p.options.memory.value,
                            "memory_need_bytes": p.options.memory_need,
                            "memory_target": p.options.memory_target.value}
    assert d["memory_room_bytes"] == topo.memory_room
    for jn, n in zip(d["nodes"], topo.nodes, strict=True):
        assert jn["memory_available_bytes"] == n.available
    assert [r["local_rank"] for r in d["plan"]] == list(range(p.options.nproc))
    for r in d["plan"]:
        assert r["gpu"] is None or r["gpu"] in [g["index"] for g in d["gpus"]]
        if r["gpu"] is not None:
            assert r["gpu_pci_bus_id"] == d["gpus"][r["gpu"]]["pci_bus_id"]
        assert r["cpus"] and ints(r["cpus"]) and set(r["cpus"]) <= set(allowed)
        assert set(r["numa_nodes"]) == {topo.cpu(c).node for c in r["cpus"]}
        assert r["memory_policy"] in {m.value for m in MemoryPolicy}
        assert set(r["memory_nodes"]) <= set(mems)
        assert type(r["num_threads"]) is int and r["num_threads"] >= 1
        assert RankPlan.from_json(r) == p.ranks[r["local_rank"]]

    assert d["warnings"] == [w.to_json() for w in warnings_of(topo, p)]
    for w in d["warnings"]:
        assert set(w) == {"code", "message"} and w["code"] in KNOWN_CODES and w["message"]
    assert len({(w["code"], w["message"]) for w in d["warnings"]}) == len(d["warnings"])


@pytest.mark.parametrize("name,mode", CASES, ids=[f"{n}-{m.value}" for n, m in CASES])
def test_json_follows_schema_for_every_fixture(machines, name, mode):
    topo, p = _planned(machines, name, mode)
    d = to_json(topo, p)
    _check_schema(d, topo, p)
    assert json.loads(render_json(topo, p)) == d


def test_json_reports_what_the_fixtures_hold(machines):
    d = to_json(*_planned(machines, "numa-minus1-multi"))
    assert [g["numa_node"] for g in d["gpus"]] == [1, None]
    assert d["plan"][1]["memory_policy"] == "none"
    assert "gpu-numa-unknown" in {w["code"] for w in d["warnings"]}

    d = to_json(*_planned(machines, "grace-hopper"))
    assert [n["has_cpus"] for n in d["nodes"]] == [True, False, False, False]
    assert d["nodes"][1]["memory_total_bytes"] == 96 * GiB and d["nodes"][1]["sockets"] == []

    d = to_json(*_planned(machines, "cpuset-excludes"))
    assert d["cpuset"] == {"cpus": list(range(8)), "mems": [0]}
    assert d["plan"][1]["cpus"] == list(range(8))
    assert "cpuset-excludes-gpu-node" in {w["code"] for w in d["warnings"]}

    d = to_json(*_planned(machines, "azure-domains"))
    assert [g["pci_bus_id"][:4] for g in d["gpus"]] == ["0001", "0002", "0003", "0004"]
    assert [n["numa_node"] for n in d["nics"]] == [0, 1]

    d = to_json(*_planned(machines, "cpu-only", nproc=4,
                          memory=MemoryPolicy.BIND, memory_need=200 * GiB))
    assert d["numa_balancing"] is True and d["options"]["memory_need_bytes"] == 200 * GiB
    assert [r["gpu"] for r in d["plan"]] == [None] * 4
    assert [r["numa_nodes"] for r in d["plan"]] == [[0], [0], [1], [1]]
    codes = {w["code"] for w in d["warnings"]}
    assert {"numa-balancing-enabled", "node-memory-insufficient"} <= codes


def test_warnings_are_deduplicated_in_order():
    topo = make_topology(sockets=2, gpus=[0, 1], numa_balancing=True)
    dup = Diagnostic(dg.NUMA_BALANCING_ENABLED, "on")
    topo = Topology(topo.nodes, topo.cpus, topo.gpus, topo.nics, topo.allowed_cpus,
                    topo.allowed_mems, True,
                    (Diagnostic(dg.GPU_NUMA_UNKNOWN, "first"), dup))
    p = plan(topo, PlanOptions(nproc=2))
    p = Plan(p.options, p.ranks, (dup, Diagnostic(dg.TOO_FEW_CORES, "last"), *p.warnings))
    got = [(w.code, w.message) for w in warnings_of(topo, p)]
    assert got[:3] == [(dg.GPU_NUMA_UNKNOWN, "first"), (dg.NUMA_BALANCING_ENABLED, "on"),
                       (dg.TOO_FEW_CORES, "last")]
    assert len(got) == len(set(got))
    assert to_json(topo, p)["warnings"][1] == {"code": "numa-balancing-enabled", "message": "on"}


# ------------------------------------------------------------------ table and Markdown


def _section(text: str, title: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(title))
    out = []
    for ln in lines[start + 1:]:
        if not ln.strip():
            break
        out.append(ln)
    return out


def _columns(section: list[str]) -> list[dict[str, str]]:
    """Parse an aligned table through its dashed separator line."""
    header, dashes, *rows = section
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", dashes)]
    names = [header[a:b].strip() for a, b in spans]
    out = []
    for row in rows:
        cells = []
        for i, (a, b) in enumerate(spans):
            end = spans[i + 1][0] if i + 1 < len(spans) else len(row)
            cell = row[a:end]
            # left-aligned cells start at their column, right-aligned ones end at its edge
            aligned = cell[:1] != " " or len(row[:b].rstrip()) == b
            assert row[a - 1:a] in ("", " ") and aligned, f"cell {i} of {row!r} is not aligned"
            cells.append(cell.strip())
        out.append(dict(zip(names, cells, strict=True)))
    return out


@pytest.mark.parametrize("name,mode", CASES, ids=[f"{n}-{m.value}" for n, m in CASES])
def test_table_lists_every_node_gpu_rank_and_warning(machines, name, mode):
    topo, p = _planned(machines, name, mode)
    text = render_table(topo, p)
    nodes = _columns(_section(text, "NUMA nodes"))
    assert [r["node"] for r in nodes] == [str(n.id) for n in topo.nodes]
    for row, n in zip(nodes, topo.nodes, strict=True):
        assert row["cpus"] == (format_cpulist(n.cpus)
                               or f"(none: memory only, near node {topo.attached_cpu_node(n.id)})")
        assert row[next(k for k in row if k.startswith("distances"))] == \
            " ".join(map(str, n.distances))
    if topo.gpus:
        gpus = _columns(_section(text, "GPUs"))
        assert [r["pci address"] for r in gpus] == [g.pci_bus_id or "-" for g in topo.gpus]
        assert [r["node"] for r in gpus] == [
            "-" if g.numa_node is None else str(g.numa_node) for g in topo.gpus]
    ranks = _columns(_section(text, "Plan ("))
    assert [r["cpus"] for r in ranks] == [format_cpulist(r.cpus) for r in p.ranks]
    assert [r["threads"] for r in ranks] == [str(r.num_threads) for r in p.ranks]
    flat = " ".join(text.split())
    for w in warnings_of(topo, p):
        assert f"[{w.code}] {w.message}" in flat
    if warnings_of(topo, p):
        assert max(len(ln) for ln in _section(text, "Warnings")) <= 100
    else:
        assert "Warnings: none" in text


@pytest.mark.parametrize("name,mode", CASES, ids=[f"{n}-{m.value}" for n, m in CASES])
def test_markdown_tables_are_well_formed(machines, name, mode):
    topo, p = _planned(machines, name, mode)
    text = render_markdown(topo, p)
    assert text.startswith("# composer-numa report\n")
    tables = re.findall(r"((?:^\|.*\|\n)+)", text, flags=re.M)
    assert len(tables) >= 3  # nodes, sockets, plan at least
    for table in tables:
        rows = table.strip().splitlines()
        assert re.fullmatch(r"\|(-{3}:?\|)+|\|((---|---:)\|)+", rows[1])
        pipes = {len(re.findall(r"(?<!\\)\|", r)) for r in rows}
        assert len(pipes) == 1, table
    plan_table = next(t for t in tables if t.startswith("| rank |"))
    assert len(plan_table.strip().splitlines()) == 2 + len(p.ranks)
    for w in warnings_of(topo, p):
        assert f"`{w.code}`" in text


# ------------------------------------------------------------------ SVG


def _rects(root: ET.Element) -> dict[str, ET.Element]:
    return {e.get("id"): e for e in root.iter(f"{SVG}rect") if e.get("id")}


def _box(e: ET.Element) -> tuple[float, float, float, float]:
    x, y = float(e.get("x")), float(e.get("y"))
    return x, y, x + float(e.get("width")), y + float(e.get("height"))


def _inside(inner, outer) -> bool:
    return (outer[0] <= inner[0] and inner[2] <= outer[2] + 0.01
            and outer[1] <= inner[1] and inner[3] <= outer[3] + 0.01)


def _overlap(a, b) -> bool:
    return a[0] < b[2] - 0.01 and b[0] < a[2] - 0.01 and a[1] < b[3] - 0.01 and b[1] < a[3] - 0.01


@pytest.mark.parametrize("name,mode", CASES, ids=[f"{n}-{m.value}" for n, m in CASES])
def test_svg_draws_each_cpu_in_its_node_coloured_by_its_ranks(machines, name, mode):
    topo, p = _planned(machines, name, mode)
    root = ET.fromstring(render_svg(topo, p).encode())
    assert root.tag == f"{SVG}svg"
    width, height = float(root.get("width")), float(root.get("height"))
    rects = _rects(root)
    ids = [e.get("id") for e in root.iter() if e.get("id")]
    assert len(ids) == len(set(ids))

    owners: dict[int, list[int]] = {}
    for r in p.ranks:
        for c in r.cpus:
            owners.setdefault(c, []).append(r.local_rank)
    allowed = set(topo.allowed_cpus)
    for n in topo.nodes:
        node = rects[f"node-{n.id}"]
        nbox = _box(node)
        assert nbox[2] <= width and nbox[3] <= height
        assert ("memory-only" in node.get("class")) is (not n.cpus)
        assert (node.get("stroke-dasharray") is not None) is (not n.cpus)
        for c in n.cpus:
            cell = rects[f"cpu-{c}"]
            assert _inside(_box(cell), nbox), f"CPU {c} drawn outside node {n.id}"
            classes = cell.get("class").split()
            if c not in allowed:
                assert "outside" in classes and cell.get("fill") == "url(#outside)"
            elif c not in owners:
                assert "unplanned" in classes
            else:
                assert sorted(int(k[1:]) for k in classes if re.fullmatch(r"r\d+", k)) == \
                    sorted(owners[c])
                if len(owners[c]) == 1:
                    assert cell.get("fill") == rank_colour(owners[c][0])
    cells = [_box(e) for k, e in rects.items() if k.startswith("cpu-")]
    assert len(cells) == len(topo.cpus)
    cells.sort()
    for i, a in enumerate(cells):  # sorted by x: only neighbours in x can overlap
        for b in cells[i + 1:]:
            if b[0] >= a[2]:
                break
            assert not _overlap(a, b)

    for g in topo.gpus:
        chip = _box(rects[f"gpu-{g.index}"])
        if g.numa_node is None:
            assert "unknown-node" in rects[f"gpu-{g.index}"].get("class")
        else:
            node = _box(rects[f"node-{g.numa_node}"])
            assert node[0] <= chip[0] and chip[2] <= node[2] and chip[1] >= node[3], \
                f"GPU {g.index} is not hanging under node {g.numa_node}"
    assert len([k for k in rects if k.startswith("nic-")]) == len(topo.nics)
    # nodes and devices never cover each other, and a CPU node's devices stay in its socket
    boxes = {k: _box(e) for k, e in rects.items() if k.split("-")[0] in ("node", "gpu", "nic")}
    keys = sorted(boxes)
    for i, k in enumerate(keys):
        assert _box(rects[k])[3] <= height
        for k2 in keys[i + 1:]:
            assert not _overlap(boxes[k], boxes[k2]), f"{k} overlaps {k2}"
    for dev in (*topo.gpus, *topo.nics):
        if dev.numa_node is None or not topo.node(dev.numa_node).cpus:
            continue
        key = f"gpu-{dev.index}" if isinstance(dev, Gpu) else \
            "nic-" + dev.pci_bus_id.replace(":", "-")
        socket = topo.cpu(topo.node(dev.numa_node).cpus[0]).socket
        assert _inside(boxes[key], _box(rects[f"socket-{socket}"]))

    text = " ".join("".join(e.itertext()) for e in root.iter(f"{SVG}text"))
    for r in p.ranks:
        assert format_cpulist(r.cpus) in text or "…" in text
    for w in warnings_of(topo, p):
        assert f"[{w.code}]" in text


@pytest.mark.parametrize("name", ["gh200", "gb200-tray"])
def test_svg_draws_each_gpu_memory_node_right_under_its_gpu(machines, name):
    topo, p = _planned(machines, name, memory_target="hbm")
    root = ET.fromstring(render_svg(topo, p).encode())
    rects = _rects(root)
    drawn = []
    for g in topo.gpus:
        assert g.memory_node is not None
        chip, mem = _box(rects[f"gpu-{g.index}"]), rects[f"node-{g.memory_node}"]
        box = _box(mem)
        assert "gpu-memory" in mem.get("class") and mem.get("data-gpu") == str(g.index)
        assert mem.get("stroke-dasharray") is not None
        # under its GPU: same column, just below the chip, inside the GPU's socket
        assert abs(box[0] - chip[0]) < 0.01 and abs(box[2] - chip[2]) < 0.01
        assert 0 < box[1] - chip[3] <= 12
        socket = topo.cpu(topo.node(g.numa_node).cpus[0]).socket
        assert _inside(box, _box(rects[f"socket-{socket}"]))
        drawn.append(g.memory_node)
    # ranks whose policy uses a GPU's memory are tagged on that node, in their colour
    for r in p.ranks:
        (node,) = r.memory_nodes
        assert node in drawn
        box = _box(rects[f"node-{node}"])
        tags = [e for e in root.iter(f"{SVG}rect") if e.get("fill") == rank_colour(r.local_rank)
                and _inside(_box(e), box)]
        assert tags, f"rank {r.local_rank} is not tagged on node {node}"
    # the nodes with neither CPUs nor memory (MIG reservations) are small tags, not node boxes
    empty = [n.id for n in topo.nodes if not n.cpus and not n.has_memory]
    assert empty and all("empty" in rects[f"node-{n}"].get("class") for n in empty)
    assert max(float(rects[f"node-{n}"].get("height")) for n in empty) <= 24
    text = " ".join("".join(e.itertext()) for e in root.iter(f"{SVG}text"))
    assert f"{len(empty)} nodes with neither CPUs nor memory" in text
    assert "GPU 0 memory" in text


def test_svg_of_256_cpus_and_8_nodes_stays_legible(machines):
    topo, p = _planned(machines, "nps4-256", Mode.EXCLUSIVE)
    assert len(topo.cpus) == 256 and len(topo.nodes) == 8
    root = ET.fromstring(render_svg(topo, p).encode())
    assert float(root.get("width")) <= 1600  # 4 nodes a row, sockets stacked
    sizes = [float(e.get("font-size")) for e in root.iter(f"{SVG}text")]
    assert min(sizes) >= 7
    cell = _rects(root)["cpu-0"]
    assert float(cell.get("width")) >= 18 and float(cell.get("height")) >= 14
    # the 16 exclusive ranks get 16 distinct colours
    fills = {_rects(root)[f"cpu-{r.cpus[0]}"].get("fill") for r in p.ranks}
    assert len(fills) == len(p.ranks)
    # sockets contain their nodes
    rects = _rects(root)
    for s in (0, 1):
        sbox = _box(rects[f"socket-{s}"])
        for n in range(4 * s, 4 * s + 4):
            assert _inside(_box(rects[f"node-{n}"]), sbox)


def test_svg_escapes_text_and_places_unknown_devices_apart():
    topo = make_topology(sockets=2, gpus=[None, 1])
    gpus = (Gpu(0, None, "unknown", None), topo.gpus[1])
    nics = (Nic("0000:18:00.0", "ethernet", 'A&B <"x">', None),)
    topo = Topology(topo.nodes, topo.cpus, gpus, nics, topo.allowed_cpus, topo.allowed_mems,
                    None, (Diagnostic(dg.GPU_NUMA_UNKNOWN, "GPU 0 <unknown> & odd"),))
    p = plan(topo, PlanOptions(nproc=2))
    out = render_svg(topo, p)
    root = ET.fromstring(out.encode())
    rects = _rects(root)
    assert "unknown-node" in rects["gpu-0"].get("class")
    assert "unknown-node" in rects["nic-0000-18-00.0"].get("class")
    text = " ".join("".join(e.itertext()) for e in root.iter(f"{SVG}text"))
    assert "GPU 0 <unknown> & odd" in text and "PCI address unknown" in text
    assert "automatic NUMA balancing unknown" in text


def test_rank_colours_are_distinct_and_stable():
    colours = [rank_colour(r) for r in range(64)]
    assert len(set(colours)) == 64
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colours)
    assert colours[:3] == [rank_colour(0), rank_colour(1), rank_colour(2)]


def test_render_dispatches_every_format(machines):
    topo, p = _planned(machines, "snc-amd")
    assert render(topo, p, "json") == render_json(topo, p)
    assert render(topo, p, "table") == render_table(topo, p)
    assert render(topo, p, "markdown") == render_markdown(topo, p)
    assert render(topo, p, "svg") == render_svg(topo, p)
    with pytest.raises(Exception, match="unknown report format 'pdf'"):
        render(topo, p, "pdf")


def test_renderers_accept_a_hand_made_plan():
    """Renderers depend only on the dataclasses, not on how the plan was made."""
    topo = make_topology(sockets=1, cores_per_node=2, gpus=[0])
    ranks = (RankPlan(0, 0, None, (0,), (0, 1), MemoryPolicy.INTERLEAVE, (0,), 2),
             RankPlan(1, None, None, (0,), (1,), MemoryPolicy.LOCAL, (), 1))
    p = Plan(PlanOptions(nproc=2, mode=Mode.NODE), ranks)
    rows = _columns(_section(render_table(topo, p), "Plan ("))
    assert [(r["gpu"], r["memory"]) for r in rows] == [("0", "interleave 0"), ("-", "local")]
    root = ET.fromstring(render_svg(topo, p).encode())
    assert _rects(root)["cpu-1"].get("class").split() == ["cpu", "shared", "r0", "r1"]
    assert _rects(root)["cpu-0"].get("fill") == rank_colour(0)


def test_docs_example_is_what_the_report_prints(machines):
    """docs/report-json.md shows real output, and documents every warning code."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "report-json.md").read_text()
    example = json.loads(re.search(r"```json\n(.*?)```", doc, flags=re.S).group(1))
    topo, p = _planned(machines, "cpuset-excludes")
    got = to_json(topo, p)
    assert {k: v for k, v in example.items() if k != "version"} == \
        {k: v for k, v in got.items() if k != "version"}
    documented = set(re.findall(r"^\| `([a-z-]+)` \|", doc, flags=re.M))
    assert KNOWN_CODES <= documented
    for key in got:
        assert f"`{key}`" in doc
