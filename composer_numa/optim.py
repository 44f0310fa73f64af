"""``NumaAdamW`` moved to :mod:`composer_numa.offload.optim`. This name is kept for existing imports."""

from composer_numa.offload.optim import *  # noqa: F403
from composer_numa.offload.optim import __all__ as _all

__all__ = [*_all]
