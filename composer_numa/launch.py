"""``composer-numa launch``: Composer's own launcher, each rank bound at birth.

Takes every option of the ``composer`` command unchanged (``-n/--nproc``,
``--world_size``, ``--base_rank``, ``--node_rank``, ``--master_addr``,
``--master_port``, ``--stdout``, ``--stderr``, ``-v``, ``-m``, ``-c``) plus
``--numa-*`` options, and runs Composer's launcher in command mode so that
each rank starts as ``composer-numa exec <numa options> -- python SCRIPT ARGS``
(``python -m MODULE ARGS`` with ``-m``; the bare command with ``-c``).
Composer sets ``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` for each rank, spawns,
monitors and cleans up exactly as it always does; exit codes are Composer's.

SIGTERM and SIGINT are Composer's business too: importing Composer installs
handlers that turn them into an exit of the launcher, which then terminates
its ranks (SIGTERM, SIGKILL after 30 s) before returning.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["register", "run", "rank_command"]

_NUMA_DESTS = ("numa_mode", "numa_memory", "numa_memory_need", "numa_sysfs_root",
               "numa_proc_root", "numa_strict", "numa_thread_env")


def register(subparsers) -> None:
    """Add the ``launch`` subcommand; its options are parsed by :func:`run` (Composer's parser)."""
    # "+" as the only prefix keeps argparse from reading Composer's options here;
    # run() parses them with Composer's own parser, which needs the import.
    p = subparsers.add_parser(
        "launch",
        add_help=False,
        prefix_chars="+",
        help="run Composer's launcher with every rank bound to its NUMA node (see launch --help)",
        description="composer [Composer launcher options] [--numa-* options] SCRIPT [ARGS...]",
    )
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)


def _parser():
    from composer_numa.cli import add_plan_options
    from composer_numa.errors import ComposerNumaError

    try:
        from composer.cli import launcher
    except ImportError as e:
        raise ComposerNumaError(
            f"composer-numa launch needs MosaicML Composer (pip install mosaicml): {e}") from None
    parser = launcher._get_parser()
    parser.prog = "composer-numa launch"
    parser.description = (
        "Composer's launcher with each rank bound to its NUMA node at birth: every rank runs "
        "as `composer-numa exec <numa options> -- python SCRIPT ARGS`. All Composer options "
        "keep their meaning.")

    def error(message: str) -> None:
        raise ComposerNumaError(f"launch: {message}")

    parser.error = error  # type: ignore[method-assign]
    group = parser.add_argument_group("NUMA binding (composer-numa)")
    add_plan_options(group, prefix="numa-")  # type: ignore[arg-type]
    group.add_argument("--numa-strict", action="store_true",
                       help="a rank whose binding cannot be applied fails instead of warning")
    group.add_argument("--numa-no-thread-env", dest="numa_thread_env", action="store_false",
                       help="do not set OMP_NUM_THREADS / MKL_NUM_THREADS per rank")
    return launcher, parser


def rank_command(ns: argparse.Namespace, python: str | None = None) -> list[str]:
    """The command (after Composer's ``-c``) each rank runs: the trampoline, then the script."""
    python = python or sys.executable
    numa = ["--bound-at", "launch", "--mode", ns.numa_mode, "--memory", ns.numa_memory]
    if ns.numa_memory_need is not None:
        numa += ["--memory-need", ns.numa_memory_need]
    if ns.numa_sysfs_root is not None:
        numa += ["--sysfs-root", ns.numa_sysfs_root]
    if ns.numa_proc_root is not None:
        numa += ["--proc-root", ns.numa_proc_root]
    if ns.numa_strict:
        numa.append("--strict")
    if not ns.numa_thread_env:
        numa.append("--no-thread-env")
    if ns.command_mode:
        target = [ns.training_script]
    elif ns.module_mode:
        target = [python, "-m", ns.training_script]
    else:
        target = [python, ns.training_script]
    return [python, "-m", "composer_numa.cli", "exec", *numa, "--", *target,
            *ns.training_script_args]


def _composer_argv(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> list[str]:
    """Composer's own options as given (normalised to long names), then ``-c`` and the rank command."""
    skip = {"help", "version", "training_script", "training_script_args", "module_mode",
            "command_mode", *_NUMA_DESTS}
    out: list[str] = []
    for action in parser._actions:
        if action.dest in skip or not action.option_strings:
            continue
        value = getattr(ns, action.dest, None)
        if value is None or value is False or value == action.default:
            continue
        flag = action.option_strings[-1]
        if action.nargs == 0:
            out.append(flag)
        elif isinstance(value, list):
            for v in value:
                out += [flag, str(v)]
        else:
            out += [flag, str(value)]
    cmd = rank_command(ns)
    return [*out, "-c", cmd[0], *cmd[1:]]


def run(args: argparse.Namespace) -> int:
    """Parse Composer's and the ``--numa-*`` options, plan once, run Composer's launcher."""
    from composer_numa.cli import plan_from_args
    from composer_numa.diagnostics import emit
    from composer_numa.errors import ComposerNumaError

    launcher, parser = _parser()
    ns = parser.parse_args(args.argv)
    if ns.command_mode and ns.module_mode:
        raise ComposerNumaError("launch: -m/--module_mode and -c/--command_mode exclude each other")

    # Plan once here: bad --numa-* values fail before any rank starts, and the
    # machine's warnings print once instead of once per rank.
    nproc = ns.nproc
    if nproc is None:
        env_size = os.environ.get("LOCAL_WORLD_SIZE")
        if env_size is not None:
            try:
                nproc = int(env_size)
            except ValueError:
                raise ComposerNumaError(f"LOCAL_WORLD_SIZE={env_size!r} is not an integer") from None
        else:
            import torch

            nproc = torch.cuda.device_count()
        nproc = nproc or 1
    topology, plan = plan_from_args(ns, nproc, prefix="numa-")
    for diag in (*topology.diagnostics, *plan.warnings):
        emit(diag, stderr=True)
    if ns.verbose:
        from composer_numa.cpulist import format_cpulist

        for r in plan.ranks:
            print(f"composer-numa: local rank {r.local_rank}: CPUs {format_cpulist(r.cpus)}, "
                  f"memory {r.memory_policy.value} {format_cpulist(r.memory_nodes)}, "
                  f"{r.num_threads} thread(s)", file=sys.stderr)

    argv = _composer_argv(parser, ns)
    saved = sys.argv
    sys.argv = ["composer", *argv]
    try:
        return launcher.main()
    except ValueError as e:  # Composer's own checks of its options
        raise ComposerNumaError(f"launch: {e}") from None
    finally:
        sys.argv = saved
