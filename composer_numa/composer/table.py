"""The job's binding table: every rank's binding gathered over Composer's ``dist``, one table on rank 0.

The callback calls :func:`gather` at fit start; the table and the warnings across hosts are
:mod:`composer_numa.report.merge`'s (pure), this module only collects what is in force in this
rank and moves it between ranks.
"""

from __future__ import annotations

import logging
import socket

import torch
from composer.utils import dist

from composer_numa.binding import locality
from composer_numa.binding.session import Binding
from composer_numa.binding.verify import current
from composer_numa.diagnostics import BIND_NOT_APPLIED, emit
from composer_numa.plan import RankPlan
from composer_numa.report import merge
from composer_numa.units import parse_cpulist

log = logging.getLogger(__name__)

__all__ = ["gather", "record"]


def gather(binding: Binding | None, training: RankPlan | None, codes: set[str]) -> merge.Merged | None:
    """Send this rank's binding to every rank; on rank 0 log the job's table and warn about the
    hosts that differ, and return it (None on the other ranks, or when gathering failed)."""
    try:
        records = dist.all_gather_object(record(binding, training, codes))
    except Exception as e:  # the table is a report: never a reason to stop training
        log.info('binding table not gathered: %s: %s', type(e).__name__, e)
        return None
    if dist.get_global_rank() != 0:
        return None
    table = merge.from_records(records)
    log.info('%s', merge.render_table(table).rstrip())
    for diag in table.warnings:
        emit(diag)
    return table


def record(binding: Binding | None, training: RankPlan | None, codes: set[str]) -> dict:
    """This rank's binding as it is in force now (CPUs, policy and threads as the kernel and torch say)."""
    rank_plan = training or (binding.rank_plan if binding is not None else None)
    cpus, policy, memory_nodes = current()
    fraction = None
    if rank_plan is not None:
        try:
            fraction = locality.read_numa_maps().local_fraction(rank_plan.memory_nodes or rank_plan.numa_nodes)
        except OSError:
            fraction = None
    return merge.record(
        host=socket.gethostname() or 'unknown', node_rank=dist.get_node_rank(), rank=dist.get_global_rank(),
        local_rank=rank_plan.local_rank if rank_plan is not None else dist.get_local_rank(),
        gpu_pci_bus_id=None if rank_plan is None else rank_plan.gpu_pci_bus_id,
        nodes=() if rank_plan is None else rank_plan.numa_nodes, cpus=_cpulist(cpus), memory_policy=policy,
        memory_nodes=_cpulist(memory_nodes), threads=torch.get_num_threads(), local_memory_fraction=fraction,
        warnings=codes if binding is not None else (BIND_NOT_APPLIED,),
        topology=None if binding is None else binding.topology)


def _cpulist(text: str) -> tuple[int, ...]:
    """A cpulist as :func:`~composer_numa.binding.verify.current` gives it; empty when it said ``unknown``."""
    try:
        return parse_cpulist(text)
    except ValueError:
        return ()
