"""``composer-numa exec``: bind this process, then become the command.

The trampoline finds its local rank from the launcher's variables
(:mod:`composer_numa.rankenv`), plans the host, applies the rank's binding to
itself, exports it as JSON in ``COMPOSER_NUMA_BINDING`` and ``execvp``\\ s the
command: the process id stays the same, signals from the launcher reach the
command directly, and the CPU affinity and memory policy carry over to it and
to every thread it starts. It never imports torch or composer.

Used as torchrun's ``--no-python`` entry, under ``srun``/``mpirun``, as a
plain prefix, and by ``composer-numa launch`` for each rank::

    torchrun --nproc-per-node 8 --no-python composer-numa exec -- python train.py
    srun --ntasks-per-node 8 composer-numa exec --mode exclusive -- python train.py
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["register", "run", "BINDING_ENV"]

#: The variable the applied binding is exported in (a JSON document).
BINDING_ENV = "COMPOSER_NUMA_BINDING"


def register(subparsers) -> None:
    """Add the ``exec`` subcommand to the ``composer-numa`` parser."""
    from composer_numa.cli import add_plan_options

    p = subparsers.add_parser(
        "exec",
        help="bind this rank to its NUMA node, then exec the command (PID preserved)",
        description="Find the local rank (--local-rank, LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_RANK, "
        "MPI_LOCALRANKID or SLURM_LOCALID), plan the host, apply the rank's CPU affinity and "
        "memory policy to this process, export the binding in COMPOSER_NUMA_BINDING and "
        "exec the command. A binding that cannot be applied is a warning unless --strict.",
        usage="composer-numa exec [options] -- COMMAND [ARGS...]",
    )
    p.add_argument("--local-rank", type=int, default=None, metavar="R",
                   help="this process's local rank (default: from the launcher's variables)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="processes on this host (default: from the launcher's variables, or 1)")
    add_plan_options(p)
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 2) instead of warning when the binding cannot be applied")
    p.add_argument("--no-thread-env", dest="thread_env", action="store_false",
                   help="do not set OMP_NUM_THREADS / MKL_NUM_THREADS to the plan's thread count")
    p.add_argument("--bound-at", default="exec", choices=["exec", "launch"],
                   help=argparse.SUPPRESS)
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Bind and exec. Returns only on failure (127 / 126 when the command cannot run)."""
    from composer_numa.errors import ComposerNumaError

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ComposerNumaError("exec needs a command, e.g. composer-numa exec -- python train.py")
    doc = _bind(args)
    if doc is not None:
        import json

        os.environ[BINDING_ENV] = json.dumps(doc, separators=(",", ":"))
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
        print(f"composer-numa: error: cannot execute {command[0]}: {e.strerror or e}",
              file=sys.stderr)
        return 126
    raise AssertionError("unreachable: execvp returned")  # pragma: no cover


def _bind(args: argparse.Namespace) -> dict | None:
    """Plan and apply; the binding document, or None when the rank runs unbound.

    What the user typed wrong is an error (exit 2). A launcher environment or a
    machine that cannot be read is a binding problem: warned about, and the
    command runs unbound, unless ``--strict``.
    """
    from composer_numa import bind, rankenv
    from composer_numa.cli import plan_from_args
    from composer_numa.cpulist import parse_size
    from composer_numa.diagnostics import BIND_NOT_APPLIED, Diagnostic, emit
    from composer_numa.errors import BindError, ComposerNumaError, PlanError, TopologyError

    explicit_rank = args.local_rank is not None or args.nproc is not None
    if args.memory_need is not None:
        parse_size(args.memory_need)
    try:
        rank = rankenv.resolve(args.local_rank, args.nproc)
    except ComposerNumaError as e:
        if explicit_rank:
            raise
        return _unbound(f"rank not known: {e}", args.strict)
    try:
        topology, plan = plan_from_args(args, rank.local_world_size)
    except PlanError:
        raise
    except TopologyError as e:
        if args.sysfs_root is not None or args.proc_root is not None:
            raise
        return _unbound(f"local rank {rank.local_rank}: machine not readable: {e}", args.strict)
    except (ComposerNumaError, OSError, ValueError, LookupError) as e:
        return _unbound(f"local rank {rank.local_rank}: could not plan: {e}", args.strict)
    # Machine-wide warnings once per host: from local rank 0 (launch prints them itself).
    if rank.local_rank == 0 and args.bound_at == "exec":
        for diag in (*topology.diagnostics, *plan.warnings):
            emit(diag, stderr=True)
    try:
        applied = bind.apply(plan.ranks[rank.local_rank], strict=args.strict,
                             set_env=args.thread_env, stderr=True)
    except BindError:
        raise
    except Exception as e:  # a bug must not stop the job: say so and run unbound
        emit(Diagnostic(BIND_NOT_APPLIED, f"local rank {rank.local_rank}: binding failed: "
                        f"{type(e).__name__}: {e} (running unbound)"), stderr=True)
        if args.strict:
            raise BindError(f"local rank {rank.local_rank}: binding failed: {e}") from None
        return None
    doc = applied.binding_json(args.bound_at)
    doc["rank_source"] = rank.source
    return doc


def _unbound(reason: str, strict: bool) -> None:
    from composer_numa.diagnostics import BIND_NOT_APPLIED, Diagnostic, emit
    from composer_numa.errors import BindError

    if strict:
        raise BindError(reason)
    emit(Diagnostic(BIND_NOT_APPLIED, f"{reason} (running the command unbound)"), stderr=True)
    return None
