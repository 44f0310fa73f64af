"""Loader for the compiled extension ``composer_numa._C``.

Importing the package never needs the extension; the modules that do (memory,
optim, bench, experts) call :func:`native` and get one clear error when the
extension was not built, instead of a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["native", "NativeExtensionError"]

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
    return _module
