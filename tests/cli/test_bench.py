"""``composer-numa bench --bandwidth``: the probes run, report sane numbers,
refuse bad options with one line, and never import torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("composer_numa._C", reason="the C++ extension is not built")

from composer_numa import cli  # noqa: E402
from composer_numa.cli import bench  # noqa: E402

ARGS = ["bench", "--bandwidth", "--size", "8M", "--passes", "2"]


def test_table_lists_every_kernel_and_the_node_matrix(capsys):
    assert cli.main(ARGS) == 0
    out = capsys.readouterr().out
    for kernel in bench.KERNELS:
        line = next(x for x in out.splitlines() if x.startswith(kernel + " "))
        best, median = map(float, line.split()[-2:])
        assert best >= median > 0.1  # GB/s: any real memory system moves more than this
    assert "node-to-node read bandwidth" in out
    from composer_numa.offload import runtime

    for node in runtime.pool().nodes():
        assert any(x.startswith(f"cpu {node}") for x in out.splitlines())


def test_json_document(capsys):
    assert cli.main(ARGS + ["--format", "json", "--threads", "1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == 1 and doc["threads"] == 1 and doc["bytes_per_array"] == 8 << 20
    assert [k["kernel"] for k in doc["kernels"]] == list(bench.KERNELS)
    assert {k["bytes_per_element"] for k in doc["kernels"]} == {4, 8, 12, 28}
    assert all(k["threads"] == 1 and k["gbps_median"] > 0.1 for k in doc["kernels"])
    m = doc["matrix"]
    assert len(m["gbps_median"]) == len(m["cpu_nodes"])
    assert all(len(row) == len(m["mem_nodes"]) and all(v > 0.1 for v in row)
               for row in m["gbps_median"])
    from composer_numa.offload import runtime

    runtime.reset()


@pytest.mark.parametrize("extra,text", [
    (["--size", "1K"], "--size must be at least 4K"),
    (["--size", "lots"], "invalid size"),
    (["--passes", "0"], "argument --passes: expected a number of passes from 1 to 1000, got '0'"),
    (["--threads", "0"], "argument --threads: expected a number of workers from 1 to 4096, got '0'"),
    (["--passes", "1099511627776"], "expected a number of passes from 1 to 1000"),
    (["--threads", "1099511627776"], "expected a number of workers from 1 to 4096"),
    (["--size", "99999999999G"], "larger than 16 EiB"),
    (["--size", "9999G"], "more than this machine's"),
])
def test_bad_options_are_one_line_errors(extra, text, capsys):
    assert cli.main(["bench", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert text in err and "\n" not in err


def test_does_not_import_torch():
    code = ("import sys\nfrom composer_numa import cli\n"
            "rc = cli.main(['bench', '--size', '4M', '--passes', '1', '--no-matrix'])\n"
            "assert rc == 0, rc\nassert 'torch' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    assert "adamw" in out.stdout
