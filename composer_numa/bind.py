"""Apply a rank's binding to the running process, read it back, and compare.

:func:`apply` sets the CPU affinity of every thread, the memory policy of the
calling thread (inherited by the threads and processes it starts), thread
counts for what starts next, and optionally migrates pages already placed.
Nothing here ever stops a job: what cannot be applied is reported once with
the ``bind-not-applied`` code and skipped, unless ``strict=True``.

:func:`read_back` shows what the kernel says now, :func:`verify` lists how
that differs from a :class:`~composer_numa.plan.RankPlan`.

Example:

.. code-block:: python

    from composer_numa.bind import apply, verify
    applied = apply(rank_plan)          # warns [bind-not-applied] on failure
    assert verify(rank_plan) == []
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass, field

from composer_numa import linux
from composer_numa.diagnostics import BIND_NOT_APPLIED, Diagnostic, emit
from composer_numa.errors import BindError
from composer_numa.plan import MemoryPolicy, RankPlan

__all__ = [
    "Applied",
    "State",
    "Difference",
    "THREAD_ENV",
    "PINNING_ENV",
    "apply",
    "read_back",
    "verify",
    "binding_from_env",
]

log = logging.getLogger(__name__)

#: Thread-count variables set for what starts next (unless already set).
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
        notes: things worth knowing that are not failures (fallbacks, kept variables).
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

    def binding_json(self, bound_at: str) -> dict:
        """The ``COMPOSER_NUMA_BINDING`` document: the plan, where it was bound, what applied."""
        doc = self.plan.to_json()
        doc["schema"] = 1
        doc["bound_at"] = bound_at
        doc["pid"] = os.getpid()
        doc["applied"] = self.to_json()
        return doc


def _fmt(ids) -> str:
    from composer_numa.cpulist import format_cpulist

    return format_cpulist(ids) or "none"


def _apply_affinity(cpus: tuple[int, ...]) -> tuple[int, str | None, str | None]:
    """Set every thread's affinity. Returns (threads set, failure, note)."""
    try:
        linux.set_affinity(cpus)  # the calling thread first: its errors are the real ones
    except OSError as e:
        return 0, f"CPU affinity {_fmt(cpus)} not applied: {e}", None
    done = {linux.current_tid()}
    failures: list[str] = []
    # Two passes catch threads started while the first one ran; they inherit
    # the affinity of whichever thread started them, set or not.
    for _ in range(2):
        fresh = [t for t in linux.thread_ids() if t not in done]
        if not fresh:
            break
        for tid in fresh:
            done.add(tid)
            try:
                linux.set_affinity(cpus, tid)
            except OSError as e:
                if e.errno != errno.ESRCH:  # the thread ended meanwhile
                    failures.append(str(e))
    got = linux.get_affinity()
    if got != cpus:
        return len(done), (f"CPU affinity applied as {_fmt(got)} instead of {_fmt(cpus)} "
                           "(the cpuset does not allow the rest)"), None
    if failures:
        return len(done), f"CPU affinity not applied to {len(failures)} thread(s): {failures[0]}", None
    return len(done), None, None


def _apply_policy(plan: RankPlan) -> tuple[str | None, tuple[int, ...], str | None, list[str]]:
    """Set the calling thread's memory policy. Returns (policy, nodes, failure, notes)."""
    policy, nodes = plan.memory_policy, tuple(plan.memory_nodes)
    notes: list[str] = []
    if policy is MemoryPolicy.NONE:
        return None, (), None, notes
    try:
        if policy is MemoryPolicy.LOCAL:
            try:
                linux.set_mempolicy(linux.MPOL_LOCAL)
                return "local", (), None, notes
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # Kernels before MPOL_LOCAL was accepted: preferred with no node means local.
                linux.set_mempolicy(linux.MPOL_PREFERRED)
                notes.append("memory policy local set as preferred with no node (older kernel)")
                return "local", (), None, notes
        if not nodes:
            return None, (), f"memory policy {policy.value} not applied: the plan names no node", notes
        if policy is MemoryPolicy.PREFERRED:
            if len(nodes) == 1:
                linux.set_mempolicy(linux.MPOL_PREFERRED, nodes)
                return "preferred", nodes, None, notes
            try:
                linux.set_mempolicy(linux.MPOL_PREFERRED_MANY, nodes)
                return "preferred-many", nodes, None, notes
            except OSError as e:
                allowed = set(linux.mems_allowed())
                if e.errno != errno.EINVAL or not set(nodes) <= allowed:
                    raise
                linux.set_mempolicy(linux.MPOL_PREFERRED, nodes[:1])
                notes.append(f"kernel lacks MPOL_PREFERRED_MANY: preferred node {nodes[0]} "
                             f"instead of nodes {_fmt(nodes)}")
                return "preferred", nodes[:1], None, notes
        mode = linux.MPOL_BIND if policy is MemoryPolicy.BIND else linux.MPOL_INTERLEAVE
        linux.set_mempolicy(mode, nodes)
        return policy.value, nodes, None, notes
    except OSError as e:
        return None, (), f"memory policy {policy.value} on nodes {_fmt(nodes)} not applied: {e}", notes


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
        have = environ.get(var)
        if have is None or have == "":
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
          set_env: bool = True, stderr: bool = False,
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

    platform_reason = linux.unsupported_reason()
    if not sys.platform.startswith("linux"):
        failures.append(f"CPU affinity and memory policy not applied: {platform_reason}")
    else:
        want = tuple(sorted(set(rank_plan.cpus)))
        threads, failure, _ = _apply_affinity(want)
        if failure:
            failures.append(failure)
        else:
            cpus = want
        if platform_reason is not None and rank_plan.memory_policy is not MemoryPolicy.NONE:
            failures.append(f"memory policy {rank_plan.memory_policy.value} not applied: "
                            f"{platform_reason}")
        else:
            policy, nodes, failure, more = _apply_policy(rank_plan)
            notes.extend(more)
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
                      tuple(failures), tuple(notes))
    if failures:
        message = f"local rank {rank_plan.local_rank}: " + "; ".join(failures)
        if strict:
            raise BindError(message)
        emit(Diagnostic(BIND_NOT_APPLIED, message + " (continuing without it)"), stderr=stderr)
    for note in notes:
        log.info("local rank %d: %s", rank_plan.local_rank, note)
    return applied


