"""composer-numa: NUMA-aware rank binding and CPU offload kernels for PyTorch / Composer.

Importing this package is cheap: torch and composer are imported only when a
name that needs them (``NumaAffinity``, ``NumaAdamW``, ``NumaExperts``) is used.
"""

from __future__ import annotations

import importlib

from composer_numa._version import __version__

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs every rank's start
if TYPE_CHECKING:  # pragma: no cover
    from composer_numa.binding.session import bind_rank
    from composer_numa.composer.callback import NumaAffinity
    from composer_numa.machine.sysfs import discover
    from composer_numa.machine.topology import Topology
    from composer_numa.offload.experts import NumaExperts
    from composer_numa.offload.optim import NumaAdamW
    from composer_numa.plan import MemoryPolicy, MemoryTarget, Mode, PlanOptions, RankPlan

__all__ = [
    "__version__",
    "NumaAffinity",
    "NumaAdamW",
    "NumaExperts",
    "Mode",
    "MemoryPolicy",
    "MemoryTarget",
    "PlanOptions",
    "RankPlan",
    "Topology",
    "discover",
    "bind_rank",
]

_LAZY = {
    "NumaAffinity": "composer_numa.composer.callback",
    "NumaAdamW": "composer_numa.offload.optim",
    "NumaExperts": "composer_numa.offload.experts",
    "Mode": "composer_numa.plan",
    "MemoryPolicy": "composer_numa.plan",
    "MemoryTarget": "composer_numa.plan",
    "PlanOptions": "composer_numa.plan",
    "RankPlan": "composer_numa.plan",
    "Topology": "composer_numa.machine.topology",
    "discover": "composer_numa.machine.sysfs",
    "bind_rank": "composer_numa.binding.session",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'composer_numa' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
