"""`composer-numa exec`: rank detection, binding of the exec'd command, errors, no torch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fakesys import build_tree

ROOT = Path(__file__).resolve().parents[2]
CPUS = sorted(os.sched_getaffinity(0))
LAUNCHER_VARS = ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                 "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
                 "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
                 "SLURM_STEP_TASKS_PER_NODE", "SLURM_NODEID", "OMP_NUM_THREADS",
                 "MKL_NUM_THREADS", "COMPOSER_NUMA_BINDING")

# What the exec'd command reports about itself.
PROBE = (
    "import json, os; from composer_numa.binding import linux;"
    "m, n = linux.get_mempolicy();"
    "print(json.dumps({'pid': os.getpid(), 'cpus': sorted(os.sched_getaffinity(0)),"
    " 'policy': linux.POLICY_NAMES[m], 'nodes': list(n),"
    " 'omp': os.environ.get('OMP_NUM_THREADS'),"
    " 'binding': json.loads(os.environ['COMPOSER_NUMA_BINDING'])}))"
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


def cn(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "composer_numa.cli", *args], capture_output=True,
                          text=True, env=env or clean_env(), timeout=120, **kw)


def probe(*opts: str, env: dict | None = None) -> dict:
    out = cn("exec", *opts, "--", sys.executable, "-c", PROBE, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_exec_binds_the_command_single_process():
    got = probe("--memory", "bind")
    assert got["cpus"] == CPUS
    assert (got["policy"], got["nodes"]) == ("bind", [0])
    b = got["binding"]
    assert b["bound_at"] == "exec" and b["local_rank"] == 0 and b["rank_source"] == "default"
    assert b["memory_policy"] == "bind" and b["applied"]["not_applied"] == []
    assert b["pid"] == got["pid"]  # exec keeps the process id
    assert got["omp"] == str(b["num_threads"])


needs_two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="needs two allowed CPUs")


@needs_two_cpus
@pytest.mark.parametrize("launcher_env, rank", [
    ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 1),                                 # torchrun
    ({"SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_NODEID": "1"}, 1),  # srun
    ({"SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "2"}, 0),
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 0),        # mpirun
    ({"MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}, 1),                               # hydra
])
def test_exec_picks_the_launchers_rank(launcher_env, rank):
    got = probe("--mode", "exclusive", env=clean_env(**launcher_env))
    assert got["binding"]["local_rank"] == rank
    # exclusive on one node: rank r gets the r-th core, exactly
    assert got["cpus"] == [CPUS[rank]]
    assert got["binding"]["cpus"] == [CPUS[rank]]
    assert (got["policy"], got["nodes"]) == ("preferred", [0])


@needs_two_cpus
def test_explicit_local_rank_wins_over_the_environment():
    got = probe("--mode", "exclusive", "--local-rank", "0", "--nproc", "2",
                env=clean_env(LOCAL_RANK="1", LOCAL_WORLD_SIZE="2"))
    assert got["cpus"] == [CPUS[0]] and got["binding"]["rank_source"] == "arguments"


def test_user_thread_count_is_kept_and_no_pinning_variables_are_exported():
    code = ("import os, json; print(json.dumps({k: os.environ.get(k) for k in "
            "('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'KMP_AFFINITY', 'GOMP_CPU_AFFINITY')}))")
    out = cn("exec", "--", sys.executable, "-c", code, env=clean_env(OMP_NUM_THREADS="5"))
    got = json.loads(out.stdout)
    assert got["OMP_NUM_THREADS"] == "5" and got["MKL_NUM_THREADS"] is not None
    assert got["KMP_AFFINITY"] is None and got["GOMP_CPU_AFFINITY"] is None
    out = cn("exec", "--no-thread-env", "--", sys.executable, "-c", code)
    assert json.loads(out.stdout)["OMP_NUM_THREADS"] is None


def test_exec_preserves_pid_and_signals_reach_the_command(tmp_path):
    ready = tmp_path / "ready"
    code = ("import os, signal, sys, time, pathlib;"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42));"
            f"pathlib.Path({str(ready)!r}).write_text(str(os.getpid()));"
            "time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-m", "composer_numa.cli", "exec", "--",
                          sys.executable, "-c", code], env=clean_env())
    try:
        deadline = time.monotonic() + 30
        while not (ready.exists() and ready.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert int(ready.read_text()) == p.pid
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 42
    finally:
        p.kill()
        p.wait()


def modules_at_exec(*args: str) -> set[str]:
    """sys.modules of `composer-numa exec` at the moment it would exec the command."""
    code = ("import json, os, sys\n"
            "def fake_exec(*a):\n"
            "    print(json.dumps(sorted(sys.modules))); sys.stdout.flush(); os._exit(0)\n"
            "os.execvp = fake_exec\n"
            "from composer_numa.cli import main\n"
            f"main({list(args)!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=clean_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout))


def test_exec_never_imports_torch_or_composer():
    modules = modules_at_exec("exec", "--mode", "exclusive", "--", "true")
    assert {"composer_numa.cli.exec", "composer_numa.binding.apply", "composer_numa.binding.linux"} <= modules
    heavy = {m for m in modules if m.split(".")[0] in ("torch", "composer", "numpy", "pynvml")}
    assert heavy == set()
    # only `exec` is registered: the other subcommands' modules stay unimported
    assert not modules & {"composer_numa.report", "composer_numa.cli.launch", "composer_numa.cli.check",
                          "composer_numa.cli.bench", "composer_numa.report.svg"}


def test_exec_under_a_fake_multi_node_tree_warns_and_still_runs(tmp_path):
    # rank 1 is planned on node 1 with CPUs 4-7, which this machine does not have:
    # the binding cannot be applied, the command runs anyway
    sys_root, proc_root = build_tree(tmp_path, {"nodes": [{"cpus": "0-3", "mem_gib": 8},
                                                          {"cpus": "4-7", "mem_gib": 8}],
                                                "sockets": 2})
    env = clean_env(LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")
    opts = ("--sysfs-root", sys_root, "--proc-root", proc_root)
    out = cn("exec", *opts, "--", sys.executable, "-c", PROBE, env=env)
    assert out.returncode == 0, out.stderr
    warn = [ln for ln in out.stderr.splitlines() if "bind-not-applied" in ln]
    assert len(warn) == 1 and warn[0].startswith("composer-numa: warning: [bind-not-applied]")
    assert "CPU affinity 4-7 not applied" in warn[0] and "nodes 1 not applied" in warn[0]
    got = json.loads(out.stdout)
    assert got["cpus"] == CPUS and got["policy"] == "default"
    assert len(got["binding"]["applied"]["not_applied"]) == 2
    strict = cn("exec", *opts, "--strict", "--", "true", env=env)
    assert strict.returncode == 2
    assert strict.stderr.startswith("composer-numa: error: local rank 1: CPU affinity 4-7")
    assert strict.stderr.count("\n") == 1


@pytest.mark.parametrize("args, env, message", [
    (["exec"], {}, "exec needs a command"),
    (["exec", "--"], {}, "exec needs a command"),
    (["exec", "--mode", "bogus", "--", "true"], {}, "invalid choice: 'bogus'"),
    (["exec", "--nproc", "0", "--", "true"], {}, "argument --nproc: expected a number of ranks from 1 to 65536"),
    (["exec", "--local-rank", "99999999999999999999", "--", "true"], {},
     "argument --local-rank: expected a local rank"),
    (["exec", "--local-rank", "2", "--nproc", "2", "--", "true"], {}, "is not below"),
    (["exec", "--memory-need", "lots", "--", "true"], {}, "invalid size 'lots'"),
    (["exec", "--sysfs-root", "/nonexistent/sys", "--", "true"], {}, "/nonexistent/sys"),
])
def test_bad_input_is_one_line(args, env, message):
    out = cn(*args, env=clean_env(**env))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert message in lines[-1]
    assert len([ln for ln in lines if ln.startswith("composer-numa")]) == 1


@pytest.mark.parametrize("env, message", [
    ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not a whole number from 0 to 65535"),
    ({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, "local rank 3 from LOCAL_RANK is not below the local world size 2"),
    ({"LOCAL_RANK": "1"}, "comes from LOCAL_RANK but the local world size is not set"),
    ({"SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "4(x"}, "is not a task list"),
])
def test_a_broken_launcher_environment_runs_the_command_unbound(env, message):
    code = "import os; print(os.environ.get('COMPOSER_NUMA_BINDING'))"
    out = cn("exec", "--", sys.executable, "-c", code, env=clean_env(**env))
    assert out.returncode == 0
    assert out.stdout.strip() == "None"
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("composer-numa: warning: [bind-not-applied] rank not known: ")
    assert message in line and line.endswith(": running unbound")
    strict = cn("exec", "--strict", "--", "true", env=clean_env(**env))
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    assert strict.stderr.startswith("composer-numa: error: rank not known: ")


def test_missing_command_exits_127():
    out = cn("exec", "--", "no-such-command-xyz")
    assert out.returncode == 127
    assert out.stderr.strip() == "composer-numa: error: command not found: no-such-command-xyz"


@pytest.mark.slow
@needs_two_cpus
def test_as_torchrun_no_python_entry(tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    report = tmp_path / "rank"
    code = PROBE.replace("print(json.dumps(", f"open('{report}' + os.environ['LOCAL_RANK'], 'w')"
                         ".write(json.dumps(")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--no-python",
         sys.executable, "-m", "composer_numa.cli", "exec", "--mode", "exclusive", "--",
         sys.executable, "-c", code],
        capture_output=True, text=True, env=clean_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = [json.loads(Path(f"{report}{r}").read_text()) for r in (0, 1)]
    assert [g["cpus"] for g in got] == [[CPUS[0]], [CPUS[1]]]
    assert [g["binding"]["rank_source"] for g in got] == ["LOCAL_RANK", "LOCAL_RANK"]
    # torchrun exports OMP_NUM_THREADS=1 itself; exec keeps what it finds
    assert {g["omp"] for g in got} == {"1"}
