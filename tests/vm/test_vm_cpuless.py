"""Layout 3 (node 0 has both CPUs, node 1 is memory only, like GPU memory or CXL; the GPU
stand-in hangs off node 1): the CPU-less node is discovered as such and never planned for
CPUs, by the report or by ``composer-numa exec``. One boot."""

from __future__ import annotations

import pytest

from tests.vm.conftest import boot_checks, cli, py
from tests.vm.expect import (
    assert_discovered_matches,
    assert_pages_on,
    assert_raw_matches,
    assert_report_matches,
)
from tests.vm.harness import CPULESS

LAYOUT = CPULESS
CPU_NODE_CPUS = list(LAYOUT.nodes[0].cpus)


def _checks() -> dict:
    report = [*cli(), "report", "--format", "json"]
    checks = {
        "probe": py("probe.py"),
        "report-gpu": [*report, "--nproc", "2"],
        "report-cpu-only": ["env", "COMPOSER_NUMA_GPUS=", *report, "--nproc", "2"],
    }
    for mode in ("node", "socket", "exclusive", "core-complex"):
        checks[f"exec-{mode}"] = [*cli(), "exec", "--mode", mode, "--",
                                  *py("alloc.py", "128")]
    return checks


@pytest.fixture(scope="module")
def boot():
    return boot_checks(LAYOUT, _checks())


def test_guest_kernel_has_the_layout(boot):
    raw = boot.ok_json("probe")["raw"]
    assert_raw_matches(LAYOUT, raw)
    assert raw["nodes"][1]["cpus"] == [] and raw["nodes"][1]["memory_total_kb"] > 0


def test_discover_keeps_the_cpuless_node(boot):
    out = boot.ok_json("probe")
    assert "discover_error" not in out, out.get("discover_error")
    assert_discovered_matches(LAYOUT, out["discover"])


@pytest.mark.parametrize("check", ["report-gpu", "report-cpu-only"])
def test_report_never_plans_cpus_on_the_cpuless_node(boot, check):
    rep = boot.ok_json(check)
    assert_report_matches(LAYOUT, rep, gpus=check == "report-gpu")  # no CPUs on CPU-less nodes
    assert len(rep["plan"]) == 2
    for r in rep["plan"]:
        assert set(r["cpus"]) <= set(CPU_NODE_CPUS) and 1 not in r["numa_nodes"], r


@pytest.mark.parametrize("mode", ["node", "socket", "exclusive", "core-complex"])
def test_exec_never_runs_on_the_cpuless_node(boot, mode):
    out = boot.ok_json(f"exec-{mode}")
    b = out["binding"]
    assert b is not None and b["applied"]["not_applied"] == [], b
    assert b["cpus"] and set(b["cpus"]) <= set(CPU_NODE_CPUS), b
    assert out["affinity"] == b["cpus"], out
    assert all(a == b["cpus"] for a in out["threads"].values()), out["threads"]
    if b["memory_nodes"]:
        assert out["mempolicy"]["nodes"] == b["memory_nodes"], out
        frac = assert_pages_on(out, b["memory_nodes"])
        print(f"[locality] {LAYOUT.name} exec --mode {mode}: cpus {b['cpus']}, "
              f"{b['memory_policy']} {b['memory_nodes']}: {frac:.4f}")
