"""How ``NumaExperts`` divides expert weights over NUMA nodes: the placements, the slice plan
(a pure function) and the up-front capacity check, shared by the float and the quantized layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from composer_numa.machine import capacity, procfs
from composer_numa.units import format_size

__all__ = ["PLACEMENTS"]

#: Ways to place the expert weights over the nodes.
PLACEMENTS = ("split", "replicate", "by-expert")

_ALIGN = 32  # hidden padding and slice boundaries (ext/experts.h kAlign)
_BLOCK = 16  # output rows per packed block (ext/experts.h kBlock)
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class _Slice:
    """One node's share: which experts, which rows of them it stores and computes."""

    node: int
    experts: tuple[int, ...]  # global ids, in local order
    lo: int  # first (padded) intermediate row stored per expert
    rows: int  # rows stored per expert
    row0: int  # rows [row0, row1) of the stored ones are computed by this slice
    row1: int


def _plan(num_experts: int, intermediate: int, nodes: list[int], placement: str,
          align: int = _ALIGN) -> list[_Slice]:
    """Divide the weights over ``nodes`` in multiples of ``align`` rows (a pure function: tested on its own)."""
    padded = _round_up(intermediate, align)
    chunks, n = padded // align, len(nodes)
    everyone = tuple(range(num_experts))
    out: list[_Slice] = []
    for p, node in enumerate(nodes):
        a, b = chunks * p // n * align, chunks * (p + 1) // n * align
        if placement == "split":
            if a < b:
                out.append(_Slice(node, everyone, a, b - a, 0, b - a))
        elif placement == "replicate":
            if a < b:
                out.append(_Slice(node, everyone, 0, padded, a, b))
        else:  # by-expert
            mine = tuple(range(num_experts * p // n, num_experts * (p + 1) // n))
            if mine:
                out.append(_Slice(node, mine, 0, padded, 0, padded))
    return out


def _saved_preactivations(slices: Sequence[_Slice], tokens: int, k: int) -> tuple[list[torch.Tensor], ...]:
    """Per slice, fp32 buffers for the gate and up pre-activations a training forward saves."""
    n = [tokens * k * (s.row1 - s.row0) for s in slices]
    return [torch.empty(v) for v in n], [torch.empty(v) for v in n]


def _local_index(experts: Sequence[int], num_experts: int) -> list[int]:
    """Expert id -> its position in a slice, -1 when the slice does not hold it (O(E))."""
    out = [-1] * num_experts
    for i, e in enumerate(experts):
        out[e] = i
    return out


def _check_size(need: int, nodes: Sequence[int]) -> None:
    """A layer the chosen nodes cannot hold together is a MemoryError here, before any work that
    grows with its size; each node's share is checked again when it is allocated."""
    distinct = sorted(set(nodes))
    room = sum(m.available for m in capacity.read_nodes(distinct).values())
    cgroup = procfs.cgroup_memory_room()
    if cgroup is not None:
        room = min(room, cgroup)
    if need > room:
        raise MemoryError(f"NumaExperts: the expert weights need {format_size(need)}; NUMA node(s) {distinct} "
                          f"can give {format_size(room)}")


def _check_sizes(num_experts: object, hidden: object, intermediate: object) -> None:
    """One-line ValueError for a layer size that is not a positive int (both layers' constructors)."""
    for name, v in (("num_experts", num_experts), ("hidden", hidden), ("intermediate", intermediate)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"NumaExperts: {name} must be a positive int, got {v!r}")


def _check_options(dtype: object, placement: object, fallback: object) -> None:
    """One-line errors for the options both layers take: activation dtype, placement, fallback."""
    if dtype not in _DTYPES:
        raise TypeError(f"NumaExperts: dtype must be torch.bfloat16 or torch.float32, got {dtype}")
    if placement not in PLACEMENTS:
        raise ValueError(f"NumaExperts: placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if fallback not in (None, "split"):
        raise ValueError(f"NumaExperts: fallback must be None or 'split', got {fallback!r}")


def _dense_shape(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> tuple[int, int, int]:
    """(experts, intermediate, hidden) of stacked ``nn.Linear``-layout weights, or a one-line ValueError."""
    for name, t in (("gate", gate), ("up", up), ("down", down)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"NumaExperts.from_dense: {name} must be a 3-D tensor")
    E, inter, H = gate.shape
    if tuple(up.shape) != (E, inter, H) or tuple(down.shape) != (E, H, inter):
        raise ValueError(
            f"NumaExperts.from_dense: expected gate and up [E, intermediate, hidden] and down "
            f"[E, hidden, intermediate]; got gate {tuple(gate.shape)}, up {tuple(up.shape)}, "
            f"down {tuple(down.shape)}")
    return E, inter, H
