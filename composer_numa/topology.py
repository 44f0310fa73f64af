"""The machine model moved to :mod:`composer_numa.machine.topology` (discovery:
:mod:`composer_numa.machine.sysfs`); this name is kept for existing imports."""

from composer_numa.machine.sysfs import discover
from composer_numa.machine.topology import *  # noqa: F403
from composer_numa.machine.topology import __all__ as _all

__all__ = [*_all, 'discover']
