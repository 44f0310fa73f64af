"""Apply a rank's binding to the running process.

:func:`apply` sets the CPU affinity of every thread (leaving alone threads an
application pinned elsewhere on purpose), the memory policy of the calling
thread (inherited by the threads and processes it starts), thread counts for
what starts next, and optionally migrates pages already placed. Nothing here
ever stops a job: what cannot be applied is reported once with the
``bind-not-applied`` code and skipped, unless ``strict=True``.

Example:

.. code-block:: python

    from composer_numa.binding.apply import apply
    from composer_numa.binding.verify import verify
    applied = apply(rank_plan)          # warns [bind-not-applied] on failure
    assert verify(rank_plan) == []
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass, field

from composer_numa.binding import linux
from composer_numa.diagnostics import BIND_NOT_APPLIED, MEMORY_POLICY_FALLBACK, Diagnostic, emit
from composer_numa.errors import BindError
from composer_numa.plan import MemoryPolicy, RankPlan
from composer_numa.units import format_cpulist

__all__ = ["Applied", "THREAD_ENV", "PINNING_ENV", "apply", "pin_threads"]

#: Thread-count variables set for what starts next (unless already set to a positive value).
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: OpenMP pinning variables; never set by composer-numa (they would pin every
#: worker of every rank to the same cores), only reported when inherited.
PINNING_ENV = ("KMP_AFFINITY", "GOMP_CPU_AFFINITY", "OMP_PLACES", "OMP_PROC_BIND")


@dataclass(frozen=True)
class Applied:
    """What :func:`apply` did.

    Attributes:
        plan: the binding asked for.
        cpus: CPUs the threads were restricted to; None when affinity was not applied.
        threads: threads whose affinity was set.
        memory_policy: the policy the kernel accepted (``linux.POLICY_NAMES``
            naming, e.g. ``"preferred-many"``); None when not applied or ``none``.
        memory_nodes: nodes of that policy.
        pages_not_migrated: pages ``migrate_pages`` could not move; None when
            no migration was done.
        env: environment variables this call set.
        not_applied: one line per part that failed, naming what and why.
        notes: things worth knowing that are not failures (kept variables, threads left alone).
        kept_threads: threads left on their own CPUs because they were pinned elsewhere on purpose.
    """

    plan: RankPlan
    cpus: tuple[int, ...] | None
    threads: int
    memory_policy: str | None
    memory_nodes: tuple[int, ...]
    pages_not_migrated: int | None
    env: dict[str, str] = field(default_factory=dict)
    not_applied: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    kept_threads: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        """Everything planned was applied."""
        return not self.not_applied

    def to_json(self) -> dict:
        return {
            "cpus": None if self.cpus is None else list(self.cpus),
            "threads": self.threads,
            "memory_policy": self.memory_policy,
            "memory_nodes": list(self.memory_nodes),
            "pages_not_migrated": self.pages_not_migrated,
            "env": dict(self.env),
            "not_applied": list(self.not_applied),
            "notes": list(self.notes),
        }


def _fmt(ids) -> str:
    return format_cpulist(ids, "none")


def pin_threads(cpus: tuple[int, ...], pid: int | None = None, *, respect_pinned: bool = False,
                ) -> tuple[int, list[str], tuple[int, ...]]:
    """Set the affinity of every thread of ``pid`` (default: this process) to ``cpus``.

    Args:
        cpus: the CPUs.
        pid: another process (its threads), or None for this one (the calling thread first).
        respect_pinned: leave alone threads whose affinity differs from the calling
            thread's: an application (or a library such as an inference runtime)
            pinned them elsewhere on purpose. Only for this process.

    Returns:
        (threads set, one line per thread that could not be set, threads left alone).
        Threads that end meanwhile are not failures.
    """
    own = pid is None or pid == os.getpid()
    done: set[int] = set()
    failures: list[str] = []
    kept: list[int] = []
    reference = None
    if own:
        if respect_pinned:
            reference = linux.get_affinity()
        linux.set_affinity(cpus)  # the calling thread first: its errors are the real ones
        done.add(linux.current_tid())
    # Two passes catch threads started while the first one ran; they inherit
    # the affinity of whichever thread started them, set or not.
    for _ in range(2):
        try:
            tids = linux.thread_ids(None if own else pid)
        except OSError as e:
            if e.errno == errno.ESRCH or isinstance(e, FileNotFoundError):
                break
            failures.append(f"threads of process {pid} not readable: {e}")
            break
        fresh = [t for t in tids if t not in done]
        if not fresh:
            break
        for tid in fresh:
            done.add(tid)
            try:
                if reference is not None:
                    current = linux.get_affinity(tid)
                    if current != reference and current != cpus:
                        kept.append(tid)
                        continue
                linux.set_affinity(cpus, tid)
            except OSError as e:
                if e.errno != errno.ESRCH:  # the thread ended meanwhile
                    failures.append(str(e))
    return len(done) - len(kept), failures, tuple(kept)


def _apply_affinity(cpus: tuple[int, ...], respect_pinned: bool
                    ) -> tuple[int, str | None, tuple[int, ...]]:
    """Set every thread's affinity. Returns (threads set, failure, threads left alone)."""
    try:
        count, failures, kept = pin_threads(cpus, respect_pinned=respect_pinned)
    except OSError as e:
        return 0, f"CPU affinity {_fmt(cpus)} not applied: {e}", ()
    got = linux.get_affinity()
    if got != cpus:
        return count, (f"CPU affinity applied as {_fmt(got)} instead of {_fmt(cpus)} "
                       "(the cpuset does not allow the rest)"), kept
    if failures:
        return count, f"CPU affinity not applied to {len(failures)} thread(s): {failures[0]}", kept
    return count, None, kept