# -- reading back --------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    """A process's binding as the kernel reports it.

    Attributes:
        pid: the process.
        affinity: thread id -> CPUs it may run on.
        memory_policy: policy of the calling thread (this process) or of the
            main thread (another process), named as in ``linux.POLICY_NAMES``;
            None when it could not be read.
        memory_nodes: nodes of that policy.
        thread_policies: thread id -> (policy, nodes) as ``numa_maps`` shows them
            (empty unless asked for, or when unreadable).
        pages: resident memory per node (:class:`~composer_numa.locality.NumaMaps`);
            None when not asked for or unreadable.
        errors: what could not be read, one line each.
    """

    pid: int
    affinity: dict[int, tuple[int, ...]]
    memory_policy: str | None
    memory_nodes: tuple[int, ...]
    thread_policies: dict[int, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    pages: object | None = None
    errors: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {
            "pid": self.pid,
            "affinity": {str(t): list(c) for t, c in sorted(self.affinity.items())},
            "memory_policy": self.memory_policy,
            "memory_nodes": list(self.memory_nodes),
            "thread_policies": {str(t): {"memory_policy": p, "memory_nodes": list(n)}
                                for t, (p, n) in sorted(self.thread_policies.items())},
            "pages": None if self.pages is None else self.pages.to_json(),  # type: ignore[attr-defined]
            "errors": list(self.errors),
        }


def read_back(pid: int | None = None, *, pages: bool = True,
              thread_policies: bool = False) -> State:
    """Read the current binding of this process (or ``pid``) from the kernel.

    Args:
        pid: another process to inspect; None (or our own pid) reads this one,
            whose memory policy then comes from ``get_mempolicy``.
        pages: also sum resident memory per node from ``numa_maps``.
        thread_policies: also read every thread's policy from its ``numa_maps``.
    """
    from composer_numa import locality

    own = pid is None or pid == os.getpid()
    target = os.getpid() if own else int(pid)  # type: ignore[arg-type]
    errors: list[str] = []
    affinity: dict[int, tuple[int, ...]] = {}
    try:
        tids = linux.thread_ids(None if own else target)
    except OSError as e:
        tids = []
        errors.append(f"threads of process {target} not readable: {e.strerror or e}")
    for tid in tids:
        try:
            affinity[tid] = linux.get_affinity(tid)
        except OSError as e:
            if e.errno != errno.ESRCH:
                errors.append(f"affinity of thread {tid} not readable: {e}")
    policy: str | None = None
    nodes: tuple[int, ...] = ()
    if own:
        try:
            mode, nodes = linux.get_mempolicy()
            policy = linux.POLICY_NAMES.get(mode, str(mode))
        except OSError as e:
            errors.append(f"memory policy not readable: {e}")
    else:
        got = locality.task_policy(target)
        if got is None:
            errors.append(f"memory policy of process {target} not readable from numa_maps")
        else:
            policy, nodes = got
    per_thread: dict[int, tuple[str, tuple[int, ...]]] = {}
    if thread_policies:
        for tid in tids:
            got = locality.task_policy(target, tid)
            if got is not None:
                per_thread[tid] = got
    maps = None
    if pages:
        try:
            maps = locality.read_numa_maps(target)
        except OSError as e:
            errors.append(f"numa_maps of process {target} not readable: {e.strerror or e}")
    return State(target, affinity, policy, tuple(nodes), per_thread, maps, tuple(errors))


# -- comparing -----------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """One way the running binding differs from the plan.

    Attributes:
        what: ``"cpus"``, ``"memory_policy"``, ``"thread_memory_policy"`` or ``"locality"``.
        expected: the planned value, as text.
        actual: what the kernel reports, as text.
        message: one line for people.
    """

    what: str
    expected: str
    actual: str
    message: str

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> dict:
        return {"what": self.what, "expected": self.expected, "actual": self.actual,
                "message": self.message}


def _policy_text(policy: str | None, nodes) -> str:
    if policy is None:
        return "unknown"
    return f"{policy}:{_fmt(nodes)}" if nodes else policy


def _policy_matches(plan: RankPlan, policy: str | None, nodes: tuple[int, ...]) -> bool:
    want, wnodes = plan.memory_policy, tuple(sorted(plan.memory_nodes))
    nodes = tuple(sorted(nodes))
    if want is MemoryPolicy.LOCAL:
        return policy == "local" or (policy == "preferred" and not nodes)
    if want is MemoryPolicy.PREFERRED:
        if policy == "preferred-many":
            return nodes == wnodes
        # a single preferred node, or the first of several on kernels without PREFERRED_MANY
        return policy == "preferred" and len(nodes) == 1 and bool(wnodes) and (
            nodes[0] == tuple(plan.memory_nodes)[0])
    return policy == want.value and nodes == wnodes


def verify(rank_plan: RankPlan, state: State | None = None, *, all_threads: bool = False,
           min_local_fraction: float | None = None) -> list[Difference]:
    """How the current binding differs from ``rank_plan``; empty when it matches.

    Args:
        rank_plan: the planned binding.
        state: a :func:`read_back` result; default: read this process now.
        all_threads: also compare every thread's memory policy (right after
            ``composer-numa exec`` every thread inherits it; after a late
            in-process :func:`apply`, threads that already ran keep theirs).
        min_local_fraction: also require this share of the process's resident
            memory on the plan's memory nodes (its CPU nodes when it has none).
    """
    if state is None:
        state = read_back(pages=min_local_fraction is not None, thread_policies=all_threads)
    diffs: list[Difference] = []
    want_cpus = tuple(sorted(set(rank_plan.cpus)))
    groups: dict[tuple[int, ...], list[int]] = {}
    for tid, cpus in state.affinity.items():
        groups.setdefault(tuple(cpus), []).append(tid)
    for cpus, tids in sorted(groups.items()):
        if cpus != want_cpus:
            shown = ",".join(str(t) for t in tids[:8]) + ("..." if len(tids) > 8 else "")
            diffs.append(Difference(
                "cpus", _fmt(want_cpus), _fmt(cpus),
                f"{len(tids)} thread(s) ({shown}) may run on CPUs {_fmt(cpus)}, "
                f"planned {_fmt(want_cpus)}"))
    if rank_plan.memory_policy is not MemoryPolicy.NONE:
        expected = _policy_text(rank_plan.memory_policy.value, rank_plan.memory_nodes)
        if not _policy_matches(rank_plan, state.memory_policy, state.memory_nodes):
            actual = _policy_text(state.memory_policy, state.memory_nodes)
            diffs.append(Difference("memory_policy", expected, actual,
                                    f"memory policy is {actual}, planned {expected}"))
        if all_threads:
            # the thread whose policy is memory_policy above is reported there already
            seen = {state.pid, linux.current_tid()} if state.pid == os.getpid() else {state.pid}
            bad = sorted(t for t, (p, n) in state.thread_policies.items()
                         if t not in seen and not _policy_matches(rank_plan, p, n))
            if bad:
                p, n = state.thread_policies[bad[0]]
                diffs.append(Difference(
                    "thread_memory_policy", expected, _policy_text(p, n),
                    f"{len(bad)} thread(s) (first {bad[0]}) have memory policy "
                    f"{_policy_text(p, n)}, planned {expected}"))
    if min_local_fraction is not None:
        nodes = tuple(rank_plan.memory_nodes) or tuple(rank_plan.numa_nodes)
        maps = state.pages
        frac = None if maps is None else maps.local_fraction(nodes)  # type: ignore[attr-defined]
        if frac is not None and frac < min_local_fraction:
            diffs.append(Difference(
                "locality", f">={min_local_fraction:.2f}", f"{frac:.3f}",
                f"{frac:.1%} of resident memory is on nodes {_fmt(nodes)}, "
                f"required {min_local_fraction:.0%}"))
    return diffs


def binding_from_env(environ: MutableMapping[str, str] | None = None) -> tuple[RankPlan, dict] | None:
    """The binding ``composer-numa exec``/``launch`` exported in ``COMPOSER_NUMA_BINDING``.

    Returns:
        (the plan, the whole JSON document), or None when the variable is not set.

    Raises:
        ComposerNumaError: the variable is set but is not a binding document.
    """
    import json

    from composer_numa.errors import ComposerNumaError

    env = os.environ if environ is None else environ
    raw = env.get("COMPOSER_NUMA_BINDING")
    if not raw:
        return None
    try:
        doc = json.loads(raw)
        return RankPlan.from_json(doc), doc
    except (ValueError, KeyError, TypeError) as e:
        raise ComposerNumaError(f"COMPOSER_NUMA_BINDING is not a binding document: {e}") from None
