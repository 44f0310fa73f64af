"""Node-local tensors: CPU storage placed on a chosen NUMA node.

:func:`empty` maps anonymous memory, binds it to a node with ``mbind`` (raw
syscall, no libnuma), faults every page in with the worker threads of that node
and hands the result to torch through DLPack. The mapping is owned by a C++
object that unmaps it (and un-pins it) when the last tensor viewing it dies.

Whether the node can hold the request is answered by
:mod:`composer_numa.machine.capacity` (what the node can give now and what the
memory cgroup still allows), under its cross-process reservation held until the
pages are faulted in: two ranks cannot both pass a check only one of them fits.
A request that does not fit is a :class:`MemoryError` naming the node, the size
and the node's available, free and total memory, never the OOM killer.

Example:
    >>> import torch
    >>> from composer_numa.offload import memory
    >>> w = memory.empty((1024, 1024), torch.float32, node=0)
    >>> memory.nodes_of(w)        # resident pages per node
    {0: 1024}
    >>> memory.policy_of(w)
    ('bind', [0])
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from composer_numa.diagnostics import BIND_NOT_APPLIED, PIN_NOT_APPLIED, Diagnostic, emit
from composer_numa.machine import capacity, procfs
from composer_numa.offload import runtime
from composer_numa.offload.native import native
from composer_numa.units import format_cpulist

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "PIN_NOT_APPLIED",
    "POLICIES",
    "MAX_NODES",
    "empty",
    "zeros",
    "zero_",
    "nodes_of",
    "policy_of",
    "node_meminfo",
    "memory_nodes",
    "default_node",
    "check_room",
    "reserved",
]

log = logging.getLogger(__name__)

POLICIES = ("bind", "preferred", "interleave")
# Nodes whose cross-process reservation this thread holds (see reserved()).
_held = threading.local()
#: Node ids are below this (the kernel's MAX_NUMNODES is at most 1024).
MAX_NODES = 1024


def _supported_dtypes() -> dict[Any, int]:
    import torch

    return {
        torch.float32: 4,
        torch.float64: 8,
        torch.float16: 2,
        torch.bfloat16: 2,
        torch.int8: 1,
        torch.uint8: 1,
        torch.int16: 2,
        torch.int32: 4,
        torch.int64: 8,
        torch.bool: 1,
    }


def _check_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, int) else shape
    try:
        dims = tuple(dims)
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"shape must be non-negative integers, got {tuple(dims)!r}")
    return dims


def memory_nodes() -> list[int]:
    """Online NUMA nodes with memory that this process may allocate on (Mems_allowed)."""
    return runtime.memory_nodes()


def _check_node(n: Any, what: str = "NUMA node ids") -> int:
    """A node id that exists, has memory and is inside this process's cpuset, or a one-line error."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{what} must be ints, got {n!r}")
    if not 0 <= n < MAX_NODES:
        raise ValueError(f"NUMA node {n} is out of range [0, {MAX_NODES})")
    topology = runtime.machine()
    ids = [x.id for x in topology.nodes]
    if n not in ids:
        raise ValueError(f"NUMA node {n} does not exist (online nodes: {format_cpulist(ids, 'none')})")
    if not topology.node(n).has_memory:
        raise ValueError(f"NUMA node {n} has no memory")
    if topology.allowed_mems and n not in topology.allowed_mems:
        raise ValueError(f"NUMA node {n} is not in this process's cpuset (Mems_allowed "
                         f"{format_cpulist(topology.allowed_mems)})")
    return n


def node_meminfo(node: int) -> dict[str, int]:
    """``{node, total_bytes, free_bytes, available_bytes}`` of one node, now.

    ``available_bytes`` is what :mod:`composer_numa.machine.capacity` counts as the
    node's to give (free + clean page cache + reclaimable slab - low watermark): the
    figure :func:`empty` checks requests against.
    """
    if isinstance(node, bool) or not isinstance(node, int):
        raise TypeError(f"node must be an int, got {node!r}")
    if not 0 <= node < MAX_NODES or node not in [x.id for x in runtime.machine().nodes]:
        ids = [x.id for x in runtime.machine().nodes]
        raise ValueError(f"NUMA node {node} does not exist (online nodes: {format_cpulist(ids, 'none')})")
    m = capacity.read_nodes([node]).get(node)
    if m is None:
        return {"node": node, "total_bytes": 0, "free_bytes": 0, "available_bytes": 0}
    return {"node": node, "total_bytes": m.total, "free_bytes": m.free, "available_bytes": m.available}


