"""Every Linux call composer-numa makes: CPU affinity and NUMA memory policy.

Memory-policy calls go straight to the kernel through ``syscall(2)`` (no
libnuma, no numactl), with the syscall numbers of each supported
architecture. Failures raise :class:`NumaSyscallError`, an ``OSError`` whose
message names the call, its arguments and the likely cause, so callers can
pass it on to users verbatim.

Node sets are plain tuples of node ids; CPU sets are tuples of CPU ids.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from collections.abc import Iterable, Sequence

from composer_numa.machine import procfs
from composer_numa.units import format_cpulist, parse_cpulist

__all__ = [
    "MPOL_DEFAULT",
    "MPOL_PREFERRED",
    "MPOL_BIND",
    "MPOL_INTERLEAVE",
    "MPOL_LOCAL",
    "MPOL_PREFERRED_MANY",
    "MPOL_WEIGHTED_INTERLEAVE",
    "MPOL_MF_STRICT",
    "MPOL_MF_MOVE",
    "MPOL_MF_MOVE_ALL",
    "POLICY_NAMES",
    "NumaSyscallError",
    "unsupported_reason",
    "thread_ids",
    "current_tid",
    "get_affinity",
    "set_affinity",
    "set_mempolicy",
    "get_mempolicy",
    "mems_allowed",
    "node_of_address",
    "migrate_pages",
    "mbind",
    "move_pages",
]

# <linux/mempolicy.h>
MPOL_DEFAULT = 0
MPOL_PREFERRED = 1
MPOL_BIND = 2
MPOL_INTERLEAVE = 3
MPOL_LOCAL = 4
MPOL_PREFERRED_MANY = 5
MPOL_WEIGHTED_INTERLEAVE = 6
_MPOL_MODE_FLAGS = (1 << 15) | (1 << 14) | (1 << 13)  # STATIC_NODES, RELATIVE_NODES, NUMA_BALANCING

MPOL_F_NODE = 1 << 0
MPOL_F_ADDR = 1 << 1
MPOL_F_MEMS_ALLOWED = 1 << 2

MPOL_MF_STRICT = 1 << 0
MPOL_MF_MOVE = 1 << 1
MPOL_MF_MOVE_ALL = 1 << 2

POLICY_NAMES = {
    MPOL_DEFAULT: "default",
    MPOL_PREFERRED: "preferred",
    MPOL_BIND: "bind",
    MPOL_INTERLEAVE: "interleave",
    MPOL_LOCAL: "local",
    MPOL_PREFERRED_MANY: "preferred-many",
    MPOL_WEIGHTED_INTERLEAVE: "weighted-interleave",
}

# (mbind, set_mempolicy, get_mempolicy, migrate_pages, move_pages)
_SYSCALLS = {
    "x86_64": (237, 238, 239, 256, 279),
    # arm64 and riscv64 use the generic table (include/uapi/asm-generic/unistd.h)
    "aarch64": (235, 237, 236, 238, 239),
    "arm64": (235, 237, 236, 238, 239),
    "riscv64": (235, 237, 236, 238, 239),
}
_NR_NAMES = ("mbind", "set_mempolicy", "get_mempolicy", "migrate_pages", "move_pages")


class NumaSyscallError(OSError):
    """A NUMA or affinity call failed; ``str(e)`` is one line naming call, arguments and cause."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _nodes_str(nodes: Iterable[int]) -> str:
    return format_cpulist(nodes, "none")


_nr: dict[str, int] | None = None
_syscall = None


def unsupported_reason() -> str | None:
    """Why memory-policy syscalls cannot be made here, or None when they can.

    Only the platform is checked (Linux, a known architecture, a loadable libc);
    a kernel without NUMA support shows up as ENOSYS on the first call.
    """
    global _nr, _syscall
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    machine = os.uname().machine.lower()  # not platform.machine(): its import costs ~10 ms
    numbers = _SYSCALLS.get(machine)
    if numbers is None:
        return f"unsupported architecture {machine!r} (known: x86_64, aarch64, riscv64)"
    if _syscall is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.syscall
        except (OSError, AttributeError) as e:  # pragma: no cover - static binaries only
            return f"libc syscall() unavailable: {e}"
        fn.restype = ctypes.c_long
        _syscall = fn
        _nr = dict(zip(_NR_NAMES, numbers, strict=True))
    return None


