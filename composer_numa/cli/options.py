"""Options every planning subcommand shares (``--mode``, ``--memory`` ...), turned into
:class:`~composer_numa.plan.PlanOptions`."""

from __future__ import annotations

import argparse

from composer_numa.errors import ComposerNumaError
from composer_numa.plan import MAX_RANKS, MemoryPolicy, MemoryTarget, Mode, PlanOptions
from composer_numa.units import parse_size

__all__ = ["add_plan_options", "plan_options", "count", "roots"]


def count(text: str, what: str = "a number", maximum: int = MAX_RANKS) -> int:
    """An ``argparse`` type: a whole number from 1 to ``maximum``, or a one-line error."""
    t = text.strip()
    if not (t.isascii() and t.isdigit()) or len(t) > 12 or not 1 <= int(t) <= maximum:
        raise argparse.ArgumentTypeError(f"expected {what} from 1 to {maximum}, got {text[:40]!r}")
    return int(t)


def add_plan_options(p: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """Add the planning options to a subcommand's parser.

    Args:
        p: the subcommand's parser (or an argument group).
        prefix: option prefix, e.g. ``"numa-"`` for ``launch`` whose own
            namespace belongs to Composer's launcher.
    """
    dest = prefix.replace("-", "_")
    p.add_argument(f"--{prefix}mode", dest=f"{dest}mode", default="node",
                   choices=[m.value for m in Mode], help="CPU placement per rank (default: node)")
    p.add_argument(f"--{prefix}memory", dest=f"{dest}memory", default="preferred",
                   choices=[m.value for m in MemoryPolicy],
                   help="memory policy per rank (default: preferred)")
    p.add_argument(f"--{prefix}memory-need", dest=f"{dest}memory_need", default=None,
                   metavar="SIZE", help="memory one rank needs on its node, e.g. 380G")
    p.add_argument(f"--{prefix}memory-target", dest=f"{dest}memory_target", default="local",
                   choices=[m.value for m in MemoryTarget],
                   help="the rank's own nodes (local, default) or the CPU-less memory nodes attached "
                   "to them: HBM in flat mode, CXL, Grace's GPU memory (hbm)")
    p.add_argument(f"--{prefix}sysfs-root", dest=f"{dest}sysfs_root", default=None,
                   metavar="DIR", help="read a sysfs tree here instead of /sys")
    p.add_argument(f"--{prefix}proc-root", dest=f"{dest}proc_root", default=None,
                   metavar="DIR", help="read a procfs tree here instead of /proc")


def plan_options(args: argparse.Namespace, nproc: int = 1, *, prefix: str = "") -> PlanOptions:
    """The :class:`PlanOptions` the shared options describe (``--memory-need`` parsed here)."""
    dest = prefix.replace("-", "_")
    need = getattr(args, f"{dest}memory_need")
    try:
        need_bytes = None if need is None else parse_size(need)
    except ComposerNumaError as e:
        raise ComposerNumaError(f"--{prefix}memory-need: {e}") from None
    return PlanOptions(nproc=nproc, mode=Mode(getattr(args, f"{dest}mode")),
                       memory=MemoryPolicy(getattr(args, f"{dest}memory")), memory_need=need_bytes,
                       memory_target=MemoryTarget(getattr(args, f"{dest}memory_target")))


def roots(args: argparse.Namespace, *, prefix: str = "") -> tuple[str | None, str | None]:
    """(sysfs root, procfs root) from ``--sysfs-root`` / ``--proc-root``."""
    dest = prefix.replace("-", "_")
    return getattr(args, f"{dest}sysfs_root"), getattr(args, f"{dest}proc_root")
