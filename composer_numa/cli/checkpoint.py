"""``composer-numa checkpoint convert IN OUT --to torch|numa``: move a Composer checkpoint
between ``torch.optim.AdamW`` and ``NumaAdamW``.

Composer files optimizer state under the optimizer's class name, so a run that resumes with
the other optimizer would drop the moments. This renames the entry (and, going to torch, drops
the fp32 master weights torch's AdamW has no use for); see
:mod:`composer_numa.composer.checkpoint`. The ``NumaAffinity`` callback does the same on load.
Only this subcommand imports torch, when it runs.

Example:
    composer-numa checkpoint convert ckpt/ep1-ba100-rank0.pt ckpt/torch.pt --to torch
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "checkpoint",
        help="convert Composer checkpoints between torch.optim.AdamW and NumaAdamW",
        description="Work on Composer checkpoints.",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    c = sub.add_parser(
        "convert",
        help="rewrite a checkpoint's optimizer state for torch.optim.AdamW or NumaAdamW",
        description="Rename the optimizer state of a single-file Composer checkpoint so that a run "
        "using the other optimizer resumes with its moments and step counts (--to torch drops the "
        "fp32 master weights of bf16 parameters, which torch's AdamW does not keep). Reads files "
        "with torch.load(weights_only=False): convert only checkpoints you trust.",
    )
    c.add_argument("src", metavar="IN", help="the checkpoint to read (.pt)")
    c.add_argument("dst", metavar="OUT", help="where to write the converted checkpoint (may be IN)")
    c.add_argument("--to", required=True, choices=("torch", "numa"),
                   help="torch: for torch.optim.AdamW; numa: for composer_numa.NumaAdamW")
    c.set_defaults(func=run)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def run(args: argparse.Namespace) -> int:
    import sys
    import warnings

    from composer_numa.composer.checkpoint import convert_file

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = convert_file(args.src, args.dst, args.to)
    for w in caught:
        print(f"composer-numa: warning: {w.message}", file=sys.stderr)
    print(line)
    return 0
