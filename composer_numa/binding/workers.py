"""Pin PyTorch DataLoader worker processes to CPUs reserved for them.

Workers are forked from the training process and would otherwise inherit the
training threads' CPUs and compete with them. :class:`WorkerAffinity` is a
``worker_init_fn`` that moves the worker onto the reserved CPUs before it runs
the user's own ``worker_init_fn``; :func:`install` puts it on a loader (and pins
the workers of an iterator that already exists, such as a persistent one);
:func:`reserve_cores` splits a rank's CPUs into training and worker CPUs.

Nothing here imports torch: loaders are handled by their attributes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence

from composer_numa.binding.apply import pin_threads
from composer_numa.diagnostics import BIND_NOT_APPLIED, Diagnostic, emit
from composer_numa.errors import BindError
from composer_numa.machine.topology import Topology
from composer_numa.plan import RankPlan
from composer_numa.units import format_cpulist

__all__ = ["WorkerAffinity", "install", "reserve_cores", "training_plan"]

log = logging.getLogger(__name__)


def reserve_cores(cpus: Sequence[int], core_of: Callable[[int], int], count: int
                  ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Split ``cpus`` into (training CPUs, worker CPUs) with ``count`` whole cores for workers.

    The highest-numbered physical cores are reserved, SMT siblings together, so
    the training threads keep the low, contiguous part of the rank's share.

    Args:
        cpus: the rank's CPUs.
        core_of: CPU id -> id of its physical core (e.g. its lowest SMT sibling).
        count: physical cores to reserve (at least 1).

    Returns:
        The two CPU tuples, or None when fewer than ``count + 1`` cores are
        available (the training threads need at least one).
    """
    cores: dict[int, list[int]] = {}
    for cpu in sorted(set(cpus)):
        cores.setdefault(core_of(cpu), []).append(cpu)
    if count < 1 or len(cores) <= count:
        return None
    order = sorted(cores, key=lambda c: min(cores[c]))
    keep = [cpu for c in order[:-count] for cpu in cores[c]]
    reserved = [cpu for c in order[-count:] for cpu in cores[c]]
    return tuple(sorted(keep)), tuple(sorted(reserved))


class WorkerAffinity:
    """A ``worker_init_fn`` that pins the worker to ``cpus``, then calls the user's function.

    It is picklable (a module-level class holding plain data), so it also works
    with the ``spawn`` and ``forkserver`` start methods.

    Args:
        cpus: CPUs the worker processes may run on.
        user_fn: the loader's previous ``worker_init_fn``, called afterwards with the worker id.
        strict: raise instead of warning when the worker cannot be pinned.
    """

    def __init__(self, cpus: Sequence[int], user_fn: Callable[[int], None] | None = None,
                 strict: bool = False) -> None:
        self.cpus = tuple(sorted(set(cpus)))
        self.user_fn = user_fn
        self.strict = strict

    def __call__(self, worker_id: int) -> None:
        failures = _pin(self.cpus)
        if failures:
            message = (f"DataLoader worker {worker_id}: CPU affinity "
                       f"{_fmt(self.cpus)} not applied: {failures[0]}")
            if self.strict:
                raise BindError(message)
            emit(Diagnostic(BIND_NOT_APPLIED, message, "continuing without it"))
        if self.user_fn is not None:
            self.user_fn(worker_id)

    def __repr__(self) -> str:
        return f"WorkerAffinity(cpus={_fmt(self.cpus)!r}, user_fn={self.user_fn!r})"


def _fmt(cpus: Iterable[int]) -> str:
    return format_cpulist(cpus, "none")


def _pin(cpus: Sequence[int], pid: int | None = None) -> list[str]:
    """Pin every thread of ``pid`` (this process when None); one line per failure."""
    try:
        _, failures, _ = pin_threads(tuple(sorted(set(cpus))), pid)
    except OSError as e:
        return [str(e)]
    return failures


def _live_worker_pids(loader: object) -> list[int]:
    """Worker processes of an iterator the loader keeps alive (``persistent_workers``)."""
    iterator = getattr(loader, "_iterator", None)
    pids = []
    for worker in getattr(iterator, "_workers", None) or ():
        pid = getattr(worker, "pid", None)
        alive = getattr(worker, "is_alive", None)
        if pid is not None and (alive is None or alive()):
            pids.append(int(pid))
    return pids


def install(loader: object, cpus: Sequence[int], *, strict: bool = False) -> int:
    """Make ``loader``'s worker processes run on ``cpus``; idempotent.

    Wraps the loader's ``worker_init_fn`` (keeping the user's), so workers
    started from now on pin themselves; workers of a persistent iterator that
    already runs are pinned from here.

    Args:
        loader: a ``torch.utils.data.DataLoader`` or anything with
            ``num_workers`` and ``worker_init_fn`` attributes; others are skipped.
        cpus: the reserved CPUs.
        strict: raise instead of warning when a worker cannot be pinned.

    Returns:
        the number of running workers pinned from here.
    """
    if not hasattr(loader, "worker_init_fn") or not getattr(loader, "num_workers", 0):
        return 0
    current = loader.worker_init_fn
    if isinstance(current, WorkerAffinity):
        if current.cpus != tuple(sorted(set(cpus))) or current.strict != strict:
            loader.worker_init_fn = WorkerAffinity(cpus, current.user_fn, strict)
    else:
        loader.worker_init_fn = WorkerAffinity(cpus, current, strict)
    pinned = 0
    for pid in _live_worker_pids(loader):
        failures = _pin(cpus, pid)
        if failures:
            message = (f"running DataLoader worker {pid}: CPU affinity {_fmt(cpus)} "
                       f"not applied: {failures[0]}")
            if strict:
                raise BindError(message)
            emit(Diagnostic(BIND_NOT_APPLIED, message, "continuing without it"))
        else:
            pinned += 1
    if pinned:
        log.info("pinned %d running DataLoader worker(s) to CPUs %s", pinned, _fmt(cpus))
    return pinned


def training_plan(rank_plan: RankPlan, topology: Topology | None, count: int) -> tuple[RankPlan, str | None]:
    """The training threads' binding once ``count`` worker cores are reserved for DataLoader workers:
    ``rank_plan`` with fewer CPUs and proportionally fewer threads, or ``rank_plan`` and why not."""
    if not count:
        return rank_plan, None

    def core_of(cpu: int) -> int:
        try:
            return topology.cpu(cpu).core_key if topology is not None else cpu
        except KeyError:
            return cpu

    split = reserve_cores(rank_plan.cpus, core_of, count)
    cores = len({core_of(c) for c in rank_plan.cpus})
    if split is None:
        return rank_plan, (f'worker_cores={count} cannot be reserved: local rank {rank_plan.local_rank} has '
                           f'{cores} physical core(s) (CPUs {format_cpulist(rank_plan.cpus)}) and its training '
                           'threads need at least one')
    train, _ = split
    threads = max(1, rank_plan.num_threads * len({core_of(c) for c in train}) // cores)
    return dataclasses.replace(rank_plan, cpus=train, num_threads=threads), None
