"""Where a process's pages really are: ``/proc/<pid>/numa_maps`` parsed per node.

Each line of ``numa_maps`` is one mapping with its policy and, for resident
pages, ``N<node>=<pages>`` counts in units of the mapping's page size
(``kernelpagesize_kB``: 4 kB normally, 2048 kB / 1 GB for hugetlb mappings,
whose lines carry ``huge``). We sum them into bytes per node, keeping the
process's own memory (anonymous, heap, stack, shared memory, hugetlb) apart
from page cache of mapped files, which sits wherever the file was first read
and says nothing about the binding.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from composer_numa.units import parse_cpulist

__all__ = [
    "NumaMaps",
    "parse_numa_maps",
    "read_numa_maps",
    "local_fraction",
    "parse_policy",
    "task_policy",
]

_NODES = re.compile(r" N(\d+)=")
_PAGE_KB = re.compile(r" kernelpagesize_kB=(\d+)")
_HUGE = re.compile(r" huge(?= |$)")
# File-backed mappings whose pages are process memory, placed by the policy of the faulting task.
_PROCESS_FILES = ("/dev/shm/", "/memfd:", "/anon_hugepage", "/SYSV", "/dev/zero")


@dataclass(frozen=True)
class NumaMaps:
    """Resident bytes per NUMA node of one process.

    Attributes:
        process: bytes of the process's own memory per node (anonymous mappings,
            heap, stack, shared memory, hugetlb pages).
        file: bytes of mapped files' page cache per node.
        huge: hugetlb bytes per node (already included in ``process``).
        mappings: number of mappings (lines) read.
    """

    process: dict[int, int] = field(default_factory=dict)
    file: dict[int, int] = field(default_factory=dict)
    huge: dict[int, int] = field(default_factory=dict)
    mappings: int = 0

    @property
    def total(self) -> dict[int, int]:
        """All resident bytes per node, process memory and file cache together."""
        out = dict(self.process)
        for n, b in self.file.items():
            out[n] = out.get(n, 0) + b
        return dict(sorted(out.items()))

    def local_fraction(self, nodes: Iterable[int], *, include_file: bool = False) -> float | None:
        """Fraction of resident bytes on ``nodes`` (process memory only by default)."""
        return local_fraction(self.total if include_file else self.process, nodes)

    def to_json(self) -> dict:
        return {
            "process_bytes_by_node": {str(k): v for k, v in sorted(self.process.items())},
            "file_bytes_by_node": {str(k): v for k, v in sorted(self.file.items())},
            "huge_bytes_by_node": {str(k): v for k, v in sorted(self.huge.items())},
            "mappings": self.mappings,
        }


def _sum_by_node(lines: list[str], unit: int, into: dict[int, int]) -> None:
    # One C-level regex pass per node present beats a Python loop over every N= field.
    text = "\n".join(lines)
    for node in set(_NODES.findall(text)):
        pages = sum(map(int, re.findall(rf" N{node}=(\d+)", text)))
        into[int(node)] = into.get(int(node), 0) + pages * unit


def _is_page_cache(line: str) -> bool:
    i = line.find(" file=")
    if i < 0 or _HUGE.search(line):
        return False
    return not line.startswith(_PROCESS_FILES, i + 6)


def parse_numa_maps(text: str, *, base_page_kb: int | None = None) -> NumaMaps:
    """Sum a ``numa_maps`` text into bytes per node.

    Args:
        text: the file's contents.
        base_page_kb: the base page size, used for lines without
            ``kernelpagesize_kB`` (very old kernels); default: this system's.
    """
    base_kb = base_page_kb or os.sysconf("SC_PAGE_SIZE") // 1024
    process: dict[int, int] = {}
    file: dict[int, int] = {}
    huge: dict[int, int] = {}
    lines = text.splitlines()
    mappings = len(lines) - lines.count("")
    # Lines are sorted into buckets with C-level substring tests and summed per
    # bucket, so a 65k-mapping file takes tens of milliseconds, not a second.
    resident = [ln for ln in lines if " N" in ln]
    suffix = f" kernelpagesize_kB={base_kb}"
    plain = [ln for ln in resident if ln.endswith(suffix) and " huge" not in ln]
    if len(plain) != len(resident):
        # Huge pages or another page size: few lines, bucketed by (unit, huge, page cache).
        buckets: dict[tuple[int, bool, bool], list[str]] = {}
        for line in resident:
            if line.endswith(suffix) and " huge" not in line:
                continue
            m = _PAGE_KB.search(line)
            unit = (int(m.group(1)) if m else base_kb) * 1024
            key = (unit, _HUGE.search(line) is not None, _is_page_cache(line))
            buckets.setdefault(key, []).append(line)
        for (unit, is_huge, is_cache), group in buckets.items():
            _sum_by_node(group, unit, file if is_cache else process)
            if is_huge:
                _sum_by_node(group, unit, huge)
    cache = [ln for ln in plain if " file=" in ln]
    if cache:
        cache = [ln for ln in cache if _is_page_cache(ln)]
        if cache:
            cached = set(cache)
            plain = [ln for ln in plain if ln not in cached]
    _sum_by_node(cache, base_kb * 1024, file)
    _sum_by_node(plain, base_kb * 1024, process)
    return NumaMaps(dict(sorted(process.items())), dict(sorted(file.items())),
                    dict(sorted(huge.items())), mappings)


def read_numa_maps(pid: int | str = "self", *, proc_root: str = "/proc") -> NumaMaps:
    """Read and sum ``<proc_root>/<pid>/numa_maps``.

    Raises:
        OSError: the file cannot be read (no such process, not permitted, or a
            kernel without NUMA support, which has no ``numa_maps``).
    """
    with open(os.path.join(proc_root, str(pid), "numa_maps"), "rb") as f:
        data = f.read()
    return parse_numa_maps(data.decode("ascii", "replace"))


def local_fraction(bytes_by_node: Mapping[int, int], nodes: Iterable[int]) -> float | None:
    """Share of the bytes that sit on ``nodes``; None when there are no bytes at all."""
    total = sum(bytes_by_node.values())
    if total <= 0:
        return None
    wanted = set(nodes)
    return sum(b for n, b in bytes_by_node.items() if n in wanted) / total


# mpol_to_str(): mode, optional "=static"/"=relative" flags, optional ":<nodelist>".
_POLICY = re.compile(
    r"(default|local|prefer \(many\)|prefer|bind|interleave|weighted interleave)"
    r"(?:=[a-z|]+)?(?::([0-9,\-]+))?(?= |$)"
)
_POLICY_NAME = {
    "default": "default",
    "local": "local",
    "prefer": "preferred",
    "prefer (many)": "preferred-many",
    "bind": "bind",
    "interleave": "interleave",
    "weighted interleave": "weighted-interleave",
}


def _policy_of(match: re.Match) -> tuple[str, tuple[int, ...]]:
    nodes = parse_cpulist(match.group(2)) if match.group(2) else ()
    return _POLICY_NAME[match.group(1)], nodes


def parse_policy(text: str) -> tuple[str, tuple[int, ...]] | None:
    """Parse a policy as ``numa_maps`` prints it (``prefer:1``, ``bind=static:0-1``,
    ``prefer (many):0,2``, ``local``) into ``(name, nodes)`` named as in
    :data:`composer_numa.binding.linux.POLICY_NAMES`; None if it is not a policy."""
    m = _POLICY.fullmatch(text.strip())
    return None if m is None else _policy_of(m)


def task_policy(pid: int | str = "self", tid: int | None = None, *,
                proc_root: str = "/proc") -> tuple[str, tuple[int, ...]] | None:
    """The memory policy of a thread as its ``numa_maps`` shows it; None if unreadable.

    The kernel prints a mapping that has no policy of its own with the policy
    of the task whose file is read, so the most common policy in the first
    chunk is that thread's (default: the main thread's). Only 8 KiB are read.
    """
    path = (os.path.join(proc_root, str(pid), "numa_maps") if tid is None
            else os.path.join(proc_root, str(pid), "task", str(tid), "numa_maps"))
    try:
        with open(path, "rb") as f:
            chunk = f.read(8192).decode("ascii", "replace")
    except OSError:
        return None
    lines = chunk.splitlines()
    if len(chunk) == 8192 and len(lines) > 1:
        lines.pop()  # may be cut short
    counts: dict[tuple[str, tuple[int, ...]], int] = {}
    for line in lines:
        m = _POLICY.match(line.partition(" ")[2])
        if m is not None:
            pol = _policy_of(m)
            counts[pol] = counts.get(pol, 0) + 1
    if not counts:
        return None
    # Most mappings carry the task policy; an mbind()ed region is the exception.
    return max(counts.items(), key=lambda kv: kv[1])[0]
