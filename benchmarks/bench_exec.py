"""What ``composer-numa exec`` adds to every rank's start: its wall time against ``python -c pass``.

``exec`` is on every rank's start path (``torchrun ... --no-python composer-numa exec -- python
train.py``), so it must stay light: it reads the machine, plans, binds and execs the command, and
never imports torch. The two commands run interleaved (so machine load affects both alike), and
the medians, the ratio and the difference are printed. Target: at most 4x ``python -c pass``.

Usage:
    python benchmarks/bench_exec.py [--runs 40]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time


def _time(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=40, help="runs of each command (default 40)")
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items()
           if k not in ("COMPOSER_NUMA_BINDING", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS")}
    script = shutil.which("composer-numa")
    entry = [script] if script else [sys.executable, "-m", "composer_numa.cli"]
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "composer-numa exec -- true": [*entry, "exec", "--", "true"],
    }
    for cmd in commands.values():  # warm the page cache and .pyc files
        _time(cmd, env)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, cmd in commands.items():
            times[name].append(_time(cmd, env))
    base = statistics.median(times["python -c pass"])
    ours = statistics.median(times["composer-numa exec -- true"])
    cpu = _cpu()
    print(f"exec start-up cost, {args.runs} interleaved runs each, {cpu}")
    print(f"{'command':<30} {'median ms':>10} {'best ms':>9}")
    for name, t in times.items():
        print(f"{name:<30} {statistics.median(t) * 1e3:>10.1f} {min(t) * 1e3:>9.1f}")
    print(f"ratio exec / python -c pass: {ours / base:.2f}x (target <= 4x); exec adds {(ours - base) * 1e3:.1f} ms")
    return 0


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
