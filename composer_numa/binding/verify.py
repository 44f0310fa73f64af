"""Read a process's binding back from the kernel, compare it with a plan, and the
binding document ``composer-numa exec``/``launch`` and the callback export.

:func:`read_back` shows what the kernel says now, :func:`verify` lists how
that differs from a :class:`~composer_numa.plan.RankPlan`.
:func:`binding_document` and :func:`binding_from_env` write and read the JSON
document in ``COMPOSER_NUMA_BINDING``; :func:`made_for` tells whether it was
made for a given process (``exec`` keeps the PID; a child inherits the
variable but was not bound by it).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from composer_numa.binding import linux, locality
from composer_numa.binding.apply import Applied
from composer_numa.errors import ComposerNumaError
from composer_numa.plan import MemoryPolicy, RankPlan
from composer_numa.units import format_cpulist

__all__ = [
    "BINDING_ENV",
    "State",
    "Difference",
    "read_back",
    "verify",
    "binding_document",
    "current",
    "binding_from_env",
    "made_for",
]

#: The variable the applied binding is exported in (a JSON document, ``"schema": 1``).
BINDING_ENV = "COMPOSER_NUMA_BINDING"


def _fmt(ids) -> str:
    return format_cpulist(ids, "none")


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
        pages: resident memory per node (:class:`~composer_numa.binding.locality.NumaMaps`);
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
        except (OSError, ValueError) as e:
            errors.append(f"numa_maps of process {target} not readable: {getattr(e, 'strerror', None) or e}")
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


def current() -> tuple[str, str, str]:
    """This thread's CPUs, memory policy and its nodes as the kernel reports them, as text
    (``("0-15", "preferred", "0")``; ``"unknown"`` where a call fails)."""
    try:
        cpus = format_cpulist(linux.get_affinity())
    except OSError:
        cpus = "unknown"
    try:
        mode, nodes = linux.get_mempolicy()
        return cpus, linux.POLICY_NAMES.get(mode, str(mode)), format_cpulist(nodes)
    except OSError:
        return cpus, "unknown", ""


def binding_document(applied: Applied, bound_at: str, **extra) -> dict:
    """The ``COMPOSER_NUMA_BINDING`` document: the plan, where it was bound, what applied, this PID.

    ``extra`` adds keys (``options``: the planning options; ``allowed_cpus``: the
    cpuset the plan was made from; ``rank_source``).
    """
    doc = applied.plan.to_json()
    doc["schema"] = 1
    doc["bound_at"] = bound_at
    doc["pid"] = os.getpid()
    doc["applied"] = applied.to_json()
    doc.update(extra)
    return doc


def binding_from_env(environ: Mapping[str, str] | None = None) -> tuple[RankPlan, dict] | None:
    """The binding exported in ``COMPOSER_NUMA_BINDING``.

    Returns:
        (the plan, the whole JSON document), or None when the variable is not set.

    Raises:
        ComposerNumaError: the variable is set but is not a binding document.
    """
    env = os.environ if environ is None else environ
    raw = env.get(BINDING_ENV)
    if not raw:
        return None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        return RankPlan.from_json(doc), doc
    except (ValueError, KeyError, TypeError) as e:
        raise ComposerNumaError(f"{BINDING_ENV} is not a binding document: {e}") from None


def made_for(doc: Mapping, pid: int) -> bool:
    """Whether the binding document was made for process ``pid`` (documents without a PID are)."""
    owner = doc.get("pid")
    return owner is None or owner == pid
