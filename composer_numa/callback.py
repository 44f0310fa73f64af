"""Bind each rank's threads and memory to the NUMA node nearest its device."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from composer.core import Callback, Event, State, Time
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler

from composer_numa import bind, dataloader_workers, linux, locality
from composer_numa.cpulist import format_cpulist, format_size, parse_size
from composer_numa.diagnostics import (
    BIND_NOT_APPLIED,
    BINDING_MISMATCH,
    CPUSET_EXCLUDES_GPU_NODE,
    GPU_NUMA_UNKNOWN,
    NODE_MEMORY_INSUFFICIENT,
    TOO_FEW_CORES,
    Diagnostic,
    emit,
)
from composer_numa.errors import BindError, ComposerNumaError, PlanError
from composer_numa.plan import MemoryPolicy, Mode, PlanOptions, RankPlan, plan
from composer_numa.topology import Topology, discover

log = logging.getLogger(__name__)

__all__ = ['NumaAffinity']

# Planner warnings meaning "what you asked for is not what you get": errors under ``strict``.
_UNMET = (NODE_MEMORY_INSUFFICIENT, CPUSET_EXCLUDES_GPU_NODE, GPU_NUMA_UNKNOWN, TOO_FEW_CORES)
# Thread-count variables a user may set to keep the callback's hands off torch's thread count.
_THREAD_ENV = 'OMP_NUM_THREADS'
_NODE_SYSFS = '/sys/devices/system/node'
_NUMASTAT_KEYS = ('numa_miss', 'other_node')
# Environment variables this module set in this process (any instance), so they are not taken for the user's.
_ENV_SET: dict[str, str] = {}
# The allowed CPUs of this process when it was first read, before any binding of ours.
_ALLOWED_AT_START: tuple[int, ...] | None = None


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
      physical cores for them and moves the training threads off those cores.

    It binds when it is constructed, so build it before the model and the Trainer for the best
    locality; at :attr:`.Event.INIT` it re-plans for the device the Trainer actually uses (a
    CPU run, another GPU) and otherwise does nothing twice. A process started by
    ``composer-numa launch`` or ``composer-numa exec`` (``COMPOSER_NUMA_BINDING`` is set) was
    bound at birth: the callback then only verifies that binding and logs it.

    A binding that cannot be applied (no NUMA syscalls, a cpuset, a node too small for a strict
    ``bind``) never stops training: a warning with a stable code (``bind-not-applied``,
    ``node-memory-insufficient``, ...) is emitted once and training goes on, unless
    ``strict=True``. On a machine with one NUMA node it logs what it found and changes nothing
    that matters.

    Example:
        .. doctest::

            >>> from composer import Trainer
            >>> from composer_numa import NumaAffinity
            >>> # constructing trainer object with this callback
            >>> trainer = Trainer(
            ...     model=model,
            ...     train_dataloader=train_dataloader,
            ...     eval_dataloader=eval_dataloader,
            ...     optimizers=optimizer,
            ...     max_duration="1ep",
            ...     callbacks=[NumaAffinity(mode='node', memory='preferred')],
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
        num_threads (int, optional): Intra-op threads to use instead of the planned count.
            Default: ``None`` (the plan's count, unless ``OMP_NUM_THREADS`` is set).
        worker_cores (int, optional): Physical cores of the rank's share reserved for its
            DataLoader workers; the training threads move off them. Default: ``0`` (workers
            share the rank's CPUs).
        migrate (bool, optional): Move pages allocated before binding onto the rank's memory
            nodes. Default: ``True``.
        strict (bool, optional): Raise :class:`~composer_numa.errors.ComposerNumaError` when the
            binding cannot be planned or applied as asked, instead of warning. Default: ``False``.
        log_locality (bool | int | str | Time, optional): Log the locality metrics: ``False``
            turns them off, ``True`` logs at fit start, every epoch end and fit end, an interval
            (an int is in epochs, or ``'100ba'``, ``'1ep'``) sets how often. Default: ``True``.
    """

    def __init__(
        self,
        mode: str = 'node',
        memory: str = 'preferred',
        memory_need: int | str | None = None,
        num_threads: int | None = None,
        worker_cores: int = 0,
        migrate: bool = True,
        strict: bool = False,
        log_locality: bool | int | str | Time = True,
    ) -> None:
        try:
            self.mode = Mode(mode)
        except ValueError:
            raise ValueError(f'NumaAffinity: unknown mode {mode!r}; '
                             f'choose one of {", ".join(m.value for m in Mode)}') from None
        try:
            self.memory = MemoryPolicy(memory)
        except ValueError:
            raise ValueError(f'NumaAffinity: unknown memory policy {memory!r}; '
                             f'choose one of {", ".join(m.value for m in MemoryPolicy)}') from None
        try:
            self.memory_need = None if memory_need is None else parse_size(memory_need)
        except ComposerNumaError as e:
            raise ValueError(f'NumaAffinity: memory_need: {e}') from None
        if num_threads is not None and not _is_count(num_threads, minimum=1):
            raise ValueError(f'NumaAffinity: num_threads must be a positive integer, got {num_threads!r}')
        if not _is_count(worker_cores, minimum=0):
            raise ValueError(f'NumaAffinity: worker_cores must be a non-negative integer, got {worker_cores!r}')
        self.num_threads = None if num_threads is None else int(num_threads)
        self.worker_cores = int(worker_cores)
        self.migrate = bool(migrate)
        self.strict = bool(strict)
        self.log_locality = log_locality
        if log_locality is False or log_locality is None:
            self._locality_due = None
        else:
            interval = '1ep' if log_locality is True else log_locality
            try:
                self._locality_due = create_interval_scheduler(
                    interval,
                    include_end_of_training=False,
                    checkpoint_events=False,
                )
            except (ValueError, NotImplementedError, TypeError) as e:
                raise ValueError(f'NumaAffinity: log_locality {log_locality!r} is not a bool or an interval: {e}',
                                ) from None

        self._topology: Topology | None = None
        self._key: tuple | None = None  # (local rank, local world size, device) of the current binding
        self._rank_plan: RankPlan | None = None  # the rank's planned (or launch) binding
        self._effective: RankPlan | None = None  # what the training threads got (minus worker cores)
        self._worker_cpus: tuple[int, ...] = ()
        self._bound_at = 'none'
        self._codes: list[str] = []
        self._numastat: dict[int, dict[str, int]] | None = None
        self._locality_batch: int | None = None
        self._locality_unreadable = False

        # As early as a callback can: before the Trainer builds dataloaders, workers and threads.
        self._bind(self._guess_device(), when='construction')
        self._numastat = _read_numastat()

    # -- events ------------------------------------------------------------------------------

    def init(self, state: State, logger: Logger) -> None:
        self._bind(_device_of(state), when='Event.INIT')
        logger.log_hyperparameters(self._hyperparameters())

    def fit_start(self, state: State, logger: Logger) -> None:
        loaders = [state.dataloader, state.train_dataloader]
        loaders += [evaluator.dataloader for evaluator in state.evaluators]
        self._pin_workers(loaders)
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

    # -- binding -----------------------------------------------------------------------------

    def _bind(self, device: int | None, when: str) -> None:
        """Plan and apply (or verify) the binding for this rank driving ``device`` (None: CPU)."""
        local_rank, nproc = _local_rank_and_size()
        key = (local_rank, nproc, device)
        if key == self._key:
            self._reassert()
            return
        try:
            launched = bind.binding_from_env()
        except ComposerNumaError as e:
            if self.strict:
                raise
            emit(Diagnostic(BINDING_MISMATCH, f'{e}; planning in the callback instead'))
            launched = None
        if launched is not None and launched[1].get('pid', os.getpid()) != os.getpid():
            # Inherited from an ancestor that was bound, not made for this process (exec keeps the PID).
            log.info('ignoring COMPOSER_NUMA_BINDING of process %s: this is process %d', launched[1].get('pid'),
                     os.getpid())
            launched = None
        if launched is not None:
            self._adopt(launched[0], str(launched[1].get('bound_at') or 'launch'), launched[1])
        else:
            self._plan_and_apply(local_rank, nproc, device, when)
        self._key = key

    def _machine(self) -> Topology:
        if self._topology is None:
            self._topology = _discover()
        return self._topology

    def _guess_device(self) -> int | None:
        """The GPU Composer's default device will use (``cuda:<local rank>``), None for a CPU run.

        Answered from sysfs (``CUDA_VISIBLE_DEVICES`` honoured) without initialising CUDA;
        :attr:`.Event.INIT` corrects it from the Trainer's real device.
        """
        try:
            gpus = self._machine().gpus
        except ComposerNumaError:
            return None
        return _local_rank_and_size()[0] if gpus else None

    def _plan(self, local_rank: int, nproc: int, device: int | None) -> tuple[Topology, RankPlan, list[Diagnostic]]:
        topology = self._machine()
        options = PlanOptions(nproc=nproc, mode=self.mode, memory=self.memory, memory_need=self.memory_need)
        rank_plan, diagnostics = _plan_rank(topology, options, local_rank, device)
        return topology, rank_plan, diagnostics

    def _split_workers(self, rank_plan: RankPlan, topology: Topology | None) -> tuple[RankPlan, str | None]:
        """The training threads' binding once ``worker_cores`` are reserved, or why that failed."""
        self._worker_cpus = ()
        if not self.worker_cores:
            return rank_plan, None

        def core_of(cpu: int) -> int:
            try:
                return topology.cpu(cpu).core_key if topology is not None else cpu
            except KeyError:
                return cpu

        split = dataloader_workers.reserve_cores(rank_plan.cpus, core_of, self.worker_cores)
        if split is None:
            cores = len({core_of(c) for c in rank_plan.cpus})
            return rank_plan, (f'worker_cores={self.worker_cores} cannot be reserved: local rank '
                               f'{rank_plan.local_rank} has {cores} physical core(s) '
                               f'(CPUs {_fmt(rank_plan.cpus)}) and its training threads need at '
                               'least one; DataLoader workers share its CPUs')
        train, reserved = split
        self._worker_cpus = reserved
        threads = max(1, rank_plan.num_threads * len({core_of(c) for c in train}) //
                      len({core_of(c) for c in rank_plan.cpus}))
        return dataclasses.replace(rank_plan, cpus=train, num_threads=threads), None

    def _threads_wanted(self, planned: int, launch_env: dict[str, str]) -> int | None:
        """The intra-op thread count to set, or None to leave torch's alone."""
        if self.num_threads is not None:
            return self.num_threads
        user_value = os.environ.get(_THREAD_ENV)
        ours = launch_env.get(_THREAD_ENV) or _ENV_SET.get(_THREAD_ENV)
        if user_value and user_value != ours:
            log.info('%s=%s is set: torch keeps %d intra-op threads (the plan says %d)', _THREAD_ENV, user_value,
                     torch.get_num_threads(), planned)
            return None
        return planned

    def _plan_and_apply(self, local_rank: int, nproc: int, device: int | None, when: str) -> None:
        try:
            topology, rank_plan, diagnostics = self._plan(local_rank, nproc, device)
        except ComposerNumaError as e:
            # Non-Linux, no sysfs, a broken tree: say what was found and touch nothing.
            if self.strict:
                raise
            emit(Diagnostic(BIND_NOT_APPLIED, f'local rank {local_rank}: the machine could not be read '
                            f'({e}); training without NUMA binding'))
            self._codes = [BIND_NOT_APPLIED]
            self._bound_at = 'none'
            return
        unmet = [d for d in diagnostics if d.code in _UNMET]
        effective, split_problem = self._split_workers(rank_plan, topology)
        if self.strict and (unmet or split_problem):
            reasons = [str(d) for d in unmet] + ([f'[{TOO_FEW_CORES}] {split_problem}'] if split_problem else [])
            raise PlanError(f'NumaAffinity(strict=True): local rank {local_rank} cannot be bound as asked: ' +
                            '; '.join(reasons))
        # Machine-wide findings once per host; this rank's unmet requests on every rank.
        for diag in diagnostics:
            if local_rank == 0 or diag.code in _UNMET:
                emit(diag)
        if split_problem:
            emit(Diagnostic(TOO_FEW_CORES, split_problem))
        codes = [d.code for d in diagnostics] + ([TOO_FEW_CORES] if split_problem else [])

        threads = self._threads_wanted(effective.num_threads, {})
        if threads is not None:
            effective = dataclasses.replace(effective, num_threads=threads)
        # Variables set by an earlier binding in this process describe that binding, not this one.
        for var, value in list(_ENV_SET.items()):
            if os.environ.get(var) == value:
                del os.environ[var]
            del _ENV_SET[var]
        applied = bind.apply(effective, strict=self.strict, migrate=self.migrate, set_env=threads is not None)
        _ENV_SET.update(applied.env)
        if not applied.ok:
            codes.append(BIND_NOT_APPLIED)
        if threads is not None:
            _set_torch_threads(threads)
        self._rank_plan, self._effective = rank_plan, effective
        self._codes = sorted(set(codes))
        self._bound_at = 'callback' if applied.cpus is not None or applied.memory_policy is not None else 'none'
        log.info('local rank %d bound at %s: CPUs %s, memory %s on nodes %s, %d threads%s', local_rank, when,
                 _fmt(effective.cpus), applied.memory_policy or 'unchanged', _fmt(applied.memory_nodes),
                 torch.get_num_threads(),
                 f', pages left on other nodes: {applied.pages_not_migrated}' if applied.pages_not_migrated else '')

    def _adopt(self, launch_plan: RankPlan, bound_at: str, doc: dict) -> None:
        """Keep the binding made at process birth: verify it, reserve worker cores, log it."""
        try:
            topology = self._machine()
        except ComposerNumaError:
            topology = None
        effective, split_problem = self._split_workers(launch_plan, topology)
        if split_problem:
            if self.strict:
                raise PlanError(f'NumaAffinity(strict=True): {split_problem}')
            emit(Diagnostic(TOO_FEW_CORES, split_problem))
        codes = [TOO_FEW_CORES] if split_problem else []
        # Threads already moved off the worker cores (an earlier pass, another instance) are as asked.
        differences = [d for d in bind.verify(launch_plan)
                       if not (d.what == 'cpus' and d.actual == _fmt(effective.cpus))]
        if differences:
            message = (f'local rank {launch_plan.local_rank}: the binding made by composer-numa {bound_at} is no '
                       'longer in force: ' + '; '.join(str(d) for d in differences))
            if self.strict:
                raise BindError(message)
            emit(Diagnostic(BINDING_MISMATCH, message + ' (re-applied)'))
            codes.append(BINDING_MISMATCH)
        launch_env = dict((doc.get('applied') or {}).get('env') or {})
        threads = self._threads_wanted(effective.num_threads, launch_env)
        if threads is not None:
            effective = dataclasses.replace(effective, num_threads=threads)
        if differences:
            bind.apply(effective, strict=self.strict, migrate=self.migrate, set_env=False)
        elif effective.cpus != launch_plan.cpus:
            self._pin_training_threads(effective.cpus)
        if threads is not None and threads != torch.get_num_threads():
            _set_torch_threads(threads)
        self._rank_plan, self._effective = launch_plan, effective
        self._codes = sorted(set(codes))
        self._bound_at = bound_at
        log.info('local rank %d was bound by composer-numa %s: CPUs %s, memory %s on nodes %s', launch_plan.local_rank,
                 bound_at, _fmt(effective.cpus), launch_plan.memory_policy.value, _fmt(launch_plan.memory_nodes))

    def _pin_training_threads(self, cpus: tuple[int, ...]) -> None:
        failures = dataloader_workers.pin_process(cpus)
        if failures:
            message = f'CPU affinity {_fmt(cpus)} not applied to {len(failures)} thread(s): {failures[0]}'
            if self.strict:
                raise BindError(message)
            emit(Diagnostic(BIND_NOT_APPLIED, message + ' (continuing without it)'))

    def _reassert(self) -> None:
        """Same rank, same device: re-pin threads that drifted (a library may have pinned its own)."""
        if self._effective is None:
            return
        drifted = [d for d in bind.verify(self._effective, bind.read_back(pages=False)) if d.what == 'cpus']
        if drifted:
            log.info('re-pinning threads: %s', '; '.join(str(d) for d in drifted))
            self._pin_training_threads(self._effective.cpus)

    def _pin_workers(self, loaders: list) -> None:
        if not self._worker_cpus:
            return
        seen: set[int] = set()
        for loader in loaders:
            loader = getattr(loader, 'dataloader', loader)  # DataSpec -> its dataloader
            if loader is None or id(loader) in seen:
                continue
            seen.add(id(loader))
            dataloader_workers.install(loader, self._worker_cpus, strict=self.strict)

    # -- logging -----------------------------------------------------------------------------

    def _hyperparameters(self) -> dict[str, Any]:
        local_rank, _ = _local_rank_and_size()
        rank_plan = self._rank_plan
        try:
            cpus = _fmt(linux.get_affinity())
        except OSError:
            cpus = _fmt(self._effective.cpus) if self._effective is not None else ''
        try:
            mode, nodes = linux.get_mempolicy()
            policy, memory_nodes = linux.POLICY_NAMES.get(mode, str(mode)), _fmt(nodes) if nodes else ''
        except OSError:
            policy, memory_nodes = 'unknown', ''
        return {
            'numa/local_rank': local_rank if rank_plan is None else rank_plan.local_rank,
            'numa/gpu_pci_bus_id': None if rank_plan is None else rank_plan.gpu_pci_bus_id,
            'numa/nodes': '' if rank_plan is None else _fmt(rank_plan.numa_nodes),
            'numa/cpus': cpus,
            'numa/worker_cpus': _fmt(self._worker_cpus) if self._worker_cpus else '',
            'numa/memory_policy': policy,
            'numa/memory_nodes': memory_nodes,
            'numa/num_threads': torch.get_num_threads(),
            'numa/bound_at': self._bound_at,
            'numa/machine': _describe(self._topology),
            'numa/warnings': ','.join(self._codes),
        }

    def _maybe_log_locality(self, state: State, logger: Logger, event: Event) -> None:
        if self._locality_due is not None and self._locality_due(state, event):
            self._log_locality(state, logger)

    def _log_locality(self, state: State, logger: Logger) -> None:
        self._locality_batch = int(state.timestamp.batch)
        metrics: dict[str, float] = {}
        plan_ = self._effective
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
        counters = _read_numastat()
        if counters and self._numastat is not None:
            for node, values in counters.items():
                before = self._numastat.get(node, {})
                for key in _NUMASTAT_KEYS:
                    if key in values:
                        metrics[f'numa/node{node}/{key}'] = values[key] - before.get(key, values[key])
        self._numastat = counters or self._numastat
        if metrics:
            logger.log_metrics(metrics)


