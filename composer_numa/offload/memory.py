"""Node-local tensors: CPU storage placed on a chosen NUMA node.

:func:`empty` maps anonymous memory, binds it to a node with ``mbind`` (raw
syscall, no libnuma), faults every page in with the worker threads of that node
and hands the result to torch through DLPack. The mapping is owned by a C++
object that unmaps it (and un-pins it) when the last tensor viewing it dies.
Before a page is touched the node's free memory is checked, so a request the
node cannot hold is a :class:`MemoryError` naming the node, the size and the
node's free memory, never the OOM killer.

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

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from composer_numa.diagnostics import PIN_NOT_APPLIED, Diagnostic, emit
from composer_numa.offload.native import native

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "PIN_NOT_APPLIED",
    "POLICIES",
    "empty",
    "zeros",
    "zero_",
    "nodes_of",
    "policy_of",
    "node_meminfo",
    "memory_nodes",
    "default_node",
]

log = logging.getLogger(__name__)

POLICIES = ("bind", "preferred", "interleave")


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
    return list(native().memory_nodes())


def node_meminfo(node: int) -> dict[str, int]:
    """``{node, total_bytes, free_bytes, available_bytes}`` of one node, from sysfs.

    ``available_bytes`` adds the page cache and slab that reclaim can return,
    minus a reserve: the figure :func:`empty` checks requests against.
    """
    return dict(native().node_meminfo(int(node)))


def default_node() -> int:
    """The node buffers go to when none is given: the first node of this rank's
    CPUs (the worker pool follows the process's affinity) that has memory."""
    c = native()
    mem = set(c.memory_nodes())
    for n in c.worker_nodes():
        if n in mem:
            return n
    return min(mem) if mem else 0


def _resolve_nodes(node: int | Sequence[int] | None, policy: str) -> list[int]:
    if policy not in POLICIES:
        raise ValueError(f"unknown memory policy {policy!r}; expected one of {', '.join(POLICIES)}")
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
    return nodes


def _warn_pin(why: str) -> None:
    emit(Diagnostic(PIN_NOT_APPLIED, f"pin=True not applied: {why}; the buffer is pageable"))


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
        MemoryError: the node(s) cannot hold the request (message names the
            node, the size and the node's free memory).
        ValueError: a negative dimension, an unknown policy, a node that does
            not exist, has no memory or is outside this process's cpuset.
        TypeError: an unsupported dtype.
    """
    import torch

    dims = _check_shape(shape)
    dtype = torch.float32 if dtype is None else dtype
    sizes = _supported_dtypes()
    if dtype not in sizes:
        names = ", ".join(str(d).replace("torch.", "") for d in sizes)
        raise TypeError(f"dtype {dtype} is not supported by composer_numa.offload.memory (use {names})")
    nodes = _resolve_nodes(node, policy)
    nbytes = math.prod(dims) * sizes[dtype]
    if nbytes == 0:
        return torch.empty(dims, dtype=dtype)  # no pages to place
    if nbytes >= 1 << 62:
        raise MemoryError(f"cannot allocate {nbytes} bytes on NUMA node {nodes[0]}: "
                          "larger than any machine's memory")
    want_pin = False
    if pin:
        if torch.cuda.is_available():
            torch.cuda.init()  # the C++ side page-locks through the runtime torch loads
            want_pin = True
        else:
            _warn_pin("CUDA is not available")
    capsule, pinned, why = native().alloc(nbytes, nodes, policy, want_pin)
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
    if tensor.device.type != "cpu":
        raise ValueError(f"zero_ needs a CPU tensor, got one on {tensor.device}")
    if not tensor.is_contiguous():
        raise ValueError("zero_ needs a contiguous tensor")
    if tensor.numel():
        native().zero_(tensor.detach(), -1 if node is None else int(node))
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
