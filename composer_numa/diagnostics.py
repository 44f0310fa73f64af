"""Warnings with stable codes, shared by discovery, the planner, the binder and the offload layer.

Codes are part of the JSON interface of ``composer-numa report`` and appear in
every warning message, so scripts can match on them. :func:`emit` reports each
distinct warning once per process, through one channel: Python's ``warnings``
(category :class:`NumaWarning`) inside a program, a ``composer-numa: warning:``
line on stderr from the command line.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

__all__ = [
    "Diagnostic",
    "NumaWarning",
    "CODES",
    "GPU_NUMA_UNKNOWN",
    "GPU_UUID_UNRESOLVED",
    "GPU_ORDER_UNCERTAIN",
    "TOPOLOGY_INCOMPLETE",
    "NUMA_BALANCING_ENABLED",
    "SUB_NUMA_CLUSTERING",
    "CPUSET_EXCLUDES_GPU_NODE",
    "NODE_MEMORY_INSUFFICIENT",
    "MEMORY_TARGET_UNAVAILABLE",
    "MEMORY_TARGET_GPU_MEMORY",
    "MORE_RANKS_THAN_GPUS",
    "TOO_FEW_CORES",
    "BIND_NOT_APPLIED",
    "BINDING_MISMATCH",
    "MEMORY_POLICY_FALLBACK",
    "OPTIONS_IGNORED",
    "SETTING_IGNORED",
    "PIN_NOT_APPLIED",
    "HOST_MACHINE_DIFFERS",
    "HOST_PLAN_DIFFERS",
    "RANK_MEMORY_REMOTE",
    "emit",
    "forget_emitted",
]

# Reading the machine.
GPU_NUMA_UNKNOWN = "gpu-numa-unknown"
GPU_UUID_UNRESOLVED = "gpu-uuid-unresolved"
GPU_ORDER_UNCERTAIN = "gpu-order-uncertain"
TOPOLOGY_INCOMPLETE = "topology-incomplete"
NUMA_BALANCING_ENABLED = "numa-balancing-enabled"
SUB_NUMA_CLUSTERING = "sub-numa-clustering"
# Planning.
CPUSET_EXCLUDES_GPU_NODE = "cpuset-excludes-gpu-node"
NODE_MEMORY_INSUFFICIENT = "node-memory-insufficient"
MEMORY_TARGET_UNAVAILABLE = "memory-target-unavailable"
MEMORY_TARGET_GPU_MEMORY = "memory-target-gpu-memory"
MORE_RANKS_THAN_GPUS = "more-ranks-than-gpus"
TOO_FEW_CORES = "too-few-cores"
# Binding.
BIND_NOT_APPLIED = "bind-not-applied"
BINDING_MISMATCH = "binding-mismatch"
MEMORY_POLICY_FALLBACK = "memory-policy-fallback"
OPTIONS_IGNORED = "options-ignored"
SETTING_IGNORED = "setting-ignored"
# Offload.
PIN_NOT_APPLIED = "pin-not-applied"
# Across the hosts of a job (the callback's gathered table, `composer-numa report --merge`).
HOST_MACHINE_DIFFERS = "host-machine-differs"
HOST_PLAN_DIFFERS = "host-plan-differs"
RANK_MEMORY_REMOTE = "rank-memory-remote"

#: Every code, in documentation order.
CODES = (
    GPU_NUMA_UNKNOWN, GPU_UUID_UNRESOLVED, GPU_ORDER_UNCERTAIN, TOPOLOGY_INCOMPLETE,
    NUMA_BALANCING_ENABLED, SUB_NUMA_CLUSTERING, CPUSET_EXCLUDES_GPU_NODE, NODE_MEMORY_INSUFFICIENT,
    MEMORY_TARGET_UNAVAILABLE, MEMORY_TARGET_GPU_MEMORY, MORE_RANKS_THAN_GPUS, TOO_FEW_CORES,
    BIND_NOT_APPLIED, BINDING_MISMATCH, MEMORY_POLICY_FALLBACK, OPTIONS_IGNORED, SETTING_IGNORED, PIN_NOT_APPLIED,
    HOST_MACHINE_DIFFERS, HOST_PLAN_DIFFERS, RANK_MEMORY_REMOTE,
)


class NumaWarning(UserWarning):
    """Category of the Python warnings composer-numa issues."""


@dataclass(frozen=True)
class Diagnostic:
    """One warning: a stable ``code``, what is wrong (``message``) and what is done about it (``outcome``).

    ``str(d)`` is ``"[code] message: outcome"``; under ``strict`` the problem
    alone (``message``) becomes the error, since the fallback is not taken.
    """

    code: str
    message: str
    outcome: str = ""

    @property
    def text(self) -> str:
        """The message and its outcome, in one line."""
        return f"{self.message}: {self.outcome}" if self.outcome else self.message

    def __str__(self) -> str:
        return f"[{self.code}] {self.text}"

    def to_json(self) -> dict:
        return {"code": self.code, "message": self.text}


_emitted: set[tuple[str, str]] = set()


def emit(diag: Diagnostic, *, stderr: bool = False) -> None:
    """Report ``diag`` once per process.

    Args:
        diag: what to report.
        stderr: write a ``composer-numa: warning:`` line to stderr (the command
            line and the trampoline, which run before any logging or warning
            filters are set up) instead of issuing a :class:`NumaWarning`.
    """
    key = (diag.code, diag.text)
    if key in _emitted:
        return
    _emitted.add(key)
    if stderr:
        print(f"composer-numa: warning: {diag}", file=sys.stderr, flush=True)
    else:
        warnings.warn(str(diag), NumaWarning, stacklevel=3)


def forget_emitted() -> None:
    """Let every warning be reported again (tests; a new job in a long-lived process)."""
    _emitted.clear()