def default_node() -> int:
    """The node buffers go to when none is given: the first node of this rank's
    CPUs (the worker pool's nodes) that has memory."""
    return runtime.default_node()


def _resolve_nodes(node: int | Sequence[int] | None, policy: str) -> list[int]:
    if policy not in POLICIES:
        raise ValueError(f"unknown memory policy {str(policy)[:40]!r}; expected one of {', '.join(POLICIES)}")
    if node is None:
        return memory_nodes() if policy == "interleave" else [default_node()]
    try:
        nodes = [node] if isinstance(node, int) else list(node)
    except TypeError:
        raise TypeError(f"NUMA node ids must be ints, got {node!r}") from None
    for n in nodes:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"NUMA node ids must be ints, got {node!r}")
    if policy != "interleave" and len(nodes) != 1:
        raise ValueError(f"policy {policy!r} takes one node, got {nodes}")
    if not nodes:
        raise ValueError("no NUMA node given")
    for n in nodes:
        _check_node(n)
        if nodes.count(n) > 1:
            raise ValueError(f"NUMA node {n} is listed twice")
    return nodes


def check_room(nbytes: int, nodes: Sequence[int], policy: str = "bind") -> None:
    """Raise :class:`MemoryError` when ``nodes`` cannot hold ``nbytes`` under ``policy`` now.

    The one capacity question, asked of :mod:`composer_numa.machine.capacity`: the
    nodes' available memory (a ``preferred`` request may spill over every allowed
    node) and the memory cgroup's room. Call it inside :func:`reserved` (or
    ``capacity.reserve``) when the memory is then allocated.
    """
    spill = memory_nodes() if policy == "preferred" else []
    figures = capacity.read_nodes(sorted({*nodes, *spill}))
    why = capacity.shortfall(nbytes, list(nodes), policy, figures, procfs.cgroup_memory_room(), spill)
    if why is not None:
        raise MemoryError(why)


@contextlib.contextmanager
def reserved(nbytes: int, nodes: Sequence[int], policy: str = "bind") -> Iterator[None]:
    """Hold the cross-process reservation of ``nodes`` and check they can hold ``nbytes``:
    allocate (and fault in) the memory inside the block.

    Nested in a reservation of the same nodes by the same thread (several buffers checked as
    one request, then allocated one by one), it only checks: the locks are already held.
    """
    held: frozenset[int] = getattr(_held, "nodes", frozenset())
    if set(nodes) <= held:
        check_room(nbytes, nodes, policy)
        yield
        return
    with capacity.reserve(nodes):
        _held.nodes = held | set(nodes)
        try:
            check_room(nbytes, nodes, policy)
            yield
        finally:
            _held.nodes = held


def _warn_pin(why: str) -> None:
    emit(Diagnostic(PIN_NOT_APPLIED, f"pin=True not applied: {why}; the buffer is pageable"))


_policy_support_checked = False


def _warn_without_memory_policies() -> None:
    """Once per process: a kernel without NUMA memory policies (CONFIG_NUMA=n, or qemu-user
    emulation) answers mbind with ENOSYS. The extension then leaves each buffer's pages on the
    default policy (one memory node: where they would go anyway); say so once."""
    global _policy_support_checked
    if _policy_support_checked:
        return
    _policy_support_checked = True
    from composer_numa.binding import linux

    try:
        linux.get_mempolicy()
    except linux.NumaSyscallError as e:
        if e.errno == errno.ENOSYS:
            emit(Diagnostic(BIND_NOT_APPLIED, "node-local buffers keep the default memory policy: "
                            "the kernel has no NUMA memory-policy support (ENOSYS)"))


