"""``composer-numa launch``: Composer's own launcher, each rank bound at birth.

Takes every option of the ``composer`` command unchanged (``-n/--nproc``,
``--world_size``, ``--base_rank``, ``--node_rank``, ``--master_addr``,
``--master_port``, ``--stdout``, ``--stderr``, ``-v``, ``-m``, ``-c``) plus
``--numa-*`` options. It plans once (bad ``--numa-*`` values fail before any
rank starts, and the machine's warnings print once), then becomes Composer's
launcher in command mode so that each rank starts as
``composer-numa exec <numa options> -- python SCRIPT ARGS`` (``python -m
MODULE ARGS`` with ``-m``; the bare command with ``-c``). Composer sets
``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` for each rank, spawns, monitors and cleans
up exactly as it always does; exit codes, SIGINT and SIGTERM are Composer's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from composer_numa.cli.options import add_plan_options, count, plan_options, roots
from composer_numa.composer.launcher import composer_parser, exec_launcher, script_position
from composer_numa.diagnostics import emit
from composer_numa.errors import ComposerNumaError
from composer_numa.machine.sysfs import discover
from composer_numa.plan import plan
from composer_numa.units import format_cpulist

__all__ = ["register", "run", "rank_command", "launcher_argv"]

# Our options, and whether each takes a value: they are taken out of Composer's part of the line.
_NUMA_OPTIONS = {"--numa-mode": True, "--numa-memory": True, "--numa-memory-need": True,
                 "--numa-memory-target": True, "--numa-sysfs-root": True, "--numa-proc-root": True,
                 "--numa-strict": False, "--numa-no-thread-env": False}
_MODE_FLAGS = ("-m", "--module_mode", "-c", "--command_mode")


def register(subparsers) -> None:
    """Add the ``launch`` subcommand; its options are parsed by :func:`run` (Composer's parser)."""
    # "+" as the only prefix keeps argparse from reading Composer's options here.
    p = subparsers.add_parser(
        "launch",
        add_help=False,
        prefix_chars="+",
        help="run Composer's launcher with every rank bound to its NUMA node (see launch --help)",
        description="composer [Composer launcher options] [--numa-* options] SCRIPT [ARGS...]",
    )
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)


def _parser() -> argparse.ArgumentParser:
    parser = composer_parser()
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
    return parser


def rank_command(ns: argparse.Namespace, python: str | None = None) -> list[str]:
    """The command (after Composer's ``-c``) each rank runs: the trampoline, then the script."""
    python = python or sys.executable
    numa = ["--bound-at", "launch", "--mode", ns.numa_mode, "--memory", ns.numa_memory,
            "--memory-target", ns.numa_memory_target]
    for flag, value in (("--memory-need", ns.numa_memory_need), ("--sysfs-root", ns.numa_sysfs_root),
                        ("--proc-root", ns.numa_proc_root)):
        if value is not None:
            numa += [flag, value]
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
    return [python, "-m", "composer_numa.cli", "exec", *numa, "--", *target, *ns.training_script_args]


def _composer_options(tokens: list[str]) -> list[str]:
    """Composer's own options from the tokens before the script: ours and -m/-c taken out."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        name = tok.split("=", 1)[0]
        matches = [o for o in _NUMA_OPTIONS if o.startswith(name)] if name.startswith("--numa-") else []
        if matches:
            takes_value = _NUMA_OPTIONS[matches[0]] and "=" not in tok
            i += 2 if takes_value else 1
            continue
        if tok not in _MODE_FLAGS:
            out.append(tok)
        i += 1
    return out


def launcher_argv(argv: list[str], ns: argparse.Namespace, nproc: int | None = None) -> list[str]:
    """Composer's launcher command line: its own options as given (ours and -m/-c taken out),
    ``--nproc`` when launch chose the count, then ``-c`` and the rank command."""
    options = _composer_options(argv[:script_position(argv, ns)])
    if nproc is not None:
        options += ["--nproc", str(nproc)]
    return [*options, "-c", *rank_command(ns)]


def run(args: argparse.Namespace) -> int:
    """Parse Composer's and the ``--numa-*`` options, plan once, become Composer's launcher."""
    argv = list(args.argv)
    ns = _parser().parse_args(argv)
    if ns.command_mode and ns.module_mode:
        raise ComposerNumaError("launch: -m/--module_mode and -c/--command_mode exclude each other")
    if ns.nproc is not None and ns.nproc < 1:
        raise ComposerNumaError(f"launch: --nproc must be at least 1, got {ns.nproc}")
    options = plan_options(ns, prefix="numa-")
    topology = discover(*roots(ns, prefix="numa-"))
    # The rank count is decided here, once, and handed to Composer so both agree.
    nproc = ns.nproc
    if nproc is None and os.environ.get("LOCAL_WORLD_SIZE"):
        try:
            nproc = count(os.environ["LOCAL_WORLD_SIZE"], "LOCAL_WORLD_SIZE")
        except argparse.ArgumentTypeError as e:
            raise ComposerNumaError(f"launch: {e}") from None
    explicit = nproc is not None
    nproc = nproc if nproc is not None else max(1, len(topology.gpus))
    result = plan(topology, dataclasses.replace(options, nproc=nproc))
    for diag in dict.fromkeys((*topology.diagnostics, *result.warnings)):
        emit(diag, stderr=True)
    if ns.verbose:
        for r in result.ranks:
            print(f"composer-numa: local rank {r.local_rank}: CPUs {format_cpulist(r.cpus)}, "
                  f"memory {r.memory_policy.value} {format_cpulist(r.memory_nodes)}, "
                  f"{r.num_threads} thread(s)", file=sys.stderr)
    exec_launcher(launcher_argv(argv, ns, None if explicit else nproc))
