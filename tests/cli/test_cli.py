"""The ``composer-numa`` command line: help, version, ``report`` and its bad-input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from composer_numa._version import __version__
from composer_numa.cli import main
from tests.fakesys import build_tree
from tests.fixtures import SPECS

ROOT = Path(__file__).resolve().parents[2]
GPU_ENV = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
           "COMPOSER_NUMA_GPUS")


@pytest.fixture(autouse=True)
def _no_gpu_selection(monkeypatch):
    for name in GPU_ENV:
        monkeypatch.delenv(name, raising=False)


def _tree(tmp_path, name: str) -> list[str]:
    sys_root, proc_root = build_tree(tmp_path / name, SPECS[name])
    return ["--sysfs-root", sys_root, "--proc-root", proc_root]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) with argparse's exits turned into a status."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in GPU_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_help_lists_report(capsys):
    rc, out, _ = _run(["--help"], capsys)
    assert rc == 0
    assert "report" in out and "COMMAND" in out
    rc, out, _ = _run(["report", "--help"], capsys)
    assert rc == 0
    for option in ("--format", "--output", "--nproc", "--mode", "--memory", "--memory-need",
                   "--sysfs-root", "--proc-root"):
        assert option in out
    assert "table,json,markdown,svg" in out.replace(" ", "").replace("\n", "")


def test_version(capsys):
    rc, out, _ = _run(["--version"], capsys)
    assert rc == 0 and out == f"composer-numa {__version__}\n"


def test_no_subcommand_shows_help_and_fails(capsys):
    rc, out, _ = _run([], capsys)
    assert rc == 2 and "usage: composer-numa" in out


def test_report_table_on_a_fixture(tmp_path, capsys):
    rc, out, err = _run(["report", *_tree(tmp_path, "aws-p4d")], capsys)
    assert rc == 0 and err == ""
    assert "2 sockets, 2 NUMA nodes, 96 CPUs (48 cores), 8 GPUs, 4 NICs" in out
    assert "0000:a0:1d.0" in out and "Plan (nproc 8, mode node, memory preferred)" in out


def test_report_live_machine(capsys):
    rc, out, err = _run(["report", "--format", "json"], capsys)
    assert rc == 0
    d = json.loads(out)
    assert d["schema"] == 1 and d["live"] is True
    assert set(d["cpuset"]["cpus"]) == os.sched_getaffinity(0)
    assert d["options"]["nproc"] == max(1, len(d["gpus"]))


@pytest.mark.parametrize("fmt", ["table", "json", "markdown", "svg"])
def test_report_output_file(tmp_path, capsys, fmt):
    target = tmp_path / f"report.{fmt}"
    rc, out, err = _run(["report", *_tree(tmp_path, "grace-hopper"), "--format", fmt,
                         "--output", str(target)], capsys)
    assert rc == 0 and out == "" and err == ""
    text = target.read_text()
    if fmt == "json":
        assert json.loads(text)["nodes"][1]["has_cpus"] is False
    elif fmt == "svg":
        assert ET.fromstring(text.encode()).tag == "{http://www.w3.org/2000/svg}svg"
    elif fmt == "markdown":
        assert text.startswith("# composer-numa report") and "| 1 | (none: memory only, near node 0) |" in text
    else:
        assert "(none: memory only, near node 0)" in text


def test_report_defaults_nproc_to_visible_gpus_or_one(tmp_path, capsys, monkeypatch):
    rc, out, _ = _run(["report", *_tree(tmp_path, "aws-p4d"), "--format", "json"], capsys)
    assert rc == 0 and json.loads(out)["options"]["nproc"] == 8
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,2")
    rc, out, _ = _run(["report", *_tree(tmp_path / "b", "aws-p4d"), "--format", "json"], capsys)
    d = json.loads(out)
    assert d["options"]["nproc"] == 2 and [g["pci_bus_id"] for g in d["gpus"]] == [
        "0000:90:1d.0", "0000:20:1c.0"]
    assert [r["numa_nodes"] for r in d["plan"]] == [[1], [0]]
    rc, out, _ = _run(["report", *_tree(tmp_path, "cpu-only"), "--format", "json"], capsys)
    assert json.loads(out)["options"]["nproc"] == 1


def test_report_passes_plan_options(tmp_path, capsys):
    rc, out, _ = _run(["report", *_tree(tmp_path, "nps4-256"), "--format", "json",
                       "--nproc", "4", "--mode", "exclusive", "--memory", "bind",
                       "--memory-need", "1.5G"], capsys)
    assert rc == 0
    d = json.loads(out)
    assert d["options"] == {"nproc": 4, "mode": "exclusive", "memory": "bind",
                            "memory_need_bytes": 3 << 29, "memory_target": "local"}
    assert [r["memory_policy"] for r in d["plan"]] == ["bind"] * 4
    assert not set(d["plan"][0]["cpus"]) & set(d["plan"][1]["cpus"])


BAD = [
    (["--mode", "bogus"], "'bogus'"),
    (["--memory", "everywhere"], "'everywhere'"),
    (["--nproc", "0"], "argument --nproc: expected a number of ranks from 1 to 65536, got '0'"),
    (["--nproc", "-2"], "argument --nproc: expected a number of ranks from 1 to 65536, got '-2'"),
    (["--nproc", "999999999999999999999999999999"], "expected a number of ranks from 1 to 65536"),
    (["--memory-need", "9" * 400], "larger than 16 EiB"),
    (["--nproc", "two"], "'two'"),
    (["--memory-need", "12Q"], "'12Q'"),
    (["--memory-need", "lots"], "'lots'"),
    (["--format", "pdf"], "'pdf'"),
]


@pytest.mark.parametrize("argv,expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_options_are_one_line_errors(tmp_path, capsys, argv, expected):
    rc, out, err = _run(["report", *_tree(tmp_path, "snc-amd"), *argv], capsys)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and expected in err and "Traceback" not in err


def test_bad_roots_name_the_path(tmp_path, capsys):
    missing = tmp_path / "no-such-root"
    rc, _, err = _run(["report", "--sysfs-root", str(missing)], capsys)
    assert rc == 2 and str(missing) in err and len(err.strip().splitlines()) == 1

    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _run(["report", "--sysfs-root", str(empty)], capsys)
    assert rc == 2 and str(empty) in err and "sysfs" in err
    assert len(err.strip().splitlines()) == 1

    sys_root = _tree(tmp_path, "snc-amd")[1]
    rc, _, err = _run(["report", "--sysfs-root", sys_root, "--proc-root", str(missing)], capsys)
    assert rc == 2 and str(missing) in err and len(err.strip().splitlines()) == 1


def test_output_into_a_missing_directory_or_onto_a_directory(tmp_path, capsys):
    args = _tree(tmp_path, "snc-amd")
    target = tmp_path / "nowhere" / "report.svg"
    rc, out, err = _run(["report", *args, "--format", "svg", "--output", str(target)], capsys)
    assert rc == 2 and out == "" and not target.exists()
    assert err == f"composer-numa: error: cannot write {target}: directory " \
                  f"{target.parent} does not exist\n"
    rc, _, err = _run(["report", *args, "--output", str(tmp_path)], capsys)
    assert rc == 2 and f"cannot write {tmp_path}" in err and len(err.splitlines()) == 1


def test_cli_process_bad_input_has_no_traceback(tmp_path):
    for argv in (["report", "--nproc", "0"], ["report", "--sysfs-root", str(tmp_path / "x")],
                 ["report", "--memory-need", "1.2.3G"], ["report", "--mode", "fast"]):
        r = subprocess.run([sys.executable, "-m", "composer_numa.cli", *argv], env=_env(),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stdout == "" and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_report_never_imports_torch_or_composer(tmp_path):
    args = _tree(tmp_path, "nps4-256")
    code = (
        "import sys\n"
        "from composer_numa.cli import main\n"
        f"for fmt in ('table', 'json', 'markdown', 'svg'):\n"
        f"    assert main(['report', *{args!r}, '--format', fmt,\n"
        f"                 '--output', {str(tmp_path / 'r')!r} + fmt]) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'composer', "
        "'numpy'))\n"
        "print(heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    assert (tmp_path / "rsvg").stat().st_size > 10_000