# -- helpers -----------------------------------------------------------------------------------


def _fmt(ids) -> str:
    return format_cpulist(ids)


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _plan_rank(topology: Topology, options: PlanOptions, local_rank: int,
               device: int | None) -> tuple[RankPlan, list[Diagnostic]]:
    """Plan the host and pick the binding of ``local_rank`` driving GPU ``device`` (None: a CPU run).

    Returns:
        the rank's plan and the machine's and planner's warnings.
    """
    if device is None:
        # A CPU run on a GPU host: ranks are spread over the CPU nodes, not after GPUs they don't use.
        topology = dataclasses.replace(topology, gpus=())
    result = plan(topology, options)
    rank_plan = result.ranks[local_rank]
    if device is not None and rank_plan.gpu != device:
        # The Trainer drives another GPU than local rank r -> GPU r: use the plan made for that GPU.
        if device >= options.nproc:
            result = plan(topology, dataclasses.replace(options, nproc=device + 1))
        match = [r for r in result.ranks if r.gpu == device]
        if match:
            rank_plan = dataclasses.replace(match[0], local_rank=local_rank)
    return rank_plan, [*topology.diagnostics, *result.warnings]


def _local_rank_and_size() -> tuple[int, int]:
    """Composer's view of this rank; the launcher's variables if Composer has none."""
    try:
        return dist.get_local_rank(), dist.get_local_world_size()
    except Exception:  # composer raises its own MissingEnvironmentError when dist is half set up
        from composer_numa import rankenv

        found = rankenv.resolve()
        return found.local_rank, found.local_world_size or 1


