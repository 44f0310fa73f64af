"""One binding table for a multi-host job: merging per-rank records and per-host reports."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from composer_numa.machine.sysfs import discover
from composer_numa.plan import PlanOptions, plan
from composer_numa.report import merge, to_json
from tests.fakesys import build_tree
from tests.fixtures import SPECS

ROOT = Path(__file__).resolve().parents[2]
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def machines(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = discover(*build_tree(tmp_path_factory.mktemp(name), SPECS[name]), env={})
        return cache[name]

    return get


def _records(topo, host, node_rank, first_rank, *, fraction=0.97, mode="node", codes=()):
    p = plan(topo, PlanOptions(nproc=max(1, len(topo.gpus)), mode=mode))
    return [merge.record(host=host, node_rank=node_rank, rank=first_rank + r.local_rank, local_rank=r.local_rank,
                         gpu_pci_bus_id=r.gpu_pci_bus_id, nodes=r.numa_nodes, cpus=r.cpus,
                         memory_policy=r.memory_policy.value, memory_nodes=r.memory_nodes, threads=r.num_threads,
                         local_memory_fraction=fraction, warnings=codes, topology=topo)
            for r in p.ranks]


def test_identical_hosts_give_one_row_per_rank_and_no_warning(machines):
    topo = machines("aws-p4d")
    records = [rec for h in range(4) for rec in _records(topo, f"p4d-{h}", h, 8 * h)]
    records.reverse()  # gathered in any order
    m = merge.from_records(json.loads(json.dumps(records)))  # what crosses the wire is plain JSON
    assert [(r.rank, r.host, r.local_rank) for r in m.rows] == [(i, f"p4d-{i // 8}", i % 8) for i in range(32)]
    assert [h.name for h in m.hosts] == [f"p4d-{h}" for h in range(4)]
    assert m.warnings == ()
    text = merge.render_table(m)
    assert text.splitlines()[0].endswith("binding of 32 ranks on 4 hosts") and "Warnings: none" in text
    lines = [ln for ln in text.splitlines() if ln.startswith("  p4d-")]
    assert len(lines) == 32 + 4  # 32 rank rows, 4 host lines
    row = lines[9].split()
    assert row[:6] == ["p4d-1", "9", "1", "0000:10:1d.0", "0", "0-23,48-71"] and row[-1] == "97%"


def test_a_host_with_sub_numa_clustering_is_named_against_the_majority(machines):
    two, snc = machines("asus-epyc-4gpu"), machines("snc-amd")
    records = _records(two, "a", 0, 0) + _records(two, "b", 1, 4) + _records(snc, "c", 2, 8)
    m = merge.from_records(records)
    (machine,) = [d for d in m.warnings if d.code == "host-machine-differs"]
    assert machine.message == ("host c: machine is 2 sockets, 4 NUMA nodes with CPUs (SNC/NPS on), 32 CPUs, 4 GPUs; "
                               "the majority (2 of 3 hosts) has 2 sockets, 2 NUMA nodes with CPUs, 64 CPUs, 4 GPUs")
    (plans,) = [d for d in m.warnings if d.code == "host-plan-differs"]
    assert plans.message.startswith("host c: plan is local rank 0: 8 CPUs on 1 node, 8 threads, preferred")
    assert "the majority (2 of 3 hosts) has local rank 0: 32 CPUs on 1 node, 16 threads" in plans.message


def test_plans_that_differ_without_a_majority_list_every_host(machines):
    topo = machines("aws-p4d")
    m = merge.from_records(_records(topo, "x", 0, 0) + _records(topo, "y", 1, 8, mode="exclusive"))
    (d,) = m.warnings
    assert d.code == "host-plan-differs" and "no majority" in d.message
    assert "x: local rank 0: 48 CPUs" in d.message and "y: local rank 0: 12 CPUs" in d.message


def test_unknown_gpu_nodes_and_remote_pages_are_named_by_host_and_rank(machines):
    topo, odd = machines("aws-p4d"), machines("numa-minus1-multi")
    records = _records(topo, "good", 0, 0) + _records(odd, "vm-host", 1, 8, codes=("gpu-numa-unknown",))
    records[3]["row"]["local_memory_fraction"] = 0.2
    m = merge.from_records(records)
    codes = [d.code for d in m.warnings]
    assert "gpu-numa-unknown" in codes and "rank-memory-remote" in codes
    unknown = next(d for d in m.warnings if d.code == "gpu-numa-unknown")
    assert "vm-host (local ranks 0-1)" in unknown.message
    remote = next(d for d in m.warnings if d.code == "rank-memory-remote")
    assert "good local rank 3 (rank 3) 20%" in remote.message
    assert "local share below 50%" in remote.message


def test_one_host_name_on_two_node_ranks_is_told_apart(machines):
    topo = machines("cpu-only")
    m = merge.from_records(_records(topo, "box", 1, 2) + _records(topo, "box", 0, 0))
    assert [h.name for h in m.hosts] == ["box/node0", "box/node1"]
    assert [(r.host, r.rank) for r in m.rows] == [("box/node0", 0), ("box/node1", 2)]


def _report(tmp_path, name, spec, *args) -> Path:
    s, p = build_tree(tmp_path / name, SPECS[spec])
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, "-m", "composer_numa.cli", "report", "--format", "json", "-o", str(out),
                           "--sysfs-root", s, "--proc-root", p, *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


def test_cli_merges_per_host_reports_into_one_table_and_picture(tmp_path):
    files = [_report(tmp_path, f"gb{i}", "gb200-tray") for i in range(3)]
    files.append(_report(tmp_path, "other", "nps4-256", "--nproc", "4"))
    cli = [sys.executable, "-m", "composer_numa.cli", "report", "--merge", *map(str, files)]
    text = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    rows = [ln.split() for ln in text.splitlines() if ln.startswith(("  gb", "  other")) and "sockets" not in ln]
    assert len(rows) == 16 and rows[0][:5] == ["gb0", "0", "0008:01:00.0", "0", "0-71"]
    assert "[host-machine-differs] host other: machine is 2 sockets, 8 NUMA nodes" in " ".join(text.split())
    assert "[host-plan-differs] host other" in text

    d = json.loads(subprocess.run([*cli, "--format", "json"], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout)
    assert d["schema"] == 1 and d["kind"] == "merged"
    assert [h["host"] for h in d["hosts"]] == ["gb0", "gb1", "gb2", "other"]
    assert len(d["ranks"]) == 16 and d["ranks"][0]["rank"] is None and d["ranks"][0]["local_memory_fraction"] is None
    assert [w["code"] for w in d["warnings"]] == ["host-machine-differs", "host-plan-differs"]

    svg = subprocess.run([*cli, "--format", "svg"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    root = ET.fromstring(svg.encode())
    rects = {e.get("id"): e for e in root.iter(f"{SVG}rect") if e.get("id")}
    assert len([k for k in rects if k.startswith("rank-")]) == 16
    assert "flagged" in rects["host-other"].get("class") and "flagged" not in rects["host-gb0"].get("class")


def test_a_report_of_this_machine_names_its_host(tmp_path):
    live = discover()
    d = to_json(live, plan(live, PlanOptions()))
    assert isinstance(d["host"], str) and d["host"]
    m = merge.from_reports([("x", d), ("x", d)])  # the same host twice: told apart, not merged
    assert [h.name for h in m.hosts] == [d["host"], f"{d['host']}#2"]


@pytest.mark.parametrize("content, words", [
    ("{", "is not JSON"),
    ('{"schema": 2}', 'not a composer-numa report with "schema": 1 (found 2)'),
    ("[1, 2]", "not a composer-numa report"),
    ('{"schema": 1, "plan": []}', "malformed report (KeyError"),
])
def test_bad_reports_are_one_line_errors(tmp_path, content, words):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "composer_numa.cli", "report", "--merge", str(bad)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and words in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    missing = subprocess.run([sys.executable, "-m", "composer_numa.cli", "report", "--merge", str(tmp_path / "no")],
                             cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 2 and "cannot read" in missing.stderr
