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

__all__ = ["RankEnv", "detect", "resolve", "parse_slurm_tasks_per_node"]


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


def _int(env: Mapping[str, str], name: str, *, minimum: int) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise ComposerNumaError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ComposerNumaError(f"{name}={raw!r} must be at least {minimum}")
    return value


def parse_slurm_tasks_per_node(text: str) -> list[int]:
    """Expand Slurm's compressed task counts: ``"4(x2),3"`` -> ``[4, 4, 3]``.

    Raises:
        ComposerNumaError: the text is not in that format.
    """
    out: list[int] = []
    for part in text.strip().split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ComposerNumaError(
                f"SLURM_TASKS_PER_NODE={text!r} is not a task list like '4(x2),3'")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def _slurm_size(env: Mapping[str, str]) -> int | None:
    per_node = _int(env, "SLURM_NTASKS_PER_NODE", minimum=1)
    if per_node is not None:
        return per_node
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        raw = env.get(name)
        if raw:
            counts = parse_slurm_tasks_per_node(raw)
            node = _int(env, "SLURM_NODEID", minimum=0) or 0
            if node >= len(counts):
                raise ComposerNumaError(
                    f"SLURM_NODEID={node} but {name}={raw!r} lists only {len(counts)} node(s)")
            return counts[node]
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
            environ: Mapping[str, str] | None = None) -> RankEnv:
    """Explicit values first, then :func:`detect`, else rank 0 of 1.

    Raises:
        ComposerNumaError: negative values, a rank not below the size, or a
            rank whose local world size nobody gave (the plan depends on it).
    """
    if local_rank is not None and local_rank < 0:
        raise ComposerNumaError(f"--local-rank must not be negative, got {local_rank}")
    if nproc is not None and nproc < 1:
        raise ComposerNumaError(f"--nproc must be at least 1, got {nproc}")
    found = None if local_rank is not None and nproc is not None else detect(environ)
    if local_rank is not None:
        size = nproc if nproc is not None else (found.local_world_size if found else None)
        rank, source = local_rank, "arguments"
    elif found is not None:
        rank, source = found.local_rank, found.source
        size = nproc if nproc is not None else found.local_world_size
    else:
        rank, source, size = 0, "default", nproc if nproc is not None else 1
    if size is None:
        raise ComposerNumaError(f"local rank {rank} comes from {source} but the local world size "
                                "is not set; pass --nproc")
    if rank >= size:
        raise ComposerNumaError(f"local rank {rank} ({source}) is not below the local world "
                                f"size {size}; pass --nproc")
    return RankEnv(rank, size, source)
