"""The ``composer-numa`` command line.

Each subcommand lives in the module named for what it does and provides
``register(subparsers)``; this module only wires them together, shares the
planning options, and turns user errors into one-line messages.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from composer_numa._version import __version__
from composer_numa.errors import ComposerNumaError

__all__ = ["main", "add_plan_options", "plan_from_args"]

# subcommand -> module providing register(subparsers); order is the help order.
_SUBCOMMANDS = {
    "report": "composer_numa.report",
    "exec": "composer_numa.trampoline",
    "launch": "composer_numa.launch",
    "check": "composer_numa.check",
    "bench": "composer_numa.bench",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user error
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_plan_options(p: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """Add the options every planning subcommand shares (``--mode``, ``--memory`` ...).

    Args:
        p: the subcommand's parser.
        prefix: option prefix, e.g. ``"numa-"`` for ``launch`` whose own
            namespace belongs to Composer's launcher.
    """
    from composer_numa.plan import MemoryPolicy, Mode

    dest = prefix.replace("-", "_")
    p.add_argument(f"--{prefix}mode", dest=f"{dest}mode", default="node",
                   choices=[m.value for m in Mode], help="CPU placement per rank (default: node)")
    p.add_argument(f"--{prefix}memory", dest=f"{dest}memory", default="preferred",
                   choices=[m.value for m in MemoryPolicy],
                   help="memory policy per rank (default: preferred)")
    p.add_argument(f"--{prefix}memory-need", dest=f"{dest}memory_need", default=None,
                   metavar="SIZE", help="memory one rank needs on its node, e.g. 380G")
    p.add_argument(f"--{prefix}sysfs-root", dest=f"{dest}sysfs_root", default=None,
                   metavar="DIR", help="read a sysfs tree here instead of /sys")
    p.add_argument(f"--{prefix}proc-root", dest=f"{dest}proc_root", default=None,
                   metavar="DIR", help="read a procfs tree here instead of /proc")


def plan_from_args(args: argparse.Namespace, nproc: int | None, *, prefix: str = ""):
    """Discover the machine and plan with the shared options. Returns (topology, plan)."""
    from composer_numa.cpulist import parse_size
    from composer_numa.plan import MemoryPolicy, Mode, PlanOptions, plan
    from composer_numa.topology import discover

    dest = prefix.replace("-", "_")
    topo = discover(getattr(args, f"{dest}sysfs_root"), getattr(args, f"{dest}proc_root"))
    need = getattr(args, f"{dest}memory_need")
    if nproc is None:
        nproc = max(1, len(topo.gpus))
    if nproc < 1:
        raise ComposerNumaError(f"--nproc must be at least 1, got {nproc}")
    options = PlanOptions(
        nproc=nproc,
        mode=Mode(getattr(args, f"{dest}mode")),
        memory=MemoryPolicy(getattr(args, f"{dest}memory")),
        memory_need=None if need is None else parse_size(need),
    )
    return topo, plan(topo, options)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` just that subcommand's (a faster start)."""
    parser = _Parser(
        prog="composer-numa",
        description="NUMA-aware binding for PyTorch / Composer ranks: report the machine and "
        "plan, bind at birth (exec, launch), verify (check), measure (bench).",
    )
    parser.add_argument("--version", action="version", version=f"composer-numa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module in _SUBCOMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # a subcommand a later issue adds
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `exec` starts every rank: import only the named subcommand's module.
    parser = build_parser(argv[0] if argv and argv[0] in _SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ComposerNumaError as e:
        print(f"composer-numa: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