def _apply_policy(plan: RankPlan) -> tuple[str | None, tuple[int, ...], str | None, list[Diagnostic]]:
    """Set the calling thread's memory policy. Returns (policy, nodes, failure, fallbacks)."""
    policy, nodes = plan.memory_policy, tuple(plan.memory_nodes)
    fallbacks: list[Diagnostic] = []
    if policy is MemoryPolicy.NONE:
        return None, (), None, fallbacks
    try:
        if policy is MemoryPolicy.LOCAL:
            try:
                linux.set_mempolicy(linux.MPOL_LOCAL)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # Kernels before MPOL_LOCAL was accepted: preferred with no node means local.
                linux.set_mempolicy(linux.MPOL_PREFERRED)
            return "local", (), None, fallbacks
        if not nodes:
            return None, (), f"memory policy {policy.value} not applied: the plan names no node", fallbacks
        if policy is MemoryPolicy.PREFERRED:
            if len(nodes) == 1:
                linux.set_mempolicy(linux.MPOL_PREFERRED, nodes)
                return "preferred", nodes, None, fallbacks
            try:
                linux.set_mempolicy(linux.MPOL_PREFERRED_MANY, nodes)
                return "preferred-many", nodes, None, fallbacks
            except OSError as e:
                allowed = set(linux.mems_allowed())
                if e.errno != errno.EINVAL or not set(nodes) <= allowed:
                    raise
                linux.set_mempolicy(linux.MPOL_PREFERRED, nodes[:1])
                fallbacks.append(Diagnostic(
                    MEMORY_POLICY_FALLBACK,
                    f"local rank {plan.local_rank}: this kernel has no MPOL_PREFERRED_MANY (Linux 5.15+) "
                    f"for preferring nodes {_fmt(nodes)}",
                    f"the nearest, node {nodes[0]}, is preferred instead"))
                return "preferred", nodes[:1], None, fallbacks
        mode = linux.MPOL_BIND if policy is MemoryPolicy.BIND else linux.MPOL_INTERLEAVE
        linux.set_mempolicy(mode, nodes)
        return policy.value, nodes, None, fallbacks
    except OSError as e:
        return None, (), f"memory policy {policy.value} on nodes {_fmt(nodes)} not applied: {e}", fallbacks


def _migrate(plan: RankPlan, policy: str | None, nodes: tuple[int, ...]
             ) -> tuple[int | None, str | None, str | None]:
    """Move pages already placed onto the policy's nodes. Returns (left, failure, note)."""
    if policy in (None, "interleave"):
        return None, None, f"no page migration for memory policy {policy or 'none'}"
    target = nodes if policy != "local" else tuple(plan.numa_nodes)
    if not target:
        return None, None, "no page migration: no target node"
    try:
        source = tuple(n for n in linux.mems_allowed() if n not in target)
        if not source:
            return 0, None, None
        left = linux.migrate_pages(0, source, target)
    except OSError as e:
        return None, f"page migration to nodes {_fmt(target)} not done: {e}", None
    note = f"{left} page(s) could not be migrated to nodes {_fmt(target)}" if left else None
    return left, None, note