def _call(name: str, *args) -> int:
    reason = unsupported_reason()
    if reason is not None:
        raise NumaSyscallError(errno.ENOSYS, f"{name}: {reason}")
    assert _syscall is not None and _nr is not None
    ctypes.set_errno(0)
    ret = _syscall(ctypes.c_long(_nr[name]), *args)
    if ret < 0:
        return -ctypes.get_errno() or -errno.EIO
    return ret


# -- node masks -------------------------------------------------------------------

_mask_bits: int | None = None


def _kernel_mask_bits() -> int:
    """Bits in the kernel's node mask (MAX_NUMNODES), from the width of ``Mems_allowed``."""
    global _mask_bits
    if _mask_bits is None:
        words = procfs.status().get("Mems_allowed", "")
        bits = max(64, 32 * len(words.split(","))) if words else 1024
        _mask_bits = (bits + 63) // 64 * 64
    return _mask_bits


def _mask(nodes: Iterable[int], call: str) -> tuple[ctypes.Array, int]:
    bits = _kernel_mask_bits()
    buf = (ctypes.c_ulong * (bits // 64))()
    for n in nodes:
        if n < 0 or n >= bits:
            raise NumaSyscallError(
                errno.EINVAL,
                f"{call}: node {n} is outside the kernel's node range 0-{bits - 1}",
            )
        buf[n // 64] |= 1 << (n % 64)
    # The kernel reads maxnode - 1 bits, hence the + 1 (as libnuma does).
    return buf, bits + 1


def _unmask(buf: ctypes.Array) -> tuple[int, ...]:
    out = []
    for i, word in enumerate(buf):
        w = int(word)
        while w:
            low = w & -w
            out.append(i * 64 + low.bit_length() - 1)
            w ^= low
    return tuple(out)


def _allowed_for_message() -> tuple[int, ...] | None:
    try:
        return mems_allowed()
    except OSError:
        return None


def _policy_error(call: str, err: int, mode: int, nodes: Sequence[int]) -> NumaSyscallError:
    what = f"{call}({POLICY_NAMES.get(mode, mode)}, nodes {_nodes_str(nodes)})"
    if err == errno.ENOSYS:
        return NumaSyscallError(err, f"{what} failed: the kernel has no NUMA support (ENOSYS)")
    if err == errno.EPERM:
        return NumaSyscallError(
            err, f"{what} failed: not permitted (EPERM; a seccomp profile or container policy "
            "may block NUMA syscalls)")
    if err == errno.EINVAL:
        allowed = _allowed_for_message()
        if allowed is not None:
            outside = sorted(set(nodes) - set(allowed))
            if outside:
                return NumaSyscallError(
                    err, f"{what} failed: node {_nodes_str(outside)} is not an allowed memory "
                    f"node of this process (allowed: {_nodes_str(allowed)}) (EINVAL)")
        if mode in (MPOL_PREFERRED_MANY, MPOL_WEIGHTED_INTERLEAVE, MPOL_LOCAL):
            return NumaSyscallError(
                err, f"{what} failed: this kernel does not support that policy mode (EINVAL)")
        return NumaSyscallError(err, f"{what} failed: invalid arguments (EINVAL)")
    return NumaSyscallError(err, f"{what} failed: {os.strerror(err)} ({errno.errorcode.get(err)})")


# -- threads and CPU affinity ------------------------------------------------------


def thread_ids(pid: int | None = None) -> list[int]:
    """Thread ids of ``pid`` (default: this process), from ``/proc/<pid>/task``."""
    where = "self" if pid is None else str(pid)
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{where}/task"))
    except FileNotFoundError:
        if pid is None:
            return [current_tid()]
        raise
    except OSError:
        return [current_tid()] if pid is None else []


def current_tid() -> int:
    """Kernel thread id of the calling thread."""
    import threading

    return threading.get_native_id()


def get_affinity(tid: int = 0) -> tuple[int, ...]:
    """CPUs thread (or process) ``tid`` may run on; 0 means the calling thread."""
    if not hasattr(os, "sched_getaffinity"):
        raise NumaSyscallError(errno.ENOSYS, f"sched_getaffinity: not available on {sys.platform}")
    return tuple(sorted(os.sched_getaffinity(tid)))


def set_affinity(cpus: Iterable[int], tid: int = 0) -> None:
    """Restrict thread ``tid`` (0: the calling thread) to ``cpus``.

    Raises:
        NumaSyscallError: the set is empty, names no CPU the thread may use, or
            the thread is gone (``errno.ESRCH``).
    """
    cpus = tuple(sorted(set(cpus)))
    if not hasattr(os, "sched_setaffinity"):
        raise NumaSyscallError(errno.ENOSYS, f"sched_setaffinity: not available on {sys.platform}")
    what = f"sched_setaffinity(thread {tid or 'self'}, cpus {format_cpulist(cpus, 'none')})"
    if not cpus:
        raise NumaSyscallError(errno.EINVAL, f"{what}: empty CPU set")
    try:
        os.sched_setaffinity(tid, cpus)
    except OSError as e:
        err = e.errno or errno.EIO
        if err == errno.EINVAL:
            msg = f"{what} failed: none of these CPUs is online and allowed by the cpuset (EINVAL)"
        elif err == errno.ESRCH:
            msg = f"{what} failed: no such thread (ESRCH)"
        elif err == errno.EPERM:
            msg = f"{what} failed: not permitted (EPERM)"
        else:
            msg = f"{what} failed: {os.strerror(err)}"
        raise NumaSyscallError(err, msg) from None
    except (OverflowError, ValueError) as e:
        raise NumaSyscallError(errno.EINVAL, f"{what} failed: {e}") from None


# -- memory policy ----------------------------------------------------------------


def set_mempolicy(mode: int, nodes: Iterable[int] = (), flags: int = 0) -> None:
    """Set the calling thread's memory policy (``set_mempolicy(2)``).

    Threads started afterwards by this thread inherit it; other existing
    threads keep theirs (the kernel has no call to change another thread's policy).

    Args:
        mode: ``MPOL_*`` mode.
        nodes: node ids; empty for ``MPOL_DEFAULT`` / ``MPOL_LOCAL``.
        flags: ``MPOL_F_STATIC_NODES`` / ``MPOL_F_RELATIVE_NODES`` bits, or'ed into mode.

    Raises:
        NumaSyscallError: with a message naming the nodes and the cause.
    """
    nodes = tuple(sorted(set(nodes)))
    if nodes:
        buf, maxnode = _mask(nodes, "set_mempolicy")
        ptr = ctypes.cast(buf, ctypes.c_void_p)
    else:
        ptr, maxnode = ctypes.c_void_p(None), 0
    ret = _call("set_mempolicy", ctypes.c_long(mode | flags), ptr, ctypes.c_ulong(maxnode))
    if ret < 0:
        raise _policy_error("set_mempolicy", -ret, mode, nodes)


def get_mempolicy() -> tuple[int, tuple[int, ...]]:
    """The calling thread's memory policy as ``(MPOL_* mode, nodes)``.

    For ``MPOL_DEFAULT`` and ``MPOL_LOCAL`` the node tuple is empty.
    """
    buf, maxnode = _mask((), "get_mempolicy")
    mode = ctypes.c_int(0)
    ret = _call("get_mempolicy", ctypes.byref(mode), ctypes.cast(buf, ctypes.c_void_p),
                ctypes.c_ulong(maxnode), ctypes.c_void_p(None), ctypes.c_ulong(0))
    if ret < 0:
        raise _policy_error("get_mempolicy", -ret, MPOL_DEFAULT, ())
    m = mode.value & ~_MPOL_MODE_FLAGS
    return m, (() if m in (MPOL_DEFAULT, MPOL_LOCAL) else _unmask(buf))


def mems_allowed() -> tuple[int, ...]:
    """Memory nodes this process may use (its cpuset's ``mems``)."""
    if unsupported_reason() is None:
        buf, maxnode = _mask((), "get_mempolicy")
        mode = ctypes.c_int(0)
        ret = _call("get_mempolicy", ctypes.byref(mode), ctypes.cast(buf, ctypes.c_void_p),
                    ctypes.c_ulong(maxnode), ctypes.c_void_p(None),
                    ctypes.c_ulong(MPOL_F_MEMS_ALLOWED))
        if ret >= 0:
            return _unmask(buf)
    # No NUMA syscalls: fall back to the status file (a non-NUMA kernel shows node 0).
    try:
        return parse_cpulist(procfs.status().get("Mems_allowed_list", "")) or (0,)
    except ValueError:
        return (0,)


def node_of_address(address: int) -> int:
    """NUMA node holding the page at ``address`` of this process (faults it in if needed)."""
    node = ctypes.c_int(-1)
    ret = _call("get_mempolicy", ctypes.byref(node), ctypes.c_void_p(None), ctypes.c_ulong(0),
                ctypes.c_void_p(address), ctypes.c_ulong(MPOL_F_NODE | MPOL_F_ADDR))
    if ret < 0:
        raise NumaSyscallError(-ret, f"get_mempolicy(MPOL_F_NODE|MPOL_F_ADDR, {address:#x}) "
                               f"failed: {os.strerror(-ret)}")
    return node.value


def migrate_pages(pid: int, old_nodes: Iterable[int], new_nodes: Iterable[int]) -> int:
    """Move ``pid``'s pages (0: this process) from ``old_nodes`` to ``new_nodes``.

    Returns:
        the number of pages that could not be moved.
    """
    old, new = tuple(sorted(set(old_nodes))), tuple(sorted(set(new_nodes)))
    obuf, maxnode = _mask(old, "migrate_pages")
    nbuf, _ = _mask(new, "migrate_pages")
    ret = _call("migrate_pages", ctypes.c_long(pid), ctypes.c_ulong(maxnode),
                ctypes.cast(obuf, ctypes.c_void_p), ctypes.cast(nbuf, ctypes.c_void_p))
    if ret < 0:
        err = -ret
        what = f"migrate_pages(pid {pid}, {_nodes_str(old)} -> {_nodes_str(new)})"
        if err == errno.EINVAL:
            allowed = _allowed_for_message()
            outside = sorted(set(new) - set(allowed or new))
            why = (f"node {_nodes_str(outside)} is not an allowed memory node" if outside
                   else "invalid node sets")
            raise NumaSyscallError(err, f"{what} failed: {why} (EINVAL)")
        if err == errno.EPERM:
            raise NumaSyscallError(err, f"{what} failed: not permitted (EPERM)")
        if err == errno.ESRCH:
            raise NumaSyscallError(err, f"{what} failed: no such process (ESRCH)")
        if err == errno.ENOSYS:
            raise NumaSyscallError(err, f"{what} failed: the kernel has no NUMA support (ENOSYS)")
        raise NumaSyscallError(err, f"{what} failed: {os.strerror(err)}")
    return ret


def mbind(address: int, length: int, mode: int, nodes: Iterable[int] = (),
          flags: int = 0) -> None:
    """Set the memory policy of ``[address, address + length)`` (``mbind(2)``).

    ``address`` must be page aligned. ``flags`` may hold ``MPOL_MF_MOVE`` to
    move pages already there, ``MPOL_MF_STRICT`` to fail if some cannot be.
    """
    nodes = tuple(sorted(set(nodes)))
    if nodes:
        buf, maxnode = _mask(nodes, "mbind")
        ptr = ctypes.cast(buf, ctypes.c_void_p)
    else:
        ptr, maxnode = ctypes.c_void_p(None), 0
    ret = _call("mbind", ctypes.c_void_p(address), ctypes.c_ulong(length), ctypes.c_long(mode),
                ptr, ctypes.c_ulong(maxnode), ctypes.c_uint(flags))
    if ret < 0:
        err = -ret
        if err == errno.EIO:
            raise NumaSyscallError(err, f"mbind({address:#x}, {length}) failed: some pages "
                                   "could not be moved (EIO, MPOL_MF_STRICT)")
        if err == errno.EFAULT:
            raise NumaSyscallError(err, f"mbind({address:#x}, {length}) failed: the range is "
                                   "not fully mapped (EFAULT)")
        raise _policy_error("mbind", err, mode, nodes)


def move_pages(pid: int, addresses: Sequence[int], nodes: Sequence[int] | None = None,
               flags: int = 0) -> list[int]:
    """Query (``nodes=None``) or move pages of ``pid`` (0: this process).

    Returns:
        per address: its node, or a negative errno (``-ENOENT``: not present,
        ``-EFAULT``: not mapped).
    """
    count = len(addresses)
    if nodes is not None and len(nodes) != count:
        raise ValueError(f"move_pages: {count} addresses but {len(nodes)} nodes")
    if count == 0:
        return []
    pages = (ctypes.c_void_p * count)(*addresses)
    status = (ctypes.c_int * count)()
    nptr = (ctypes.c_int * count)(*nodes) if nodes is not None else None
    ret = _call("move_pages", ctypes.c_long(pid), ctypes.c_ulong(count),
                ctypes.cast(pages, ctypes.c_void_p),
                ctypes.cast(nptr, ctypes.c_void_p) if nptr is not None else ctypes.c_void_p(None),
                ctypes.cast(status, ctypes.c_void_p), ctypes.c_int(flags))
    if ret < 0:
        err = -ret
        raise NumaSyscallError(err, f"move_pages(pid {pid}, {count} pages) failed: "
                               f"{os.strerror(err)} ({errno.errorcode.get(err)})")
    return list(status)
