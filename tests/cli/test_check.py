"""`composer-numa check`: the binding of this process or another, against COMPOSER_NUMA_BINDING."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.cli.test_exec import CPUS, clean_env, cn

needs_numa = pytest.mark.skipif(
    not os.path.exists("/proc/self/numa_maps"),
    reason="kernel without NUMA support (no numa_maps)")

CHECK = [sys.executable, "-m", "composer_numa.cli", "check"]


@needs_numa
def test_check_after_exec_matches():
    out = cn("exec", "--memory", "bind", "--", *CHECK, "--min-local-fraction", "0.9")
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "bound at exec" in text and "memory policy: bind:0" in text
    assert "ok: matches the binding" in text and "MISMATCH" not in text
    assert "local fraction (process memory on nodes 0): 100.0%" in text


@needs_numa
def test_check_json_after_exec():
    out = cn("exec", "--memory", "interleave", "--", *CHECK, "--format", "json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["ok"] is True and doc["differences"] == []
    assert doc["binding"]["bound_at"] == "exec" and doc["binding"]["memory_policy"] == "interleave"
    assert doc["state"]["memory_policy"] == "interleave"
    assert doc["state"]["memory_nodes"] == [0]
    assert doc["local_fraction"] == 1.0
    assert int(doc["state"]["pages"]["process_bytes_by_node"]["0"]) > 1 << 20
    assert all(v == CPUS for v in doc["state"]["affinity"].values())


def test_check_without_binding_has_nothing_to_compare():
    out = subprocess.run(CHECK, capture_output=True, text=True, env=clean_env(), timeout=60)
    assert out.returncode == 0
    assert "nothing to compare" in out.stdout


@needs_numa
def test_check_reports_each_mismatch():
    claimed = {"local_rank": 0, "gpu": None, "gpu_pci_bus_id": None, "numa_nodes": [0],
               "cpus": [CPUS[0]], "memory_policy": "interleave", "memory_nodes": [0],
               "num_threads": 1, "bound_at": "exec"}
    env = clean_env(COMPOSER_NUMA_BINDING=json.dumps(claimed))
    out = subprocess.run(CHECK, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1
    mismatches = [ln.strip() for ln in out.stdout.splitlines() if "MISMATCH" in ln]
    assert "MISMATCH: memory policy is default, planned interleave:0" in mismatches
    if len(CPUS) > 1:
        assert any(f"planned {CPUS[0]}" in m for m in mismatches)
    out = subprocess.run([*CHECK, "--format", "json"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 1
    assert "memory_policy" in [d["what"] for d in json.loads(out.stdout)["differences"]]


@needs_numa
@pytest.mark.skipif(len(CPUS) < 2, reason="needs two allowed CPUs")
def test_check_another_process(tmp_path):
    ready = tmp_path / "ready"
    code = (f"import pathlib, time, threading; pathlib.Path({str(ready)!r}).write_text('x');"
            "t = threading.Thread(target=time.sleep, args=(60,)); t.start(); time.sleep(60)")
    bound = subprocess.Popen(
        [sys.executable, "-m", "composer_numa.cli", "exec", "--mode", "exclusive",
         "--memory", "bind", "--", sys.executable, "-c", code],
        env=clean_env(LOCAL_RANK="1", LOCAL_WORLD_SIZE="2"))
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        out = subprocess.run([*CHECK, "--pid", str(bound.pid), "--format", "json"],
                             capture_output=True, text=True, env=clean_env(), timeout=60)
        assert out.returncode == 0, out.stdout
        doc = json.loads(out.stdout)
        assert doc["pid"] == bound.pid and doc["binding"]["local_rank"] == 1
        assert len(doc["state"]["affinity"]) == 2  # both threads, each on the rank's one CPU
        assert set(map(tuple, doc["state"]["affinity"].values())) == {(CPUS[1],)}
        assert doc["state"]["memory_policy"] == "bind"
        assert {v["memory_policy"] for v in doc["state"]["thread_policies"].values()} == {"bind"}
    finally:
        bound.kill()
        bound.wait()


@pytest.mark.parametrize("args, message", [
    (["--pid", "999999999"], "argument --pid: expected a process id from 1 to 4194304"),
    (["--pid", "4194000"], "no process with pid 4194000"),
    (["--pid", "0"], "argument --pid: expected a process id from 1 to 4194304, got '0'"),
    (["--min-local-fraction", "1.5"], "--min-local-fraction must be between 0 and 1"),
    (["--format", "xml"], "invalid choice: 'xml'"),
])
def test_check_bad_input_is_one_line(args, message):
    out = subprocess.run([*CHECK, *args], capture_output=True, text=True, env=clean_env(),
                         timeout=60)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert message in out.stderr.strip().splitlines()[-1]


def test_check_rejects_a_malformed_binding():
    env = clean_env(COMPOSER_NUMA_BINDING="{not json")
    out = subprocess.run(CHECK, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("composer-numa: error: COMPOSER_NUMA_BINDING is not a binding")



def test_a_zombie_is_a_one_line_error():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait until it has exited but is not reaped
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.02)
        out = cn("check", "--pid", str(pid))
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert out.stderr.strip() == (f"composer-numa: error: process {pid} has exited (a zombie not yet "
                                      "reaped): it has no binding to check")
    finally:
        os.waitpid(pid, 0)


def test_a_binding_made_for_another_process_is_not_compared(tmp_path):
    """As in the callback: an inherited document (another PID) is not this process's binding."""
    doc = {"local_rank": 0, "gpu": None, "gpu_pci_bus_id": None, "numa_nodes": [0], "cpus": [CPUS[0]],
           "memory_policy": "bind", "memory_nodes": [0], "num_threads": 1, "pid": 1, "bound_at": "exec"}
    out = cn("check", env=clean_env(COMPOSER_NUMA_BINDING=json.dumps(doc)))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "none for this process (its COMPOSER_NUMA_BINDING was made for another" in out.stdout
    assert "MISMATCH" not in out.stdout
    got = json.loads(cn("check", "--format", "json", env=clean_env(COMPOSER_NUMA_BINDING=json.dumps(doc))).stdout)
    assert got["binding"] is None and got["ok"] is True
