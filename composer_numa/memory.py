"""Node-local tensors moved to :mod:`composer_numa.offload.memory`. This name is kept for existing imports."""

from composer_numa.offload.memory import *  # noqa: F403
from composer_numa.offload.memory import __all__ as _all

__all__ = [*_all]
