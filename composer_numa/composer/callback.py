"""Bind each rank's threads and memory to the NUMA node nearest its device."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from composer.core import Callback, Event, State, Time
from composer.devices import DeviceCPU, DeviceGPU
from composer.loggers import Logger
from composer.utils import create_interval_scheduler, dist

from composer_numa.binding import locality, workers
from composer_numa.binding.session import Binding, bind_rank, inherited, reassert
from composer_numa.binding.verify import current
from composer_numa.composer import checkpoint, table
from composer_numa.diagnostics import (
    BIND_NOT_APPLIED,
    BINDING_MISMATCH,
    OPTIONS_IGNORED,
    TOO_FEW_CORES,
    Diagnostic,
    emit,
)
from composer_numa.errors import ComposerNumaError, PlanError
from composer_numa.machine.sysfs import discover, read_numastat
from composer_numa.plan import PlanOptions, RankPlan, normalise
from composer_numa.report import merge
from composer_numa.units import format_cpulist

log = logging.getLogger(__name__)

__all__ = ['NumaAffinity']

_THREAD_ENV = 'OMP_NUM_THREADS'
_NUMASTAT_KEYS = ('numa_miss', 'other_node')

class NumaAffinity(Callback):
    """Binds each rank's threads and memory to the NUMA node nearest its GPU (or CPU share).

    On a multi-socket server every GPU hangs off one NUMA node. Training threads and host
    memory on the far socket pay remote-memory latency and bandwidth on every host-device
    copy and CPU-side step. This callback plans the rank's CPUs, memory policy and thread
    count from the machine's topology (see ``composer-numa report``) and applies them to the
    running process:

    * the CPU affinity of every existing thread (threads started later inherit it);
    * the memory policy (``preferred`` by default), and, with ``migrate=True``, moves the
      pages already allocated (model, optimizer state) onto the rank's memory nodes;
    * ``torch.set_num_threads`` (and the inter-op thread count, while torch still allows it)
      to the planned count, unless ``OMP_NUM_THREADS`` is set or ``num_threads`` is given;
    * DataLoader workers inherit the binding; ``worker_cores=k`` reserves ``k`` of the rank's
      physical cores for them and moves the training threads off those cores;
    * a checkpoint saved with ``torch.optim.AdamW`` resumes under ``NumaAdamW`` with its moments
      and step counts, and the reverse (:mod:`composer_numa.composer.checkpoint`).

    It binds at :attr:`.Event.INIT`, the first event of a Trainer, for the device the Trainer
    uses (a GPU, or a CPU run). Pages allocated before that (the model) are migrated. For the
    best locality, bind before the model is built by calling :meth:`bind` yourself; INIT then
    only re-plans if the device differs and otherwise re-pins threads that drifted. A process
    started by ``composer-numa launch`` or ``composer-numa exec`` (``COMPOSER_NUMA_BINDING``
    names this process) was bound at birth: the callback verifies that binding, reserves
    worker cores, sets torch's threads and logs it; its own ``mode``/``memory`` options are
    then ignored with an ``options-ignored`` warning (give them to ``launch``/``exec``).

    With several ranks, rank 0 logs every rank's binding in one table at fit start and warns about
    hosts that differ (:mod:`composer_numa.composer.table`; it keeps the table as :attr:`bindings`).

    A binding that cannot be applied (no NUMA syscalls, a cpuset, a node too small for a strict
    ``bind``) never stops training: a warning with a stable code (``bind-not-applied``,
    ``node-memory-insufficient``, ...) is emitted once and training goes on, unless
    ``strict=True``. On a machine with one NUMA node it logs what it found and changes nothing
    that matters.

    Example:
        .. doctest::

            >>> from composer import Trainer
            >>> from composer_numa import NumaAffinity
            >>> numa = NumaAffinity(mode='node', memory='preferred')
            >>> numa.bind()  # optional: bind before the model is built
            >>> model = make_model()
            >>> trainer = Trainer(
            ...     model=model,
            ...     train_dataloader=train_dataloader,
            ...     eval_dataloader=eval_dataloader,
            ...     optimizers=optimizer,
            ...     max_duration="1ep",
            ...     callbacks=[numa],
            ... )

    The binding is logged by the :class:`.Logger` as hyperparameters, and locality as metrics:

    +-----------------------------------+-------------------------------------------------------------+
    | Key                               | Logged data                                                 |
    +===================================+=============================================================+
    | ``numa/local_rank``               | Local rank the binding was planned for.                     |
    +-----------------------------------+-------------------------------------------------------------+
    | ``numa/gpu_pci_bus_id``           | PCI address of the rank's GPU (None for CPU-only ranks).    |
    +-----------------------------------+-------------------------------------------------------------+
    | ``numa/nodes``                    | NUMA nodes of the rank's CPUs, as a list string (``"0"``).  |
    +-----------------------------------+-------------------------------------------------------------+
    | ``numa/cpus``                     | CPUs the training threads run on, as a cpulist (``"0-15"``).|
    +-----------------------------------+-------------------------------------------------------------+
    | ``numa/worker_cpus``              | CPUs reserved for DataLoader workers (``""`` if none).      |
    +-----------------------------------+-------------------------------------------------------------+
    | ``numa/memory_policy``            | Memory policy in force (``preferred``, ``bind``, ...).      |
    +-----------------------------------+-------------------------------------------------------------+
    | ``numa/memory_nodes``             | Nodes of that policy, as a list string.                     |
    +-----------------------------------+-------------------------------------------------------------+
    | ``numa/num_threads``              | ``torch.get_num_threads()`` after binding.                  |
    +-----------------------------------+-------------------------------------------------------------+
    | ``numa/bound_at``                 | ``launch`` / ``exec`` (bound at process birth),             |
    |                                   | ``callback`` (bound here) or ``none`` (nothing applied).    |
    +-----------------------------------+-------------------------------------------------------------+
    | ``numa/machine``                  | One line describing the nodes, CPUs and GPUs found.         |
    +-----------------------------------+-------------------------------------------------------------+
    | ``numa/warnings``                 | Codes of the warnings raised for this rank, comma separated.|
    +-----------------------------------+-------------------------------------------------------------+
    | ``numa/local_memory_fraction``    | Metric: the process's resident memory on its memory nodes / |
    |                                   | all of it (anonymous, heap, shared memory; not file cache), |
    |                                   | from ``numa_maps``, at fit start, every ``log_locality``    |
    |                                   | interval and fit end.                                       |
    +-----------------------------------+-------------------------------------------------------------+
    | ``numa/node{N}/numa_miss``,       | Metric: increase of node N's ``numastat`` counters since the|
    | ``numa/node{N}/other_node``       | previous reading (machine-wide remote allocations).         |
    +-----------------------------------+-------------------------------------------------------------+

    Args:
        mode (str, optional): Which CPUs a rank gets: ``'node'`` (its GPU's NUMA node),
            ``'socket'``, ``'exclusive'`` (a disjoint share of the node's physical cores per rank),
            ``'core-complex'`` (one L3 domain) or ``'none'`` (leave CPU affinity alone).
            Default: ``'node'``.
        memory (str, optional): Memory policy: ``'preferred'``, ``'bind'``, ``'interleave'``,
            ``'local'`` or ``'none'``. Default: ``'preferred'``.
        memory_need (int | str, optional): Host memory one rank needs on its node, in bytes or as
            a size such as ``'380G'``; a ``bind`` the node cannot hold falls back to
            ``preferred`` with a warning. Default: ``None``.
        memory_target (str, optional): ``'local'`` (the rank's own nodes) or ``'hbm'`` (the
            CPU-less memory nodes attached to them: HBM in flat mode, CXL). Default: ``'local'``.
        num_threads (int, optional): Intra-op threads to use instead of the planned count.
            Default: ``None`` (the plan's count, unless ``OMP_NUM_THREADS`` is set).
        worker_cores (int, optional): Physical cores of the rank's share reserved for its
            DataLoader workers; the training threads move off them. Default: ``0`` (workers
            share the rank's CPUs).
        migrate (bool, optional): Move pages allocated before binding onto the rank's memory
            nodes. Default: ``True``.
        keep_pinned_threads (bool, optional): Leave alone threads whose CPU affinity differs from
            the main thread's (a library pinned them on purpose). Default: ``True``.
        strict (bool, optional): Raise :class:`~composer_numa.errors.ComposerNumaError` when the
            binding cannot be planned or applied as asked, instead of warning. Default: ``False``.
        log_locality (bool | int | str | Time, optional): Log the locality metrics: ``False``
            turns them off, ``True`` logs at fit start, every epoch end and fit end, an interval
            (an int is in epochs, or ``'100ba'``, ``'1ep'``) sets how often. Default: ``True``.
        binding_table (bool, optional): With several ranks, gather every rank's binding at fit start
            for rank 0's table (``bindings``: a :class:`~composer_numa.report.merge.Merged`). Default: ``True``.
    """

    def __init__(
        self,
        mode: str | None = None,
        memory: str | None = None,
        memory_need: int | str | None = None,
        memory_target: str | None = None,
        num_threads: int | None = None,
        worker_cores: int = 0,
        migrate: bool = True,
        keep_pinned_threads: bool = True,
        strict: bool = False,
        log_locality: bool | int | str | Time = True,
        binding_table: bool = True,
    ) -> None:
        given = {'mode': mode, 'memory': memory, 'memory_need': memory_need, 'memory_target': memory_target}
        self._explicit = {k for k, v in given.items() if v is not None}
        try:
            self.options = normalise(PlanOptions(mode=mode or 'node', memory=memory or 'preferred',
                                                 memory_need=memory_need, memory_target=memory_target or 'local'))
        except ComposerNumaError as e:
            raise ValueError(f'NumaAffinity: {e}') from None
        if num_threads is not None and not _is_count(num_threads, minimum=1):
            raise ValueError(f'NumaAffinity: num_threads must be a positive integer, got {num_threads!r}')
        if not _is_count(worker_cores, minimum=0):
            raise ValueError(f'NumaAffinity: worker_cores must be a non-negative integer, got {worker_cores!r}')
        self.num_threads = None if num_threads is None else int(num_threads)
        self.worker_cores = int(worker_cores)
        self.migrate = bool(migrate)
        self.keep_pinned_threads = bool(keep_pinned_threads)
        self.strict = bool(strict)
        self._locality_due = None
        if log_locality is not False and log_locality is not None:
            interval = '1ep' if log_locality is True else log_locality
            try:
                self._locality_due = create_interval_scheduler(interval, include_end_of_training=False,
                                                               checkpoint_events=False)
            except (ValueError, NotImplementedError, TypeError) as e:
                raise ValueError(f'NumaAffinity: log_locality {log_locality!r} is not a bool or an interval: {e}',
                                 ) from None
        self._binding: Binding | None = None
        self._codes: set[str] = set()  # warning codes of the current binding, for numa/warnings
        self._device: int | str | None = None
        self._training: RankPlan | None = None  # the rank's binding minus the worker cores
        self._worker_cpus: tuple[int, ...] = ()
        self._numastat: dict[int, dict[str, int]] | None = None
        self._locality_batch: int | None = None
        self._locality_unreadable = False
        self.binding_table = bool(binding_table)
        self.bindings: merge.Merged | None = None

    # -- binding -----------------------------------------------------------------------------

    def bind(self, device: int | str | None = 'auto') -> Binding:
        """Bind this process now (the callback also does it at :attr:`.Event.INIT`).

        Call it before building the model so that its memory is allocated on the rank's node
        from the start. Calling it again for the same device re-pins threads that drifted.

        Args:
            device: the CUDA ordinal the rank drives, ``'cpu'`` for a CPU run, or ``'auto'``
                (local rank r drives GPU r; a CPU run on a machine without GPUs).

        Returns:
            What was done (:class:`~composer_numa.binding.session.Binding`).
        """
        if self._binding is not None and device == self._device:
            if self._training is not None and reassert(self._training, strict=self.strict,
                                                       respect_pinned=self.keep_pinned_threads):
                self._codes.add(BINDING_MISMATCH)
            return self._binding
        self._codes = set()
        found = inherited()
        if found is not None and found[1].get('bound_at') in ('exec', 'launch'):
            binding = self._adopt(*found)
        else:
            binding = self._bind(device, found[1] if found is not None else None)
        if device == 'auto' and binding.rank_plan is not None:  # remember what 'auto' turned out to be
            device = 'cpu' if binding.rank_plan.gpu is None else binding.rank_plan.gpu
        self._binding, self._device = binding, device
        self._codes |= set(binding.codes)
        self._numastat = read_numastat()
        return binding

    def _bind(self, device: int | str | None, earlier: dict | None) -> Binding:
        allowed = None
        if earlier is not None:
            # An earlier binding of ours narrowed the affinity: plan from the cpuset it started from,
            # and drop the thread variables it set (they describe that binding, not this one).
            allowed = tuple(earlier.get('allowed_cpus') or ()) or None
            for var, value in ((earlier.get('applied') or {}).get('env') or {}).items():
                if os.environ.get(var) == value:
                    del os.environ[var]
        binding = bind_rank(self.options, device=device, strict=self.strict, migrate=self.migrate,
                            respect_pinned=self.keep_pinned_threads, bound_at='callback', allowed_cpus=allowed,
                            adjust=self._reserve_worker_cores)
        if binding.applied is not None:
            self._set_threads(binding.applied.plan, binding.document or {})
        return binding

    def _adopt(self, rank_plan: RankPlan, doc: dict) -> Binding:
        """Keep the binding made at process birth: say which options it overrides, check it is still
        in force, reserve worker cores, set torch's threads."""
        bound_at = str(doc.get('bound_at'))
        theirs = doc.get('options') or {}
        ignored = [f'{k}={_value(getattr(self.options, k))!r}' for k in sorted(self._explicit)
                   if k in theirs and _value(getattr(self.options, k)) != theirs[k]]
        if ignored:
            self._codes.add(OPTIONS_IGNORED)
            emit(Diagnostic(OPTIONS_IGNORED,
                            f"NumaAffinity({', '.join(ignored)}) differs from the binding composer-numa "
                            f"{bound_at} made for this rank",
                            f'the {bound_at} binding is kept; give these options to composer-numa {bound_at} '
                            '(--numa-* for launch)'))
        try:
            topology = discover()
        except ComposerNumaError:
            topology = None
        training = self._reserve_worker_cores(rank_plan, topology)
        if reassert(rank_plan, target=training, strict=self.strict, migrate=self.migrate,
                    respect_pinned=self.keep_pinned_threads, what=f'the binding made by composer-numa {bound_at}'):
            self._codes.add(BINDING_MISMATCH)
        self._set_threads(training, doc)
        return Binding(None, topology, None, rank_plan, None, bound_at, (), doc)

    def _reserve_worker_cores(self, rank_plan: RankPlan, topology: Any) -> RankPlan:
        """The training threads' binding: ``rank_plan`` without the cores reserved for DataLoader workers."""
        training, problem = workers.training_plan(rank_plan, topology, self.worker_cores)
        self._worker_cpus = tuple(sorted(set(rank_plan.cpus) - set(training.cpus)))
        if problem is not None:
            if self.strict:
                raise PlanError(f'NumaAffinity(strict=True): {problem}')
            self._codes.add(TOO_FEW_CORES)
            emit(Diagnostic(TOO_FEW_CORES, problem, 'DataLoader workers share its CPUs'))
        self._training = training
        return training

    def _set_threads(self, training: RankPlan, doc: dict) -> None:
        threads = self._threads_wanted(training.num_threads, (doc.get('applied') or {}).get('env') or {})
        if threads is not None and threads != torch.get_num_threads():
            _set_torch_threads(threads)

    def _threads_wanted(self, planned: int, ours: dict[str, str]) -> int | None:
        """The intra-op thread count to set, or None to leave torch's alone."""
        if self.num_threads is not None:
            return self.num_threads
        user_value = (os.environ.get(_THREAD_ENV) or '').strip()
        if user_value and user_value != '0' and user_value != ours.get(_THREAD_ENV):
            log.info('%s=%s is set: torch keeps %d intra-op threads (the plan says %d)', _THREAD_ENV, user_value,
                     torch.get_num_threads(), planned)
            return None
        return planned

    # -- events ------------------------------------------------------------------------------

    def init(self, state: State, logger: Logger) -> None:
        self.bind(_device_of(state))
        logger.log_hyperparameters(self._hyperparameters())

    def before_load(self, state: State, logger: Logger) -> None:
        checkpoint.install(state)  # AdamW <-> NumaAdamW: rename the optimizer state on load

    def after_load(self, state: State, logger: Logger) -> None:
        checkpoint.uninstall(state)

    def fit_start(self, state: State, logger: Logger) -> None:
        self._pin_workers([state.dataloader, state.train_dataloader,
                           *(evaluator.dataloader for evaluator in state.evaluators)])
        if self.binding_table and dist.is_initialized() and dist.get_world_size() > 1:
            self.bindings = table.gather(self._binding, self._training, self._codes)
        if self._locality_due is not None:
            self._log_locality(state, logger)

    def eval_start(self, state: State, logger: Logger) -> None:
        self._pin_workers([state.dataloader])

    def eval_standalone_start(self, state: State, logger: Logger) -> None:
        self._pin_workers([evaluator.dataloader for evaluator in state.evaluators])

    def predict_start(self, state: State, logger: Logger) -> None:
        self._pin_workers([state.dataloader])

    def epoch_end(self, state: State, logger: Logger) -> None:
        self._maybe_log_locality(state, logger, Event.EPOCH_END)

    def batch_end(self, state: State, logger: Logger) -> None:
        self._maybe_log_locality(state, logger, Event.BATCH_END)

    def iteration_end(self, state: State, logger: Logger) -> None:
        self._maybe_log_locality(state, logger, Event.ITERATION_END)

    def fit_end(self, state: State, logger: Logger) -> None:
        if self._locality_due is not None and self._locality_batch != int(state.timestamp.batch):
            self._log_locality(state, logger)

    def state_dict(self) -> dict[str, Any]:
        # The binding belongs to the process and the machine, not to the checkpoint.
        return {}

    # -- workers and logging ------------------------------------------------------------------

    def _pin_workers(self, loaders: list) -> None:
        if not self._worker_cpus:
            return
        seen: set[int] = set()
        for loader in loaders:
            loader = getattr(loader, 'dataloader', loader)  # DataSpec -> its dataloader
            if loader is not None and id(loader) not in seen:
                seen.add(id(loader))
                workers.install(loader, self._worker_cpus, strict=self.strict)

    def _hyperparameters(self) -> dict[str, Any]:
        b = self._binding
        rank_plan = b.rank_plan if b is not None else None
        cpus, policy, memory_nodes = current()
        return {
            'numa/local_rank': rank_plan.local_rank if rank_plan is not None else int(os.environ.get('LOCAL_RANK', 0)),
            'numa/gpu_pci_bus_id': None if rank_plan is None else rank_plan.gpu_pci_bus_id,
            'numa/nodes': '' if rank_plan is None else format_cpulist(rank_plan.numa_nodes),
            'numa/cpus': cpus,
            'numa/worker_cpus': format_cpulist(self._worker_cpus),
            'numa/memory_policy': policy,
            'numa/memory_nodes': memory_nodes,
            'numa/num_threads': torch.get_num_threads(),
            'numa/bound_at': b.bound_at if b is not None else 'none',
            'numa/machine': 'unknown (the machine could not be read)' if b is None or b.topology is None
                            else b.topology.summary(),
            'numa/warnings': ','.join(sorted(self._codes)) if b is not None else BIND_NOT_APPLIED,
        }

    def _maybe_log_locality(self, state: State, logger: Logger, event: Event) -> None:
        if self._locality_due is not None and self._locality_due(state, event):
            self._log_locality(state, logger)

    def _log_locality(self, state: State, logger: Logger) -> None:
        self._locality_batch = int(state.timestamp.batch)
        metrics: dict[str, float] = {}
        plan_ = self._training
        if plan_ is not None and not self._locality_unreadable:
            try:
                maps = locality.read_numa_maps()
            except OSError as e:
                self._locality_unreadable = True
                log.info('numa/local_memory_fraction not logged: /proc/self/numa_maps unreadable (%s)', e)
            else:
                fraction = maps.local_fraction(plan_.memory_nodes or plan_.numa_nodes)
                if fraction is not None:
                    metrics['numa/local_memory_fraction'] = fraction
        counters = read_numastat()
        if counters and self._numastat is not None:
            for node, values in counters.items():
                before = self._numastat.get(node, {})
                for key in _NUMASTAT_KEYS:
                    if key in values:
                        metrics[f'numa/node{node}/{key}'] = values[key] - before.get(key, values[key])
        self._numastat = counters or self._numastat
        if metrics:
            logger.log_metrics(metrics)


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _value(option: Any) -> Any:
    return option.value if hasattr(option, 'value') else option


def _device_of(state: State) -> int | str:
    """The CUDA ordinal the Trainer runs on, ``'cpu'`` for a CPU run, ``'auto'`` for other devices."""
    if isinstance(state.device, DeviceGPU):
        return torch.cuda.current_device()  # DeviceGPU made it the current device
    if isinstance(state.device, DeviceCPU):
        return 'cpu'
    return 'auto'


def _set_torch_threads(count: int) -> None:
    torch.set_num_threads(count)
    try:
        torch.set_num_interop_threads(count)
    except RuntimeError as e:
        # Allowed only once, before any inter-op work has started.
        log.info('inter-op threads left at %d: %s', torch.get_num_interop_threads(), e)
