"""How many bytes a NUMA node, and the process's memory cgroup, can give now.

The one answer to "can node N hold B bytes" that discovery (and so the report
and the planner), the callback and the node-local allocator share.

A node's *available* memory is what the kernel can hand out without swapping
or failing: free pages, plus clean page cache (file pages that are neither
dirty nor under writeback) and reclaimable slab, minus the node's ``low``
watermark (reclaim keeps that much free). ``MemFree`` alone is wrong on any
machine that has done I/O: most of its free memory is page cache. On a machine
with one memory node the system-wide ``/proc/meminfo`` is used for that node,
because some hypervisors' per-node counters cover only part of the memory.

The memory cgroup's room (its limit minus its usage, counting its clean page
cache as reclaimable) caps every request as well.

Concurrent ranks on one node must not both pass a check that only one of them
fits: :func:`reserve` serialises check-and-allocate across processes with a
lock file per node (and per cgroup), held until the pages are faulted in.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from composer_numa.machine import procfs
from composer_numa.machine.files import read_optional
from composer_numa.units import format_cpulist, format_size

__all__ = ["NodeMemory", "available_bytes", "read_nodes", "shortfall", "reserve", "LOCK_DIR_ENV"]

#: Environment variable naming the directory of the lock files (default /dev/shm, else the temp dir).
LOCK_DIR_ENV = "COMPOSER_NUMA_LOCK_DIR"


@dataclass(frozen=True)
class NodeMemory:
    """One node's memory now, in bytes.

    Attributes:
        node: node id.
        total: ``MemTotal``.
        free: ``MemFree``.
        available: free + clean page cache + reclaimable slab - low watermark (see the module).
    """

    node: int
    total: int
    free: int
    available: int


def available_bytes(meminfo: dict[str, int], low_watermark: int = 0) -> int:
    """Available bytes from a (node or system) meminfo dict and the low watermark in bytes."""
    free = meminfo.get("MemFree", 0)
    file = meminfo.get("Active(file)", 0) + meminfo.get("Inactive(file)", 0)
    if not file:
        file = meminfo.get("FilePages", 0) - meminfo.get("Shmem", 0)
    clean = max(0, file - meminfo.get("Dirty", 0) - meminfo.get("Writeback", 0))
    slab = meminfo.get("SReclaimable", meminfo.get("KReclaimable", 0))
    return max(0, free + clean + slab - low_watermark)


def read_nodes(node_ids: Sequence[int], sys_root: str = "/sys", proc_root: str | None = "/proc",
               problems: list[str] | None = None) -> dict[int, NodeMemory]:
    """Memory of each node in ``node_ids`` (nodes whose meminfo is unreadable are left out)."""
    low: dict[int, int] = {}
    if proc_root is not None:
        zoneinfo = read_optional(os.path.join(proc_root, "zoneinfo"), problems)
        if zoneinfo:
            low = procfs.parse_low_watermarks(zoneinfo, os.sysconf("SC_PAGE_SIZE"))
    out: dict[int, NodeMemory] = {}
    for n in node_ids:
        text = read_optional(os.path.join(sys_root, f"devices/system/node/node{n}/meminfo"), problems)
        if text is None:
            continue
        info = procfs.parse_meminfo(text)
        out[n] = NodeMemory(n, info.get("MemTotal", 0), info.get("MemFree", 0),
                            available_bytes(info, low.get(n, 0)))
    if len(node_ids) == 1 and not out and proc_root is not None:  # a kernel without NUMA sysfs
        info = procfs.parse_meminfo(read_optional(os.path.join(proc_root, "meminfo"), problems) or "")
        if info:
            n = node_ids[0]
            return {n: NodeMemory(n, info.get("MemTotal", 0), info.get("MemFree", 0),
                                  available_bytes(info, sum(low.values())))}
    with_memory = [n for n, m in out.items() if m.total > 0]
    if len(with_memory) == 1 and proc_root is not None:
        system = read_optional(os.path.join(proc_root, "meminfo"), problems)
        info = procfs.parse_meminfo(system or "")
        if info.get("MemTotal", 0) > out[with_memory[0]].total:
            n = with_memory[0]
            out[n] = NodeMemory(n, info["MemTotal"], info.get("MemFree", 0),
                                available_bytes(info, sum(low.values())))
    return out


def shortfall(nbytes: int, nodes: Sequence[int], policy: str, memory: dict[int, NodeMemory],
              cgroup_room: int | None, spill_nodes: Sequence[int] = ()) -> str | None:
    """Why ``nbytes`` under ``policy`` on ``nodes`` does not fit now; None when it does.

    Args:
        nbytes: the request.
        nodes: the target node (``bind``, ``preferred``) or the interleave set.
        policy: ``bind``, ``preferred`` or ``interleave``.
        memory: :func:`read_nodes` of at least those nodes.
        cgroup_room: :func:`procfs.cgroup_memory_room`, None when unlimited.
        spill_nodes: where a ``preferred`` request may spill (the allowed memory nodes).
    """
    where = f"NUMA node {nodes[0]}" if len(nodes) == 1 else f"NUMA nodes {format_cpulist(nodes)}"
    if policy == "interleave":
        share = -(-nbytes // len(nodes))
        for n in nodes:
            m = memory.get(n)
            if m is not None and share > m.available:
                return (f"cannot allocate {format_size(nbytes)} interleaved over {where}: node {n} "
                        f"would take {format_size(share)} and has {_figures(m)}")
    elif policy == "preferred":
        room = sum(memory[n].available for n in (spill_nodes or nodes) if n in memory)
        if any(n in memory for n in (spill_nodes or nodes)) and nbytes > room:
            m = memory.get(nodes[0])
            have = f"the node has {_figures(m)} and " if m is not None else ""
            return (f"cannot allocate {format_size(nbytes)} preferring {where}: {have}all allowed "
                    f"nodes together have {format_size(room)} available")
    else:
        m = memory.get(nodes[0])
        if m is not None and nbytes > m.available:
            return f"cannot allocate {format_size(nbytes)} on {where} (policy {policy}): the node has {_figures(m)}"
    if cgroup_room is not None and nbytes > cgroup_room:
        return (f"cannot allocate {format_size(nbytes)} on {where}: the memory cgroup allows only "
                f"{format_size(cgroup_room)} more")
    return None


def _figures(m: NodeMemory) -> str:
    return (f"{format_size(m.available)} available ({format_size(m.free)} free, "
            f"{format_size(m.total)} total)")


def _lock_dir() -> str:
    chosen = os.environ.get(LOCK_DIR_ENV)
    if chosen:
        return chosen
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    import tempfile

    return tempfile.gettempdir()


def _cgroup_key(proc_root: str) -> str | None:
    import hashlib  # only allocations lock; discovery (every rank's start) does not pay for it

    text = read_optional(os.path.join(proc_root, "self/cgroup")) or ""
    memory = [ln for ln in text.splitlines() if ":memory:" in ln or ln.startswith("0::")]
    if not memory:
        return None
    return hashlib.sha1("\n".join(sorted(memory)).encode()).hexdigest()[:16]


@contextlib.contextmanager
def reserve(nodes: Sequence[int], *, proc_root: str = "/proc") -> Iterator[None]:
    """Hold the cross-process allocation locks of ``nodes`` (and of this process's memory cgroup).

    Check capacity and fault the pages in while holding them: a second process's
    check then sees the first one's pages as used.
    """
    import fcntl

    names = [f"composer-numa-node{n}.lock" for n in sorted(set(nodes))]
    key = _cgroup_key(proc_root)
    if key is not None:
        names.append(f"composer-numa-cgroup-{key}.lock")
    directory = _lock_dir()
    fds: list[int] = []
    try:
        for name in sorted(names):
            path = os.path.join(directory, name)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
                with contextlib.suppress(OSError):
                    os.fchmod(fd, 0o666)  # other users' ranks share the lock (umask would narrow it)
            except PermissionError:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # another user's lock file
                except OSError:
                    continue
            except OSError:
                continue  # no lock directory we may write: check without serialising
            fds.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        for fd in reversed(fds):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
