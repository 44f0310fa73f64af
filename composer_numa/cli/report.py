"""``composer-numa report``: the machine and the per-rank plan, as a table, JSON, Markdown or SVG.

Nothing is applied. The JSON form is a stable interface (``docs/report-json.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from composer_numa.cli.options import add_plan_options, count, plan_options, roots
from composer_numa.errors import ComposerNumaError
from composer_numa.machine.sysfs import discover
from composer_numa.plan import plan
from composer_numa.report import FORMATS, render

__all__ = ["register", "run"]


def register(subparsers) -> None:
    """Add the ``report`` subcommand to the ``composer-numa`` parser."""
    p = subparsers.add_parser(
        "report",
        help="show the NUMA nodes, GPUs, NICs and each rank's planned binding",
        description="Show the machine (NUMA nodes, sockets, GPUs, NICs, cpuset, available memory) and "
        "the binding planned for each local rank, with any warnings. Nothing is applied.",
    )
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="output format (default: table); json is a stable interface")
    p.add_argument("--output", "-o", metavar="FILE", default=None,
                   help="write the report to FILE instead of standard output")
    p.add_argument("--nproc", type=lambda t: count(t, "a number of ranks"), default=None, metavar="N",
                   help="local ranks to plan (default: the visible GPUs, or 1)")
    add_plan_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Discover, plan and write the report. Returns the exit status."""
    if args.output is not None:
        parent = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(parent):
            raise ComposerNumaError(f"cannot write {args.output}: directory {parent} does not exist")
    options = plan_options(args)  # bad options fail before the machine is read
    topology = discover(*roots(args))
    nproc = args.nproc if args.nproc is not None else max(1, len(topology.gpus))
    text = render(topology, plan(topology, dataclasses.replace(options, nproc=nproc)), args.format)
    if args.output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return 0
    try:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise ComposerNumaError(f"cannot write {args.output}: {e.strerror or e}") from None
    return 0