def empty(
    shape: int | Sequence[int],
    dtype: torch.dtype | None = None,
    *,
    node: int | Sequence[int] | None = None,
    policy: str = "bind",
    pin: bool = False,
) -> torch.Tensor:
    """A CPU tensor whose pages are on ``node``, faulted in before it is returned.

    Args:
        shape: the tensor's shape (non-negative ints).
        dtype: float32 (default), float64, float16, bfloat16, int8/16/32/64,
            uint8 or bool.
        node: the node (``bind``, ``preferred``) or nodes (``interleave``).
            Default: the first node of this rank's CPUs; all memory nodes for
            ``interleave``.
        policy: ``bind`` (pages only on that node), ``preferred`` (that node
            first, others when it is full) or ``interleave``.
        pin: page-lock the buffer for fast asynchronous GPU copies (through the
            CUDA runtime torch loaded). Without CUDA this is a no-op with a
            ``pin-not-applied`` warning.

    Returns:
        A contiguous tensor; its values are zero (fresh anonymous pages), but
        callers should not rely on it: use :func:`zeros` to say so.

    Raises:
        MemoryError: the node(s) (or the memory cgroup) cannot hold the request;
            the message names the node, the size and the node's available, free
            and total memory.
        ValueError: a negative dimension, an unknown policy, a node that is out
            of range, does not exist, has no memory or is outside this process's cpuset.
        TypeError: an unsupported dtype or a node id that is not an int.
    """
    import torch

    dims = _check_shape(shape)
    dtype = torch.float32 if dtype is None else dtype
    sizes = _supported_dtypes()
    if dtype not in sizes:
        names = ", ".join(str(d).replace("torch.", "") for d in sizes)
        raise TypeError(f"dtype {dtype} is not supported by composer_numa.offload.memory (use {names})")
    nodes = _resolve_nodes(node, policy)
    nbytes = math.prod(dims) * sizes[dtype]  # Python ints: no overflow, any size is checked below
    if nbytes == 0:
        return torch.empty(dims, dtype=dtype)  # no pages to place
    want_pin = False
    if pin:
        if torch.cuda.is_available():
            torch.cuda.init()  # the C++ side page-locks through the runtime torch loads
            want_pin = True
        else:
            _warn_pin("CUDA is not available")
    _warn_without_memory_policies()
    with reserved(nbytes, nodes, policy):
        capsule, pinned, why = native().alloc(runtime.pool(), nbytes, nodes, policy, want_pin)
    if want_pin and not pinned:
        _warn_pin(why)
    return torch.from_dlpack(capsule).view(dtype).view(dims)


def zeros(
    shape: int | Sequence[int],
    dtype: torch.dtype | None = None,
    *,
    node: int | Sequence[int] | None = None,
    policy: str = "bind",
    pin: bool = False,
) -> torch.Tensor:
    """Like :func:`empty`, zero-filled (fresh pages are zero; this only makes it explicit)."""
    return empty(shape, dtype, node=node, policy=policy, pin=pin)


def zero_(tensor: torch.Tensor, node: int | None = None) -> torch.Tensor:
    """Zero a contiguous CPU tensor in place with the pinned workers of ``node``
    (all workers when ``None``), so node-local buffers are written by local cores."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"zero_ needs a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu" or tensor.layout != torch.strided:
        raise ValueError(f"zero_ needs a dense CPU tensor, got a {tensor.layout} one on {tensor.device}")
    if not tensor.is_contiguous():
        raise ValueError("zero_ needs a contiguous tensor")
    if node is not None and (isinstance(node, bool) or not isinstance(node, int) or not -1 <= node < MAX_NODES):
        raise ValueError(f"zero_: node must be None or an int in [0, {MAX_NODES}), got {node!r}")
    if tensor.numel():
        native().zero_(runtime.pool(), tensor.detach(), -1 if node is None else node)
    return tensor


def _storage_span(tensor: torch.Tensor) -> tuple[int, int]:
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"pages can only be located for CPU tensors, got one on {tensor.device}")
    if tensor.layout != torch.strided:
        raise ValueError(f"pages can only be located for strided tensors, got {tensor.layout}")
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def nodes_of(tensor: torch.Tensor) -> dict[int, int]:
    """Resident pages of ``tensor``'s storage per NUMA node (``move_pages`` query).

    Pages not faulted in yet are counted under key ``-1``. Works for any CPU
    tensor, not only those from :func:`empty`.
    """
    ptr, nbytes = _storage_span(tensor)
    if nbytes == 0:
        return {}
    return dict(sorted(native().pages_per_node(ptr, nbytes).items()))


def policy_of(tensor: torch.Tensor) -> tuple[str, list[int]]:
    """The memory policy of the mapping holding ``tensor``'s first byte:
    ``(mode, nodes)`` with mode ``default``, ``bind``, ``preferred``, ``interleave`` ..."""
    ptr, nbytes = _storage_span(tensor)
    if nbytes == 0:
        raise ValueError("an empty tensor has no pages")
    mode, nodes = native().mempolicy_of(ptr)
    return mode, list(nodes)
