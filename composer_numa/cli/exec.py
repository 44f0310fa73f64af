"""``composer-numa exec``: bind this process, then become the command.

The trampoline finds its local rank from the launcher's variables
(:mod:`composer_numa.machine.rankenv`), plans the host, applies the rank's
binding to itself (:func:`composer_numa.binding.session.bind_rank`), exports it
as JSON in ``COMPOSER_NUMA_BINDING`` and ``execvp``\\ s the command: the process
id stays the same, signals from the launcher reach the command directly, and
the CPU affinity and memory policy carry over to it and to every thread it
starts. It never imports torch or composer.

Used as torchrun's ``--no-python`` entry, under ``srun``/``mpirun``, as a
plain prefix, and by ``composer-numa launch`` for each rank::

    torchrun --nproc-per-node 8 --no-python composer-numa exec -- python train.py
    srun --ntasks-per-node 8 composer-numa exec --mode exclusive -- python train.py
"""

from __future__ import annotations

import argparse
import os
import sys

from composer_numa.binding.session import bind_rank
from composer_numa.cli.options import add_plan_options, count, plan_options, roots
from composer_numa.errors import ComposerNumaError
from composer_numa.machine.rankenv import MAX_LOCAL_RANKS

__all__ = ["register", "run"]


def register(subparsers) -> None:
    """Add the ``exec`` subcommand to the ``composer-numa`` parser."""
    p = subparsers.add_parser(
        "exec",
        help="bind this rank to its NUMA node, then exec the command (PID preserved)",
        description="Find the local rank (--local-rank, LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_RANK, "
        "MPI_LOCALRANKID or SLURM_LOCALID), plan the host, apply the rank's CPU affinity and "
        "memory policy to this process, export the binding in COMPOSER_NUMA_BINDING and "
        "exec the command. A binding that cannot be applied is a warning unless --strict.",
        usage="composer-numa exec [options] -- COMMAND [ARGS...]",
    )
    p.add_argument("--local-rank", type=_rank, default=None, metavar="R",
                   help="this process's local rank (default: from the launcher's variables)")
    p.add_argument("--nproc", type=lambda t: count(t, "a number of ranks"), default=None, metavar="N",
                   help="processes on this host (default: from the launcher's variables, else one per GPU)")
    add_plan_options(p)
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 2) instead of warning when the binding cannot be applied")
    p.add_argument("--no-thread-env", dest="thread_env", action="store_false",
                   help="do not set OMP_NUM_THREADS / MKL_NUM_THREADS to the plan's thread count")
    p.add_argument("--bound-at", default="exec", choices=["exec", "launch"], help=argparse.SUPPRESS)
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    p.set_defaults(func=run)


def _rank(text: str) -> int:
    t = text.strip()
    if not (t.isascii() and t.isdigit()) or len(t) > 6 or int(t) >= MAX_LOCAL_RANKS:
        raise argparse.ArgumentTypeError(f"expected a local rank from 0 to {MAX_LOCAL_RANKS - 1}, got {text[:40]!r}")
    return int(t)


def run(args: argparse.Namespace) -> int:
    """Bind and exec. Returns only on failure (127 / 126 when the command cannot run)."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ComposerNumaError("exec needs a command, e.g. composer-numa exec -- python train.py")
    sysfs_root, proc_root = roots(args)
    # Under launch the ranks' warnings were printed once by the launcher.
    bind_rank(plan_options(args), local_rank=args.local_rank, nproc=args.nproc, strict=args.strict,
              set_env=args.thread_env, bound_at=args.bound_at, report_warnings=args.bound_at == "exec",
              stderr=True, sysfs_root=sysfs_root, proc_root=proc_root)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(command[0], command)
    except FileNotFoundError:
        print(f"composer-numa: error: command not found: {command[0]}", file=sys.stderr)
        return 127
    except PermissionError:
        print(f"composer-numa: error: command not executable: {command[0]}", file=sys.stderr)
        return 126
    except OSError as e:
        print(f"composer-numa: error: cannot execute {command[0]}: {e.strerror or e}", file=sys.stderr)
        return 126
    raise AssertionError("unreachable: execvp returned")  # pragma: no cover