def _apply_env(plan: RankPlan, environ: MutableMapping[str, str]
               ) -> tuple[dict[str, str], list[str]]:
    done: dict[str, str] = {}
    notes: list[str] = []
    want = str(max(1, plan.num_threads))
    for var in THREAD_ENV:
        have = (environ.get(var) or "").strip()
        if not have or have == "0":  # unset, empty or 0 (which OpenMP rejects) is ours to set
            environ[var] = want
            done[var] = want
        elif have != want:
            notes.append(f"{var}={have} kept (set before composer-numa; the plan says {want})")
    for var in PINNING_ENV[:2]:
        if environ.get(var):
            notes.append(f"{var}={environ[var]} is inherited from the environment and "
                         "overrides this binding for OpenMP threads")
    return done, notes


def apply(rank_plan: RankPlan, *, strict: bool = False, migrate: bool = False,
          set_env: bool = True, stderr: bool = False, respect_pinned: bool = False,
          environ: MutableMapping[str, str] | None = None) -> Applied:
    """Bind the running process as ``rank_plan`` says.

    Args:
        rank_plan: the rank's binding (from :func:`composer_numa.plan.plan`).
        strict: raise :class:`~composer_numa.errors.BindError` when any part
            cannot be applied, instead of warning and going on.
        migrate: move pages already allocated onto the policy's nodes
            (``migrate_pages``; not for ``interleave``).
        set_env: set ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` to the plan's
            thread count for processes started later, unless already set.
        stderr: report failures as a ``composer-numa: warning:`` line on
            stderr (the command line) instead of Python warnings.
        respect_pinned: leave alone threads whose CPU affinity differs from the
            calling thread's (pinned elsewhere on purpose).
        environ: the environment to update (default ``os.environ``).

    Returns:
        An :class:`Applied` record of what was and was not applied.

    Raises:
        BindError: only with ``strict=True``, naming every part not applied.
    """
    env = os.environ if environ is None else environ
    failures: list[str] = []
    notes: list[str] = []
    cpus: tuple[int, ...] | None = None
    threads = 0
    policy: str | None = None
    nodes: tuple[int, ...] = ()
    left: int | None = None
    kept: tuple[int, ...] = ()
    fallbacks: list[Diagnostic] = []

    platform_reason = linux.unsupported_reason()
    if not sys.platform.startswith("linux"):
        failures.append(f"CPU affinity and memory policy not applied: {platform_reason}")
    else:
        want = tuple(sorted(set(rank_plan.cpus)))
        threads, failure, kept = _apply_affinity(want, respect_pinned)
        if failure:
            failures.append(failure)
        else:
            cpus = want
        if kept:
            notes.append(f"{len(kept)} thread(s) pinned elsewhere on purpose were left alone")
        if platform_reason is not None and rank_plan.memory_policy is not MemoryPolicy.NONE:
            failures.append(f"memory policy {rank_plan.memory_policy.value} not applied: "
                            f"{platform_reason}")
        else:
            policy, nodes, failure, fallbacks = _apply_policy(rank_plan)
            if failure:
                failures.append(failure)
            elif policy is not None:
                others = len(linux.thread_ids()) - 1
                if others > 0:
                    notes.append(f"memory policy set for the calling thread and what it starts; "
                                 f"{others} other running thread(s) keep theirs")
                if migrate:
                    left, failure, note = _migrate(rank_plan, policy, nodes)
                    if failure:
                        failures.append(failure)
                    if note:
                        notes.append(note)
    env_set: dict[str, str] = {}
    if set_env:
        env_set, more = _apply_env(rank_plan, env)
        notes.extend(more)

    applied = Applied(rank_plan, cpus, threads, policy, nodes, left, env_set,
                      tuple(failures), tuple(notes), kept)
    if failures:
        message = f"local rank {rank_plan.local_rank}: " + "; ".join(failures)
        if strict:
            raise BindError(message)
        emit(Diagnostic(BIND_NOT_APPLIED, message, "continuing without it"), stderr=stderr)
    for diag in fallbacks:
        if strict:
            raise BindError(diag.message)
        emit(diag, stderr=stderr)
    if notes:
        # logging is imported only when there is something to log: exec starts every rank
        import logging

        log = logging.getLogger(__name__)
        for note in notes:
            log.info("local rank %d: %s", rank_plan.local_rank, note)
    return applied
