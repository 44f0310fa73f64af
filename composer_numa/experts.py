"""``NumaExperts`` moved to :mod:`composer_numa.offload.experts`. This name is kept for existing imports."""

from composer_numa.offload.experts import *  # noqa: F403
from composer_numa.offload.experts import __all__ as _all

__all__ = [*_all]
