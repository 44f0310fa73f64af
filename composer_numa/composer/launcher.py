"""What ``composer-numa launch`` needs from Composer's launcher, in one place.

Composer has no public API for "parse the ``composer`` command line": its
launcher's argument parser comes from the private
``composer.cli.launcher._get_parser``. Everything else ``launch`` does goes
through public ground: it execs ``composer.cli.launcher.main`` in a fresh
interpreter with an ordinary command line. ``tests/composer/test_launcher.py``
fails loudly if Composer changes what is used here.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from composer_numa.errors import ComposerNumaError

__all__ = ["composer_parser", "script_position", "exec_launcher"]

# Runs Composer's launcher with this process's argv, one line instead of a traceback
# for the option errors it reports as ValueError.
_RUN = ("import sys\nfrom composer.cli.launcher import main\ntry:\n    sys.exit(main())\n"
        "except ValueError as e:\n    print(f'composer-numa: error: launch: {e}', file=sys.stderr)\n"
        "    sys.exit(2)\n")


def composer_parser() -> argparse.ArgumentParser:
    """Composer's launcher argument parser (``composer.cli.launcher._get_parser``).

    Raises:
        ComposerNumaError: Composer is not installed or no longer provides it.
    """
    try:
        from composer.cli import launcher
    except ImportError as e:
        raise ComposerNumaError(f"composer-numa launch needs MosaicML Composer (pip install mosaicml): {e}") from None
    get_parser = getattr(launcher, "_get_parser", None)
    if get_parser is None:
        raise ComposerNumaError("this Composer version has no composer.cli.launcher._get_parser; "
                                "use `composer ... -c composer-numa exec -- python SCRIPT` instead")
    return get_parser()


def script_position(argv: list[str], ns: argparse.Namespace) -> int:
    """Index in ``argv`` of the training script: Composer's options are the tokens before it.

    ``ns`` is the parse of ``argv``; the script's own arguments are everything after it.
    """
    return len(argv) - len(ns.training_script_args) - 1


def exec_launcher(argv: list[str]) -> NoReturn:
    """Replace this process with Composer's launcher run on ``argv`` (same PID: signals and exit
    codes are the launcher's own)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-c", _RUN, *argv])
