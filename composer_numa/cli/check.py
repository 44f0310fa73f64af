"""``composer-numa check``: is this process (or ``--pid``) bound as planned?

Prints every thread's CPU affinity, the memory policy and where resident
memory sits per node, and compares them with the binding that
``composer-numa exec``/``launch`` exported in ``COMPOSER_NUMA_BINDING`` (read
from the inspected process's environment). Exit status: 0 when it matches (or
there is nothing to compare with), 1 when it differs, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from composer_numa.binding.verify import binding_from_env, made_for, read_back, verify
from composer_numa.errors import ComposerNumaError
from composer_numa.units import format_cpulist, format_size

__all__ = ["register", "run"]

#: Largest process id Linux hands out (PID_MAX_LIMIT).
_PID_MAX = 1 << 22


def register(subparsers) -> None:
    """Add the ``check`` subcommand to the ``composer-numa`` parser."""
    p = subparsers.add_parser(
        "check",
        help="show a process's binding and page locality; exit 1 if it differs from the plan",
        description="Show the CPU affinity of every thread, the memory policy and resident memory "
        "per NUMA node of this process (or --pid), and compare them with the binding in its "
        "COMPOSER_NUMA_BINDING. Exit 0 when they match, 1 when they differ.",
    )
    p.add_argument("--pid", type=_pid, default=None, help="inspect this process instead")
    p.add_argument("--format", choices=["table", "json"], default="table",
                   help="output format (default: table)")
    p.add_argument("--min-local-fraction", type=float, default=None, metavar="F",
                   help="also require this share (0-1) of resident process memory on the "
                   "planned memory nodes")
    p.set_defaults(func=run)


def _pid(text: str) -> int:
    t = text.strip()
    if not (t.isascii() and t.isdigit()) or len(t) > 8 or not 0 < int(t) <= _PID_MAX:
        raise argparse.ArgumentTypeError(f"expected a process id from 1 to {_PID_MAX}, got {text[:40]!r}")
    return int(t)


def _state(pid: int) -> str | None:
    """The process state letter from ``/proc/<pid>/stat`` (``R``, ``S``, ``Z`` ...)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _environ_of(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read(1 << 24)
    except (FileNotFoundError, ProcessLookupError):
        raise ComposerNumaError(f"no process with pid {pid}") from None
    except PermissionError:
        raise ComposerNumaError(f"not permitted to read the environment of process {pid}") from None
    except OSError as e:
        raise ComposerNumaError(f"cannot read the environment of process {pid}: {e.strerror or e}") from None
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _fmt(ids) -> str:
    return format_cpulist(ids, "none")


def run(args: argparse.Namespace) -> int:
    if args.min_local_fraction is not None and not 0.0 <= args.min_local_fraction <= 1.0:
        raise ComposerNumaError(
            f"--min-local-fraction must be between 0 and 1, got {args.min_local_fraction}")
    pid = args.pid if args.pid is not None else os.getpid()
    if not os.path.isdir(f"/proc/{pid}"):
        raise ComposerNumaError(f"no process with pid {pid}")
    if _state(pid) == "Z":
        raise ComposerNumaError(f"process {pid} has exited (a zombie not yet reaped): it has no binding to check")
    environ = dict(os.environ) if pid == os.getpid() else _environ_of(pid)
    found = binding_from_env(environ)
    foreign = found is not None and not made_for(found[1], pid)
    if foreign:
        found = None  # inherited from an ancestor that was bound: not this process's binding
    state = read_back(pid, pages=True, thread_policies=True)
    diffs: list = []
    rank_plan = doc = None
    if found is not None:
        rank_plan, doc = found
        diffs = verify(rank_plan, state, all_threads=True, min_local_fraction=args.min_local_fraction)
    maps = state.pages
    nodes = ()
    if rank_plan is not None:
        nodes = tuple(rank_plan.memory_nodes) or tuple(rank_plan.numa_nodes)
    local = maps.local_fraction(nodes) if (maps is not None and nodes) else None

    if args.format == "json":
        out = {
            "schema": 1,
            "pid": pid,
            "binding": doc,
            "state": state.to_json(),
            "local_fraction": local,
            "differences": [d.to_json() for d in diffs],
            "ok": not diffs,
        }
        print(json.dumps(out, indent=2))
        return 1 if diffs else 0

    w = sys.stdout.write
    w(f"process {pid}\n")
    if rank_plan is None and foreign:
        w("  binding: none for this process (its COMPOSER_NUMA_BINDING was made for another, an "
          "ancestor bound by composer-numa); nothing to compare\n")
    elif rank_plan is None:
        w("  binding: none exported (COMPOSER_NUMA_BINDING not set); nothing to compare\n")
    else:
        w(f"  binding: local rank {rank_plan.local_rank}, bound at {doc.get('bound_at', '?')}: "
          f"CPUs {_fmt(rank_plan.cpus)}, memory {rank_plan.memory_policy.value}"
          f"{':' + _fmt(rank_plan.memory_nodes) if rank_plan.memory_nodes else ''}, "
          f"{rank_plan.num_threads} thread(s)\n")
        for line in (doc.get("applied") or {}).get("not_applied") or []:
            w(f"  not applied at bind time: {line}\n")
    groups: dict[tuple[int, ...], list[int]] = {}
    for tid, cpus in state.affinity.items():
        groups.setdefault(cpus, []).append(tid)
    for cpus, tids in sorted(groups.items()):
        w(f"  threads: {len(tids):4d} on CPUs {_fmt(cpus)}\n")
    pol = state.memory_policy or "unknown"
    w(f"  memory policy: {pol}{':' + _fmt(state.memory_nodes) if state.memory_nodes else ''}\n")
    if maps is not None:
        for node in sorted(maps.total):
            w(f"  node {node}: {format_size(maps.process.get(node, 0)):>10} process memory, "
              f"{format_size(maps.file.get(node, 0)):>10} file cache\n")
        if local is not None:
            w(f"  local fraction (process memory on nodes {_fmt(nodes)}): {local:.1%}\n")
    for err in state.errors:
        w(f"  could not read: {err}\n")
    if diffs:
        for d in diffs:
            w(f"  MISMATCH: {d}\n")
        return 1
    if rank_plan is not None:
        w("  ok: matches the binding\n")
    return 0
