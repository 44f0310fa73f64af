"""``composer-numa report``: the machine and the per-rank plan, as a table, JSON, Markdown or SVG.

Nothing is applied. The JSON form is a stable interface (``docs/report-json.md``).
``--merge a.json b.json ...`` combines such JSON reports from several hosts into one table
(one row per rank) with warnings about hosts that differ from the majority.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
    p.add_argument("--merge", nargs="+", metavar="REPORT.json", default=None,
                   help="combine JSON reports of several hosts (each from `report --format json -o HOST.json`) "
                   "into one table of every rank, with warnings about hosts that differ; reads no machine")
    add_plan_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Discover, plan and write the report. Returns the exit status."""
    if args.output is not None:
        parent = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(parent):
            raise ComposerNumaError(f"cannot write {args.output}: directory {parent} does not exist")
    if args.merge is not None:
        text = _merged(args.merge, args.format)
    else:
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


def _merged(paths: list[str], fmt: str) -> str:
    """The merged table of the per-host reports at ``paths``, rendered as ``fmt``."""
    from composer_numa.report import merge

    reports = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except OSError as e:
            raise ComposerNumaError(f"cannot read {path}: {e.strerror or e}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ComposerNumaError(f"{path} is not JSON: {e}") from None
        label = os.path.basename(path)
        reports.append((label[:-5] if label.endswith(".json") else label, doc))
    return merge.render(merge.from_reports(reports), fmt)
