"""A two-"host" job on one machine: Composer's launcher started twice (``--node_rank 0`` and
``1``, ``--world_size 4 --nproc 2``, a local master address, gloo on the CPU), the
``NumaAffinity`` callback in every rank; rank 0 logs one table with the 4 ranks."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess

import pytest

from tests.composer.test_callback import ROOT, clean_env, needs_numa
from tests.composer.test_callback import _cpulist as cpulist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@needs_numa
def test_two_hosts_one_table_on_rank_0(tmp_path):
    if shutil.which("composer") is None:
        pytest.skip("Composer's launcher (composer) is not on PATH")
    port, reports = _free_port(), tmp_path / "reports"
    procs = []
    for node_rank in (0, 1):
        # "host" 1 plans exclusive shares: its plan differs from host 0's, which rank 0 must say
        mode = ["--numa-mode", "exclusive"] if node_rank else []
        cmd = ["composer", "--world_size", "4", "--nproc", "2", "--node_rank", str(node_rank),
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               "examples/train.py", "--steps", "2", "--device", "cpu", "--report-dir", str(reports), *mode]
        procs.append((cmd, subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)))
    outputs = []
    for cmd, proc in procs:
        try:
            out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for _, p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-3000:]}\n{err[-5000:]}"
        outputs.append(out + err)

    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in range(4)]
    assert [r["world_size"] for r in ranks] == [4] * 4 and all(r["batches"] == 2 for r in ranks)
    # only rank 0 holds (and logs) the table
    assert "numa_table" in ranks[0] and not any("numa_table" in r for r in ranks[1:])
    table = ranks[0]["numa_table"]
    rows = table["ranks"]
    assert [r["rank"] for r in rows] == [0, 1, 2, 3] and [r["local_rank"] for r in rows] == [0, 1, 0, 1]
    host = socket.gethostname()
    assert [r["host"] for r in rows] == [f"{host}/node0"] * 2 + [f"{host}/node1"] * 2
    assert [h["host"] for h in table["hosts"]] == [f"{host}/node0", f"{host}/node1"]
    for row, rank in zip(rows, ranks, strict=True):
        # each row is what that rank's kernel reported (its own report of its affinity)
        assert row["cpus"] == rank["affinity"] == cpulist(rank["numa"]["numa/cpus"])
        assert row["num_threads"] == rank["torch_num_threads"]
        assert row["memory_policy"] == rank["memory_policy"] == "preferred"
        assert 0.0 <= row["local_memory_fraction"] <= 1.0
    assert [w["code"] for w in table["warnings"]] == ["host-plan-differs"]

    # the table as rank 0 logged it: 4 rows, once, in the launcher's output of node rank 0
    logged = outputs[0]
    assert logged.count("binding of 4 ranks on 2 hosts") == 1
    lines = [ln for ln in logged.splitlines() if ln.startswith(f"  {host}/node")]
    assert len(lines) == 4 + 2  # 4 rank rows, 2 host lines
    assert "[host-plan-differs]" in logged
    assert "binding of 4 ranks" not in outputs[1]
