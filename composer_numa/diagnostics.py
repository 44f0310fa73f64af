"""Warnings with stable codes, shared by discovery, the planner and the binder.

Codes are part of the JSON interface of ``composer-numa report`` and appear in
every warning message, so scripts can match on them.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass

__all__ = [
    "Diagnostic",
    "GPU_NUMA_UNKNOWN",
    "NUMA_BALANCING_ENABLED",
    "SUB_NUMA_CLUSTERING",
    "CPUSET_EXCLUDES_GPU_NODE",
    "NODE_MEMORY_INSUFFICIENT",
    "MORE_RANKS_THAN_GPUS",
    "TOO_FEW_CORES",
    "GPU_UUID_UNRESOLVED",
    "BIND_NOT_APPLIED",
    "BINDING_MISMATCH",
    "NumaWarning",
    "emit",
]

log = logging.getLogger(__name__)

GPU_NUMA_UNKNOWN = "gpu-numa-unknown"
NUMA_BALANCING_ENABLED = "numa-balancing-enabled"
SUB_NUMA_CLUSTERING = "sub-numa-clustering"
CPUSET_EXCLUDES_GPU_NODE = "cpuset-excludes-gpu-node"
NODE_MEMORY_INSUFFICIENT = "node-memory-insufficient"
MORE_RANKS_THAN_GPUS = "more-ranks-than-gpus"
TOO_FEW_CORES = "too-few-cores"
GPU_UUID_UNRESOLVED = "gpu-uuid-unresolved"
BIND_NOT_APPLIED = "bind-not-applied"
BINDING_MISMATCH = "binding-mismatch"


class NumaWarning(UserWarning):
    """Category of the Python warnings composer-numa issues."""


@dataclass(frozen=True)
class Diagnostic:
    """One warning: a stable ``code`` and a human ``message``."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    def to_json(self) -> dict:
        return {"code": self.code, "message": self.message}


_emitted: set[tuple[str, str]] = set()


def emit(diag: Diagnostic, *, stderr: bool = False) -> None:
    """Report ``diag`` once per process: to logging and Python warnings, or to stderr.

    Args:
        diag: what to report.
        stderr: write a ``composer-numa: warning:`` line to stderr instead of
            using Python warnings (the CLI and the trampoline, which run before
            any logging is configured).
    """
    key = (diag.code, diag.message)
    if key in _emitted:
        return
    _emitted.add(key)
    if stderr:
        print(f"composer-numa: warning: {diag}", file=sys.stderr, flush=True)
    else:
        log.warning("%s", diag)
        warnings.warn(str(diag), NumaWarning, stacklevel=3)