def _discover() -> Topology:
    """The machine, with the CPUs this process was allowed before any binding of ours.

    The kernel reports a process's allowed CPUs (``Cpus_allowed_list``) as its current affinity,
    which an earlier binding in this process has narrowed; a later plan (another Trainer, another
    device) must start from what the process was given, not from what we made of it.
    """
    global _ALLOWED_AT_START
    topology = discover()
    if _ALLOWED_AT_START is None:
        _ALLOWED_AT_START = topology.allowed_cpus
    elif topology.allowed_cpus != _ALLOWED_AT_START:
        online = {cpu.id for cpu in topology.cpus}
        allowed = tuple(c for c in _ALLOWED_AT_START if c in online)
        if allowed:
            topology = dataclasses.replace(topology, allowed_cpus=allowed)
    return topology


def _device_of(state: State) -> int | None:
    """Ordinal of the CUDA device the Trainer runs on; None for CPU (and non-CUDA) devices."""
    device = getattr(state.device, '_device', None)
    if isinstance(device, torch.device) and device.type == 'cuda':
        return device.index if device.index is not None else torch.cuda.current_device()
    return None


def _set_torch_threads(count: int) -> None:
    torch.set_num_threads(count)
    try:
        torch.set_num_interop_threads(count)
    except RuntimeError as e:
        # Allowed only once, before any inter-op work has started.
        log.info('inter-op threads left at %d: %s', torch.get_num_interop_threads(), e)


def _read_numastat(root: str = _NODE_SYSFS) -> dict[int, dict[str, int]]:
    """``nodeN/numastat`` counters per node; empty when not readable (no NUMA, no sysfs)."""
    out: dict[int, dict[str, int]] = {}
    try:
        names = os.listdir(root)
    except OSError:
        return out
    for name in names:
        if not (name.startswith('node') and name[4:].isdigit()):
            continue
        try:
            with open(os.path.join(root, name, 'numastat')) as f:
                values = dict(line.split() for line in f if line.strip())
            out[int(name[4:])] = {k: int(v) for k, v in values.items()}
        except (OSError, ValueError):
            continue
    return dict(sorted(out.items()))


def _describe(topology: Topology | None) -> str:
    if topology is None:
        return 'unknown (the machine could not be read)'
    nodes = '; '.join(
        f'node {n.id}: CPUs {_fmt(n.cpus) or "none"}, {format_size(n.memory_total)}' for n in topology.nodes)
    return (f'{len(topology.nodes)} NUMA node(s) ({nodes}), {len(topology.sockets)} socket(s), '
            f'{len(topology.cpus)} CPU(s), {len(topology.gpus)} GPU(s)')
