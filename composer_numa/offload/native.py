"""Loader for the compiled extension ``composer_numa._C``.

Importing the package never needs the extension; the modules that do (runtime,
memory, optim, experts, bench) call :func:`native` and get one clear error when
the extension was not built, instead of a bare ``ModuleNotFoundError``. The
extension reads nothing of the machine itself: :mod:`.runtime` gives it the
worker slots, :mod:`.memory` the node ids and the capacity answer.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from composer_numa.diagnostics import SETTING_IGNORED, Diagnostic, emit

__all__ = ["native", "NativeExtensionError", "SIMD_LEVELS"]

#: Values ``COMPOSER_NUMA_SIMD`` may take to cap the kernels' instruction set.
SIMD_LEVELS = ("avx512", "avx2", "neon", "scalar")

_module: ModuleType | None = None


class NativeExtensionError(ImportError):
    """The C++ extension ``composer_numa._C`` is not built or cannot be loaded."""


def native() -> ModuleType:
    """Return the ``composer_numa._C`` module, importing it once.

    Raises:
        NativeExtensionError: when the extension is missing or fails to load,
            with the command that builds it.
    """
    global _module
    if _module is None:
        try:
            _module = importlib.import_module("composer_numa._C")
        except ImportError as e:
            raise NativeExtensionError(
                f"the composer-numa C++ extension (composer_numa._C) is not available ({e}); "
                "build it with `pip install -e .` in the source tree"
            ) from e
        _check_settings()
    return _module


def _check_settings() -> None:
    """Warn once about a kernel setting the extension would not understand (it then ignores it)."""
    cap = os.environ.get("COMPOSER_NUMA_SIMD", "").strip()
    if cap and cap not in SIMD_LEVELS:
        emit(Diagnostic(SETTING_IGNORED, f"COMPOSER_NUMA_SIMD={cap[:40]!r} is not one of {', '.join(SIMD_LEVELS)}",
                        "it is ignored and the widest path this CPU supports is used"))
