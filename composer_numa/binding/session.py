"""One binding session: find the rank, read the machine, plan, warn, apply.

:func:`bind_rank` is the pipeline ``composer-numa exec``, ``composer-numa
launch`` (through exec) and the :class:`~composer_numa.NumaAffinity` callback
share, with one error policy:

- what the user typed wrong (options, an explicit rank, a recorded tree that
  is not one) raises :class:`~composer_numa.errors.ComposerNumaError`;
- anything about the machine or the launcher (an unreadable tree, a rank
  outside the local world size, a failing system call) is a binding problem:
  one ``bind-not-applied`` warning, and the rank runs unbound, unless
  ``strict=True``, which raises :class:`~composer_numa.errors.BindError`
  (or :class:`~composer_numa.errors.PlanError` when the plan cannot give what
  was asked, e.g. a strict ``bind`` the node cannot hold).

It never imports torch or composer.

Example:
    >>> from composer_numa.binding.session import bind_rank
    >>> from composer_numa.plan import PlanOptions
    >>> binding = bind_rank(PlanOptions(mode="node"), local_rank=0, nproc=1)  # doctest: +SKIP
    >>> binding.bound_at, binding.rank_plan.cpus  # doctest: +SKIP
    ('exec', (0, 1))
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass

from composer_numa.binding import apply as applying
from composer_numa.binding.verify import (
    BINDING_ENV,
    binding_document,
    binding_from_env,
    made_for,
    read_back,
    verify,
)
from composer_numa.diagnostics import (
    BIND_NOT_APPLIED,
    BINDING_MISMATCH,
    CPUSET_EXCLUDES_GPU_NODE,
    GPU_NUMA_UNKNOWN,
    MEMORY_TARGET_UNAVAILABLE,
    NODE_MEMORY_INSUFFICIENT,
    TOO_FEW_CORES,
    Diagnostic,
    emit,
)
from composer_numa.errors import BindError, ComposerNumaError, PlanError, TopologyError
from composer_numa.machine import rankenv
from composer_numa.machine.sysfs import discover
from composer_numa.machine.topology import Topology
from composer_numa.plan import Plan, PlanOptions, RankPlan, plan
from composer_numa.units import format_cpulist

__all__ = ["Binding", "UNMET", "bind_rank", "plan_for_device", "inherited", "reassert"]

#: Planner warnings meaning "what you asked for is not what you get": warned on every rank,
#: errors under ``strict``.
UNMET = (NODE_MEMORY_INSUFFICIENT, CPUSET_EXCLUDES_GPU_NODE, GPU_NUMA_UNKNOWN, TOO_FEW_CORES,
         MEMORY_TARGET_UNAVAILABLE)


@dataclass(frozen=True)
class Binding:
    """What :func:`bind_rank` did for one local rank.

    Attributes:
        rank: the local rank and local world size, None when they could not be found.
        topology: the machine, None when it could not be read.
        plan: the host's plan, None when there is none.
        rank_plan: this rank's binding as planned, None when unplanned.
        applied: what the system calls did, None when nothing was applied.
        bound_at: ``"exec"``, ``"launch"`` or ``"callback"`` when applied, ``"none"`` otherwise.
        warnings: the machine's and the planner's warnings concerning this rank.
        document: the ``COMPOSER_NUMA_BINDING`` document, None when unbound.
    """

    rank: rankenv.RankEnv | None
    topology: Topology | None
    plan: Plan | None
    rank_plan: RankPlan | None
    applied: applying.Applied | None
    bound_at: str
    warnings: tuple[Diagnostic, ...] = ()
    document: dict | None = None

    @property
    def codes(self) -> tuple[str, ...]:
        """Sorted warning codes of this rank (``bind-not-applied`` when something failed)."""
        codes = {d.code for d in self.warnings}
        if self.bound_at == "none" or (self.applied is not None and not self.applied.ok):
            codes.add(BIND_NOT_APPLIED)
        return tuple(sorted(codes))


def plan_for_device(topology: Topology, options: PlanOptions, local_rank: int,
                    device: int | str | None = "auto") -> tuple[Plan, RankPlan]:
    """Plan the host and pick the binding of ``local_rank``.

    Args:
        topology: the machine.
        options: the planning options (``nproc`` is the local world size).
        local_rank: the rank.
        device: ``"auto"`` (rank r drives GPU r, CPU ranks spread over the nodes),
            ``"cpu"``/None (a CPU run: ranks spread over the nodes even on a GPU host)
            or the ordinal of the GPU this rank really drives.
    """
    if device in (None, "cpu"):
        topology = dataclasses.replace(topology, gpus=())
    result = plan(topology, options)
    rank_plan = result.ranks[local_rank]
    if isinstance(device, int) and rank_plan.gpu != device and topology.gpus:
        if device >= options.nproc:  # the plan made for that GPU exists only with more ranks
            result = plan(topology, dataclasses.replace(options, nproc=device + 1))
        match = [r for r in result.ranks if r.gpu == device]
        if match:
            rank_plan = dataclasses.replace(match[0], local_rank=local_rank)
    return result, rank_plan


def inherited(environ: Mapping[str, str] | None = None, pid: int | None = None
              ) -> tuple[RankPlan, dict] | None:
    """The binding exported for this process (``pid``), or None (unset, or made for an ancestor).

    Raises:
        ComposerNumaError: the variable holds no binding document.
    """
    found = binding_from_env(environ)
    if found is None or not made_for(found[1], os.getpid() if pid is None else pid):
        return None
    return found


def bind_rank(
    options: PlanOptions,
    *,
    local_rank: int | None = None,
    nproc: int | None = None,
    device: int | str | None = "auto",
    strict: bool = False,
    migrate: bool = False,
    set_env: bool = True,
    respect_pinned: bool = False,
    bound_at: str = "exec",
    report_warnings: bool = True,
    stderr: bool = False,
    sysfs_root: str | None = None,
    proc_root: str | None = None,
    allowed_cpus: tuple[int, ...] | None = None,
    environ: MutableMapping[str, str] | None = None,
    export: bool = True,
    adjust: Callable[[RankPlan, Topology], RankPlan] | None = None,
) -> Binding:
    """Bind this process as one local rank of the host.

    Args:
        options: planning options; ``options.nproc`` is replaced by the local world size.
        local_rank: this rank (default: from the launcher's variables, else 0).
        nproc: ranks on this host (default: from the launcher, else one per visible GPU, or 1).
        device: which GPU this rank drives (see :func:`plan_for_device`).
        strict: raise instead of warning when the binding cannot be planned or applied as asked.
        migrate: move pages already allocated onto the rank's memory nodes.
        set_env: set ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` for what starts next.
        respect_pinned: leave threads pinned elsewhere on purpose alone.
        bound_at: recorded in the binding document (``exec``, ``launch``, ``callback``).
        report_warnings: emit the warnings: local rank 0 the machine's, every rank its own
            unmet requests (``launch`` prints them once itself and passes False to its ranks).
        stderr: warnings as ``composer-numa: warning:`` lines (the command line).
        sysfs_root, proc_root: a recorded machine instead of this one (then errors reading
            it are the user's and raise).
        allowed_cpus: plan from this cpuset instead of the process's current affinity
            (a re-plan after an earlier binding of ours narrowed it).
        environ: the environment (default ``os.environ``): read for the rank, updated
            with thread counts and the binding document.
        export: put the binding document in ``COMPOSER_NUMA_BINDING``.
        adjust: called with the rank's plan and the machine before anything is applied; returns
            the plan to apply (e.g. with CPUs reserved for DataLoader workers taken out). It may
            raise :class:`~composer_numa.errors.PlanError` to refuse (under ``strict``).

    Returns:
        A :class:`Binding`; ``bound_at == "none"`` when nothing was applied.

    Raises:
        ComposerNumaError: invalid options or explicit values.
        PlanError, BindError: only with ``strict=True``.
    """
    env = os.environ if environ is None else environ
    explicit_rank = local_rank is not None or nproc is not None
    recorded = sysfs_root is not None or proc_root is not None

    def unbound(reason: str, topology=None, rank=None) -> Binding:
        if strict:
            raise BindError(reason)
        emit(Diagnostic(BIND_NOT_APPLIED, reason, "running unbound"), stderr=stderr)
        return Binding(rank, topology, None, None, None, "none", (Diagnostic(BIND_NOT_APPLIED, reason),))

    try:
        topology = discover(sysfs_root, proc_root, env)
    except TopologyError as e:
        if recorded:
            raise
        return unbound(f"the machine could not be read: {e}")
    if allowed_cpus:
        online = {c.id for c in topology.cpus}
        kept = tuple(c for c in allowed_cpus if c in online)
        if kept:
            topology = dataclasses.replace(topology, allowed_cpus=kept)
    try:
        rank = rankenv.resolve(local_rank, nproc, env, default_size=len(topology.gpus) or 1)
    except ComposerNumaError as e:
        if explicit_rank:
            raise
        return unbound(f"rank not known: {e}", topology)
    size = rank.local_world_size or 1
    try:
        result, rank_plan = plan_for_device(topology, dataclasses.replace(options, nproc=size),
                                            rank.local_rank, device)
    except PlanError:
        raise
    except (ComposerNumaError, ValueError, LookupError) as e:  # a machine the planner cannot use
        return unbound(f"local rank {rank.local_rank}: could not plan: {e}", topology, rank)

    warnings = tuple(dict.fromkeys((*topology.diagnostics, *result.warnings)))
    unmet = [d for d in warnings if d.code in UNMET]
    if strict and unmet:
        raise PlanError(f"local rank {rank.local_rank} cannot be bound as asked (strict): "
                        + "; ".join(f"[{d.code}] {d.message}" for d in unmet))
    if report_warnings:
        for diag in warnings:
            if rank.local_rank == 0 or diag.code in UNMET:
                emit(diag, stderr=stderr)
    if adjust is not None:
        rank_plan = adjust(rank_plan, topology)
    try:
        applied = applying.apply(rank_plan, strict=strict, migrate=migrate, set_env=set_env,
                                 stderr=stderr, respect_pinned=respect_pinned, environ=env)
    except BindError:
        raise
    except Exception as e:  # noqa: BLE001 - a bug of ours must not stop the job
        return unbound(f"local rank {rank.local_rank}: binding failed: {type(e).__name__}: {e}", topology, rank)
    _replan_offload()
    o = result.options
    doc = binding_document(
        applied, bound_at, rank_source=rank.source, allowed_cpus=list(topology.allowed_cpus),
        options={"mode": o.mode.value, "memory": o.memory.value, "memory_need": o.memory_need,
                 "memory_target": o.memory_target.value, "nproc": o.nproc})
    if export:
        env[BINDING_ENV] = json.dumps(doc, separators=(",", ":"))
    done = applied.cpus is not None or applied.memory_policy is not None
    return Binding(rank, topology, result, rank_plan, applied, bound_at if done else "none", warnings, doc)


def _replan_offload() -> None:
    """The offload runtime planned its worker pool from the affinity a binding just changed: have
    it plan again on next use. Only when it is loaded: binding never imports torch or the extension."""
    runtime = sys.modules.get("composer_numa.offload.runtime")
    if runtime is not None:
        runtime.reset()


def reassert(rank_plan: RankPlan, *, target: RankPlan | None = None, strict: bool = False,
             migrate: bool = False, respect_pinned: bool = False, what: str = "the binding") -> list[str]:
    """Check that ``rank_plan`` is still in force and put ``target`` (default: ``rank_plan``) in place.

    ``target`` is ``rank_plan`` narrowed by its user (fewer CPUs for the training threads):
    threads already on its CPUs are as asked, and threads still on all of ``rank_plan``'s
    CPUs are moved onto them without a warning. Anything else (threads moved elsewhere, the
    memory policy changed) is a ``binding-mismatch``: warned once and re-applied.

    Returns:
        the differences that were found (empty when everything was still in force).
    """
    target = rank_plan if target is None else target
    accepted = format_cpulist(target.cpus, "none")
    differences = [str(d) for d in verify(rank_plan, read_back(pages=False))
                   if not (d.what == "cpus" and d.actual == accepted)]
    if not differences:
        if target.cpus != rank_plan.cpus:
            applying.pin_threads(tuple(target.cpus), respect_pinned=respect_pinned)
        return []
    message = f"local rank {rank_plan.local_rank}: {what} is no longer in force: " + "; ".join(differences)
    if strict:
        raise BindError(message)
    emit(Diagnostic(BINDING_MISMATCH, message, "re-applied"))
    applying.apply(target, strict=strict, migrate=migrate, set_env=False, respect_pinned=respect_pinned)
    return differences
