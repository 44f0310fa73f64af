"""The process's worker pool, planned from the machine model.

The C++ extension never reads the machine: it is given explicit worker slots,
``[(cpu, node), ...]``, and every kernel and node-local buffer receives the pool
it runs on. This module computes those slots from
:func:`composer_numa.machine.sysfs.discover` and the process's current CPU
affinity, and owns the process's default pool:

* one worker per physical core the process may run on (the lowest allowed SMT
  sibling of each core), grouped by NUMA node, nodes and CPUs ascending;
* ``COMPOSER_NUMA_THREADS=n`` caps the count (cores are then shared out over the
  nodes in proportion to their size, every node keeping a worker while there
  are at least as many workers as nodes); ``reset(threads=n)`` asks for exactly
  ``n`` (wrapping around the cores when ``n`` exceeds them);
* ``COMPOSER_NUMA_SPIN_US`` (default 50) is how long an idle worker spins
  before it sleeps.

The pool is planned once, on first use. Nothing re-plans behind the caller's
back: after changing the process's affinity call :func:`reset`;
:func:`composer_numa.binding.session.bind_rank` does so after it applies a
binding, when this module is loaded. A forked child keeps the pool object and
the extension starts new worker threads in it on first use.

Example:
    >>> from composer_numa.offload import runtime
    >>> runtime.pool().workers()[0]["cpu"]       # doctest: +SKIP
    0
    >>> runtime.reset(threads=4)                 # the next use plans 4 workers
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from composer_numa.diagnostics import SETTING_IGNORED, Diagnostic, emit
from composer_numa.machine.sysfs import discover
from composer_numa.units import format_cpulist

if TYPE_CHECKING:  # pragma: no cover
    from composer_numa.machine.topology import Topology

__all__ = ["THREADS_ENV", "SPIN_ENV", "MAX_WORKERS", "plan_slots", "machine", "pool", "reset",
           "memory_nodes", "default_node"]

#: Caps the number of workers of the default pool.
THREADS_ENV = "COMPOSER_NUMA_THREADS"
#: Microseconds an idle worker spins before sleeping (default 50).
SPIN_ENV = "COMPOSER_NUMA_SPIN_US"
#: Most workers a pool may have.
MAX_WORKERS = 4096

_lock = threading.Lock()
_pool: Any = None  # composer_numa._C.Pool
_machine: Topology | None = None
_threads: int | None = None


def plan_slots(topology: Topology, affinity: Iterable[int], threads: int | None = None,
               cap: int | None = None) -> list[tuple[int, int]]:
    """The ``(cpu, node)`` of each worker (a pure function of its arguments).

    Args:
        topology: the machine model.
        affinity: the CPUs this process may run on.
        threads: exactly this many workers (wrapping around the cores when more);
            None: one per physical core.
        cap: at most this many workers when ``threads`` is None.

    Raises:
        ValueError: none of ``affinity`` is an online CPU of ``topology``, or a
            count is not a positive int.
    """
    for name, value in (("threads", threads), ("cap", cap)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    online = {c.id: c for c in topology.cpus}
    allowed = sorted({c for c in affinity if c in online})
    if not allowed:
        raise ValueError(f"none of this process's CPUs ({format_cpulist(sorted(set(affinity)), 'none')}) "
                         "is an online CPU of the machine")
    # node -> physical core -> its lowest allowed CPU (allowed is ascending)
    cores: dict[int, dict[int, int]] = {}
    for c in allowed:
        cpu = online[c]
        cores.setdefault(cpu.node, {}).setdefault(cpu.core_key, c)
    nodes = sorted(cores)
    cpus = [sorted(cores[n].values()) for n in nodes]
    total = sum(len(v) for v in cpus)
    n = threads if threads is not None else min(total, cap) if cap is not None else total

    if n >= total:
        quota = [len(v) for v in cpus]
    else:
        # Largest remainder, then every node keeps a worker while there are enough of them,
        # so node-local tasks stay node-local.
        quota = [n * len(v) // total for v in cpus]
        order = sorted(range(len(nodes)), key=lambda i: -(n * len(cpus[i]) % total))  # stable on ties
        for k in range(n - sum(quota)):
            quota[order[k % len(order)]] += 1
        if n >= len(nodes):
            for i in range(len(nodes)):
                if quota[i] == 0:
                    donor = max(range(len(nodes)), key=lambda j: (quota[j], -j))
                    quota[donor] -= 1
                    quota[i] += 1
    slots = [(cpus[i][k], nodes[i]) for i in range(len(nodes)) for k in range(quota[i])]
    flat = [(c, nodes[i]) for i in range(len(nodes)) for c in cpus[i]]
    for extra in range(n - len(slots)):  # more workers than cores: only when asked explicitly
        slots.append(flat[extra % total])
    slots.sort(key=lambda s: s[1])  # stable: CPUs stay ascending within a node
    return slots


def _env_int(name: str, default: int | None, low: int, high: int) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        emit(Diagnostic(SETTING_IGNORED, f"{name}={text[:40]!r} is not an integer from {low} to {high}",
                        "it is ignored"))
        return default
    return value


def machine() -> Topology:
    """The machine model the pool was (or will be) planned from, read once until :func:`reset`."""
    global _machine
    with _lock:
        if _machine is None:
            _machine = discover()
        return _machine


def pool() -> Any:
    """The process's default :class:`composer_numa._C.Pool`, planned and started on first use.

    Raises:
        NativeExtensionError: the extension is not built.
        ValueError: the affinity holds no online CPU of the machine model.
    """
    global _pool
    p = _pool
    if p is not None:
        return p
    from composer_numa.offload.native import native

    c = native()
    topology = machine()
    with _lock:
        if _pool is None:
            slots = plan_slots(topology, os.sched_getaffinity(0), _threads,
                               _env_int(THREADS_ENV, None, 1, MAX_WORKERS))
            _pool = c.Pool(slots, _env_int(SPIN_ENV, 50, 0, 1_000_000))
        return _pool


def reset(threads: int | None = None) -> None:
    """Re-plan: the next :func:`pool` reads the machine and the affinity again.

    Args:
        threads: exactly this many workers from now on; None: one per physical core
            (capped by ``COMPOSER_NUMA_THREADS``).

    The old pool's workers stop when its last user lets go of it (a kernel running on
    it in another thread finishes first).
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or not 1 <= threads <= MAX_WORKERS):
        raise ValueError(f"threads must be an int from 1 to {MAX_WORKERS} or None, got {threads!r}")
    global _pool, _machine, _threads
    with _lock:
        old, _pool, _machine, _threads = _pool, None, None, threads
    del old  # joined here unless another thread still holds it


def memory_nodes() -> list[int]:
    """Nodes with memory this process may allocate on (inside ``Mems_allowed``), ascending."""
    topology = machine()
    allowed = set(topology.allowed_mems)
    return [n.id for n in topology.nodes if n.has_memory and (not allowed or n.id in allowed)]


def default_node() -> int:
    """Where buffers go when no node is named: the first node of the pool's workers that has
    memory this process may use, else the first such node of the machine."""
    mem = memory_nodes()
    for n in pool().nodes():
        if n in mem:
            return n
    return mem[0] if mem else 0


def _after_fork_in_child() -> None:
    # A parent thread may have held the lock at fork(); the child has only this thread.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
