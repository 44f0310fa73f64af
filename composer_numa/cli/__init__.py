"""The ``composer-numa`` command line.

Each subcommand lives in the module named for it (``cli/report.py``,
``cli/exec.py`` ...) and provides ``register(subparsers)``; this module only
wires them together and turns user errors into one-line messages (exit 2).
Only the named subcommand's module is imported: ``exec`` starts every rank.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from composer_numa._version import __version__
from composer_numa.errors import ComposerNumaError

__all__ = ["main", "build_parser"]

# subcommand -> module providing register(subparsers); order is the help order.
_SUBCOMMANDS = {
    "report": "composer_numa.cli.report",
    "exec": "composer_numa.cli.exec",
    "launch": "composer_numa.cli.launch",
    "check": "composer_numa.cli.check",
    "bench": "composer_numa.cli.bench",
    "checkpoint": "composer_numa.cli.checkpoint",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user error
        self.exit(2, f"{self.prog}: error: {message}\n")


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
        if only is None or name == only:
            importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv and argv[0] in _SUBCOMMANDS else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed in one line
        return e.code if isinstance(e.code, int) else 2
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
