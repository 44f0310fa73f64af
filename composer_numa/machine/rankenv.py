"""Which local rank this process is, from the variables launchers set.

Read in this order (the first launcher whose variables are present wins):

1. ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` — torchrun, Composer's launcher, DeepSpeed.
2. ``OMPI_COMM_WORLD_LOCAL_RANK`` / ``OMPI_COMM_WORLD_LOCAL_SIZE`` — Open MPI's mpirun.
3. ``MPI_LOCALRANKID`` / ``MPI_LOCALNRANKS`` — MPICH / Intel MPI (Hydra).
4. ``SLURM_LOCALID`` with ``SLURM_NTASKS_PER_NODE``, or the per-node list in
   ``SLURM_STEP_TASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE`` (``"4(x2),3"``)
   indexed by ``SLURM_NODEID`` — srun.

Slurm comes last because an ``sbatch`` script's environment already holds
``SLURM_*`` values for the batch step, which an mpirun inside it inherits.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from composer_numa.errors import ComposerNumaError

__all__ = ["RankEnv", "MAX_LOCAL_RANKS", "detect", "resolve", "parse_slurm_tasks_per_node", "slurm_tasks_on_node"]


@dataclass(frozen=True)
class RankEnv:
    """This process's place on its host.

    Attributes:
        local_rank: rank among the processes on this host.
        local_world_size: processes on this host; None when the launcher did not say.
        source: where it came from (``"arguments"``, ``"LOCAL_RANK"``, ``"openmpi"``,
            ``"mpich"``, ``"slurm"`` or ``"default"``).
    """

    local_rank: int
    local_world_size: int | None
    source: str


#: Largest local rank or local world size accepted (no host runs more processes than this).
MAX_LOCAL_RANKS = 1 << 16


def _int(env: Mapping[str, str], name: str, *, minimum: int) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        raise ComposerNumaError(f"{name}={_shown(raw)} is not a whole number from {minimum} to {MAX_LOCAL_RANKS - 1}")
    value = int(text)
    if value < minimum or value >= MAX_LOCAL_RANKS:
        raise ComposerNumaError(f"{name}={_shown(raw)} is not a whole number from {minimum} to {MAX_LOCAL_RANKS - 1}")
    return value


def _shown(raw: str) -> str:
    return repr(raw if len(raw) <= 40 else raw[:40] + "...")


def _slurm_groups(text: str, name: str) -> list[tuple[int, int]]:
    """``"4(x2),3"`` -> ``[(4, 2), (3, 1)]`` (count, repeat), without expanding the repeats."""
    out: list[tuple[int, int]] = []
    for part in text.strip().split(","):
        m = re.fullmatch(r"\s*(\d{1,9})(?:\(x(\d{1,12})\))?\s*", part)
        if m is None:
            raise ComposerNumaError(f"{name}={_shown(text)} is not a task list like '4(x2),3'")
        out.append((int(m.group(1)), int(m.group(2) or 1)))
    return out


def parse_slurm_tasks_per_node(text: str, name: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """Expand Slurm's compressed task counts: ``"4(x2),3"`` -> ``[4, 4, 3]``.

    Raises:
        ComposerNumaError: the text is not in that format, or lists more than a million nodes.
    """
    groups = _slurm_groups(text, name)
    if sum(r for _, r in groups) > 1 << 20:
        raise ComposerNumaError(f"{name}={_shown(text)} lists more than a million nodes")
    return [count for count, repeat in groups for _ in range(repeat)]


def slurm_tasks_on_node(text: str, node: int, name: str = "SLURM_TASKS_PER_NODE") -> int | None:
    """The task count of node index ``node`` in a compressed Slurm list; None when it lists fewer nodes."""
    for count, repeat in _slurm_groups(text, name):
        if node < repeat:
            return count
        node -= repeat
    return None


def _slurm_size(env: Mapping[str, str]) -> int | None:
    per_node = _int(env, "SLURM_NTASKS_PER_NODE", minimum=1)
    if per_node is not None:
        return per_node
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        raw = env.get(name)
        if raw:
            node = _int(env, "SLURM_NODEID", minimum=0) or 0
            count = slurm_tasks_on_node(raw, node, name)
            if count is None:
                raise ComposerNumaError(
                    f"SLURM_NODEID={node} but {name}={_shown(raw)} lists fewer than {node + 1} node(s)")
            if not 1 <= count < MAX_LOCAL_RANKS:
                raise ComposerNumaError(f"{name}={_shown(raw)} gives node {node} {count} tasks")
            return count
    return None


_SOURCES = (
    ("LOCAL_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ("openmpi", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("mpich", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)


def detect(environ: Mapping[str, str] | None = None) -> RankEnv | None:
    """The local rank and size a launcher set, or None when none did.

    Raises:
        ComposerNumaError: a variable is malformed or the rank is not below the size.
    """
    env = os.environ if environ is None else environ
    found: RankEnv | None = None
    for source, rank_var, size_var in _SOURCES:
        rank = _int(env, rank_var, minimum=0)
        if rank is not None:
            found = RankEnv(rank, _int(env, size_var, minimum=1), source)
            break
    if found is None:
        rank = _int(env, "SLURM_LOCALID", minimum=0)
        if rank is not None:
            found = RankEnv(rank, _slurm_size(env), "slurm")
    if found is not None and found.local_world_size is not None:
        if found.local_rank >= found.local_world_size:
            raise ComposerNumaError(
                f"local rank {found.local_rank} from {found.source} is not below the local "
                f"world size {found.local_world_size}")
    return found


def resolve(local_rank: int | None = None, nproc: int | None = None,
            environ: Mapping[str, str] | None = None, default_size: int = 1) -> RankEnv:
    """Explicit values first, then :func:`detect`, else rank 0 of ``default_size``.

    ``default_size`` is what a host runs when nobody says otherwise: one rank
    per visible GPU (or 1), as Composer's launcher and torchrun count them.

    Raises:
        ComposerNumaError: negative values, a rank not below the size, or a
            rank whose local world size nobody gave (the plan depends on it).
    """
    if local_rank is not None and not 0 <= local_rank < MAX_LOCAL_RANKS:
        raise ComposerNumaError(f"--local-rank must be between 0 and {MAX_LOCAL_RANKS - 1}, got {local_rank}")
    if nproc is not None and not 1 <= nproc <= MAX_LOCAL_RANKS:
        raise ComposerNumaError(f"--nproc must be between 1 and {MAX_LOCAL_RANKS}, got {nproc}")
    found = None if local_rank is not None and nproc is not None else detect(environ)
    if local_rank is not None:
        size = nproc if nproc is not None else (found.local_world_size if found else None)
        rank, source = local_rank, "arguments"
    elif found is not None:
        rank, source = found.local_rank, found.source
        size = nproc if nproc is not None else found.local_world_size
    else:
        rank, source, size = 0, "default", nproc if nproc is not None else max(1, default_size)
    if size is None:
        raise ComposerNumaError(f"local rank {rank} comes from {source} but the local world size "
                                "is not set; pass --nproc")
    if rank >= size:
        raise ComposerNumaError(f"local rank {rank} ({source}) is not below the local world "
                                f"size {size}; pass --nproc")
    return RankEnv(rank, size, source)
