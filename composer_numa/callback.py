"""The callback moved to :mod:`composer_numa.composer.callback`. This name is kept for existing imports."""

from composer_numa.composer.callback import *  # noqa: F403
from composer_numa.composer.callback import __all__ as _all

__all__ = [*_all]
