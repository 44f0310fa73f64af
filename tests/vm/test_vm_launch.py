"""``composer-numa launch -n 2 examples/train.py`` on layout 1 (two nodes, one CPU each, here
3 GiB each to hold three Composer processes and their page cache):
two Composer ranks (CPU, gloo), each bound at birth to its own node, each logging
``numa/local_memory_fraction`` >= 0.9 through the NumaAffinity callback. The one guest check
that imports torch (about 35 s per process under TCG), so it has its own boot."""

from __future__ import annotations

import json
import shlex

import pytest

from tests.vm.conftest import boot_checks, cli
from tests.vm.harness import REPO, TWO_NODES_LAUNCH

LAYOUT = TWO_NODES_LAUNCH
pytestmark = pytest.mark.skipif(not (REPO / "examples" / "train.py").is_file(),
                                reason="examples/train.py is missing")


@pytest.fixture(scope="module")
def boot():
    # CPU-only ranks (no GPU named): the planner spreads them over the nodes, rank r on node r.
    launch = [*cli(), "launch", "-n", "2", "--stdout", "/run/vmio/out/rank{rank}.stdout",
              "--stderr", "/run/vmio/out/rank{rank}.stderr", "examples/train.py",
              "--device", "cpu", "--steps", "4", "--report-dir", "/run/vmio/out/reports"]
    # free memory per node every 15 s, to tell a full node from a wrong binding
    watch = ("(while :; do grep -h MemFree /sys/devices/system/node/node*/meminfo | tr -s ' ' "
             "| tr '\\n' ';'; echo; sleep 15; done) >/run/vmio/out/memfree.log &")
    return boot_checks(LAYOUT, {"launch": f"{watch}\nexec {shlex.join(launch)}"},
                       timeout=900, check_timeout=840, env={"COMPOSER_NUMA_GPUS": ""})


def _head_tail(text: str, n: int = 1500) -> str:
    return text if len(text) <= 2 * n else f"{text[:n]}\n[...]\n{text[-n:]}"


def _reports(boot) -> list[dict]:
    r = boot["launch"]
    logs = "\n".join(f"--- {k}\n{_head_tail(v.decode(errors='replace'))}"
                     for k, v in boot.vm.files.items() if k.startswith("rank"))
    assert r.returncode == 0, r.describe() + "\n" + logs
    files = {k: v for k, v in boot.vm.files.items() if k.startswith("reports/")}
    assert sorted(files) == ["reports/rank0.json", "reports/rank1.json"], (sorted(files), logs)
    return [json.loads(files[f"reports/rank{i}.json"]) for i in (0, 1)]


def test_launch_binds_each_rank_to_its_own_node(boot):
    for rank, rep in enumerate(_reports(boot)):
        assert rep["bound_at"] == "launch", rep
        assert rep["affinity"] == list(LAYOUT.nodes[rank].cpus), rep
        assert (rep["memory_policy"], rep["memory_nodes"]) == ("preferred", [rank]), rep
        assert rep["batches"] == 4, rep


def test_each_rank_logs_high_local_memory_fraction(boot):
    for rank, rep in enumerate(_reports(boot)):
        frac = rep["numa_metrics"].get("numa/local_memory_fraction")
        assert frac is not None, rep
        memfree = boot.vm.files.get("memfree.log", b"").decode()
        assert frac >= 0.9, (rep, memfree[-1500:])
        print(f"[locality] {LAYOUT.name} launch rank {rank}: numa/local_memory_fraction {frac:.4f}")
