"""`composer-numa launch`: Composer's launcher with each rank bound by `composer-numa exec`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from composer_numa import cli
from composer_numa.cli import launch
from tests.cli.test_exec import CPUS, ROOT, clean_env

needs_two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="needs two allowed CPUs")
LAUNCH = [sys.executable, "-m", "composer_numa.cli", "launch"]


def composer_parser():
    pytest.importorskip("composer.cli.launcher")
    return launch._parser()


# -- the command each rank runs (no processes) ---------------------------------------


def test_rank_command_for_script_module_and_command_modes():
    parser = composer_parser()
    ns = parser.parse_args(["-n", "2", "--numa-mode", "exclusive", "--numa-memory", "bind",
                            "--numa-memory-need", "2G", "--numa-strict", "train.py", "--lr", "1"])
    py = sys.executable
    numa = ["--bound-at", "launch", "--mode", "exclusive", "--memory", "bind", "--memory-target", "local",
            "--memory-need", "2G", "--strict"]
    assert launch.rank_command(ns) == [py, "-m", "composer_numa.cli", "exec", *numa, "--",
                                       py, "train.py", "--lr", "1"]
    ns = parser.parse_args(["-m", "pkg.train", "-x"])
    assert launch.rank_command(ns)[-5:] == ["--", py, "-m", "pkg.train", "-x"]
    ns = parser.parse_args(["-c", "--numa-no-thread-env", "./run.sh", "a"])
    cmd = launch.rank_command(ns)
    assert cmd[-3:] == ["--", "./run.sh", "a"] and "--no-thread-env" in cmd


def test_composer_options_keep_their_meaning():
    parser = composer_parser()
    given = ["--nproc", "2", "--world_size", "4", "--base_rank", "2",
             "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port",
             "29500", "--stdout", "out{rank}.txt", "--stderr", "err{rank}.txt",
             "-v", "--numa-mode", "socket", "--numa-memory-need=2G", "-m", "pkg.train", "--epochs", "3"]
    ns = parser.parse_args(given)
    argv = launch.launcher_argv(given, ns)
    # Composer's own parser reads back the same options, in command mode
    from composer.cli.launcher import _get_parser

    back = _get_parser().parse_args(argv)
    for key in ("nproc", "world_size", "base_rank", "node_rank", "master_addr", "master_port",
                "stdout", "stderr", "verbose"):
        assert getattr(back, key) == getattr(ns, key), key
    assert back.command_mode and not back.module_mode
    assert back.training_script == sys.executable
    assert back.training_script_args == launch.rank_command(ns)[1:]
    assert back.training_script_args[-4:] == ["-m", "pkg.train", "--epochs", "3"]


# -- bad input: one line, exit 2, before any rank starts -----------------------------------


@pytest.mark.parametrize("args, message", [
    (["--numa-mode", "bogus", "train.py"], "invalid choice: 'bogus'"),
    ([], "the following arguments are required: training_script"),
    (["-m", "-c", "x"], "-m/--module_mode and -c/--command_mode exclude each other"),
    (["-n", "0", "x.py"], "launch: --nproc must be at least 1, got 0"),
    (["--numa-memory-need", "lots", "x.py"], "invalid size 'lots'"),
    (["--master_port", "abc", "x.py"], "argument --master_port: invalid int value: 'abc'"),
])
def test_bad_options_are_one_line_errors(args, message, capsys):
    composer_parser()
    rc = cli.main(["launch", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("composer-numa: error: ") and message in line


def test_composer_s_own_option_errors_are_one_line_too():
    composer_parser()
    out = subprocess.run([*LAUNCH, "-n", "2", "--world_size", "1", "x.py"], capture_output=True, text=True,
                         env=clean_env(), timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "composer-numa: error: launch: world_size(1) cannot be less than nproc(2)")


def test_only_the_parser_comes_from_composer_s_private_api():
    """Fails loudly when Composer changes what ``launch`` reads of its launcher."""
    from composer.cli import launcher

    assert callable(launcher._get_parser) and callable(launcher.main)
    parser = launcher._get_parser()
    ns = parser.parse_args(["-n", "2", "-m", "pkg.train", "--epochs", "3"])
    assert (ns.nproc, ns.module_mode, ns.command_mode, ns.training_script, ns.training_script_args) == (
        2, True, False, "pkg.train", ["--epochs", "3"])
    from composer_numa.composer.launcher import script_position

    assert script_position(["-n", "2", "-m", "pkg.train", "--epochs", "3"], ns) == 3


def test_help_lists_composer_and_numa_options(capsys):
    composer_parser()
    with pytest.raises(SystemExit) as info:
        cli.main(["launch", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--nproc", "--master_port", "--stdout", "--numa-mode", "--numa-memory-need",
                "--numa-strict", "composer-numa launch"):
        assert opt in out


# -- real launches ------------------------------------------------------------------------


def run_launch(*args: str, timeout: int = 300, env: dict | None = None):
    return subprocess.run([*LAUNCH, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env or clean_env(), timeout=timeout)


@pytest.mark.slow
@needs_two_cpus
def test_two_ranks_train_each_on_its_own_cpu(tmp_path):
    composer_parser()
    out = run_launch("-n", "2", "--numa-mode", "exclusive", "examples/train.py", "--steps", "3",
                     "--no-callback", "--report-dir", str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["local_rank"] for r in reports] == [0, 1]
    assert [r["affinity"] for r in reports] == [[CPUS[0]], [CPUS[1]]]
    for r in reports:
        assert r["memory_policy"] == "preferred" and r["memory_nodes"] == [0]
        assert r["bound_at"] == "launch"
        assert r["batches"] == 3 and r["world_size"] == 2
        assert r["omp_num_threads"] == "1"


def _crash_module(tmp_path: Path) -> dict:
    (tmp_path / "crashmod.py").write_text(
        "import json, os, sys, time\n"
        "rank = int(os.environ['LOCAL_RANK'])\n"
        "from composer_numa.binding import linux\n"
        "m, n = linux.get_mempolicy()\n"
        f"open(os.path.join({str(tmp_path)!r}, f'r{{rank}}.json'), 'w').write(json.dumps(\n"
        "    {'cpus': sorted(os.sched_getaffinity(0)), 'policy': linux.POLICY_NAMES[m],\n"
        "     'binding': os.environ.get('COMPOSER_NUMA_BINDING')}))\n"
        "if rank == 1:\n"
        "    time.sleep(0.5)\n"
        "    sys.exit(3)\n")
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    return env


@pytest.mark.slow
@needs_two_cpus
def test_a_crashing_rank_exits_like_plain_composer_in_module_mode(tmp_path):
    composer_parser()
    env = _crash_module(tmp_path)
    ours = run_launch("-n", "2", "--numa-mode", "exclusive", "--numa-memory", "bind", "-m",
                      "crashmod", env=env)
    got = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1)]
    assert [g["cpus"] for g in got] == [[CPUS[0]], [CPUS[1]]]
    assert {g["policy"] for g in got} == {"bind"}
    assert all(json.loads(g["binding"])["bound_at"] == "launch" for g in got)
    plain = subprocess.run([sys.executable, "-m", "composer.cli.launcher", "-n", "2", "-m",
                            "crashmod"], capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode == 3
    assert ours.returncode == plain.returncode, ours.stdout[-2000:] + ours.stderr[-2000:]
    assert "Global rank 1" in ours.stdout and "exited with code 3" in ours.stdout


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
@needs_two_cpus
def test_sigterm_stops_every_rank(tmp_path):
    composer_parser()
    script = tmp_path / "sleeper.py"
    script.write_text(
        "import os, pathlib, time\n"
        f"pathlib.Path({str(tmp_path)!r}, 'pid' + os.environ['LOCAL_RANK'])"
        ".write_text(str(os.getpid()))\n"
        "time.sleep(300)\n")
    p = subprocess.Popen([*LAUNCH, "-n", "2", "--numa-mode", "exclusive", str(script)],
                         env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 240
        files = [tmp_path / "pid0", tmp_path / "pid1"]
        while not all(f.exists() and f.read_text() for f in files):
            assert p.poll() is None and time.monotonic() < deadline, "ranks did not start"
            time.sleep(0.1)
        pids = [int(f.read_text()) for f in files]
        assert all(_alive(pid) for pid in pids)
        p.send_signal(signal.SIGTERM)
        output = p.communicate(timeout=60)[0]
        # as plain composer: its SIGTERM handler exits the monitor loop, the ranks get
        # SIGTERM, and the launcher returns rank 0's status (-15, exit code 241)
        assert p.returncode == 256 - signal.SIGTERM, output[-3000:]
        assert "Waiting up to 30 seconds for all training processes to terminate" in output
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids), "orphaned ranks"
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
