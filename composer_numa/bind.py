"""Applying and verifying moved to :mod:`composer_numa.binding.apply` and
:mod:`composer_numa.binding.verify`; this name is kept for existing imports."""

from composer_numa.binding.apply import *  # noqa: F403
from composer_numa.binding.apply import __all__ as _all
from composer_numa.binding.verify import *  # noqa: F403
from composer_numa.binding.verify import __all__ as _verify_all

__all__ = [*_all, *_verify_all]
