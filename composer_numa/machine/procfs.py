"""The procfs and cgroup text formats composer-numa reads: ``status``, ``meminfo``,
``zoneinfo`` and the memory cgroup's limit and usage.

Each function takes the roots as arguments, so recorded trees stand in for a
live machine; each is the only parser of its format in the package.
"""

from __future__ import annotations

import os
import re

from composer_numa.machine.files import read_optional

__all__ = ["status", "parse_meminfo", "parse_low_watermarks", "cgroup_memory_room"]

_MEMINFO = re.compile(r"(?:Node\s+\d+\s+)?([\w()]+):\s+(\d+)(\s*kB)?")


def status(proc_root: str = "/proc", pid: int | str = "self", problems: list[str] | None = None) -> dict[str, str]:
    """``<proc_root>/<pid>/status`` as ``{key: value}`` (values stripped); empty when unreadable."""
    text = read_optional(os.path.join(proc_root, str(pid), "status"), problems) or ""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def parse_meminfo(text: str) -> dict[str, int]:
    """``Key: value kB`` lines (a node's meminfo prefixes them with ``Node N``) -> bytes."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = _MEMINFO.match(line)
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if m.group(3) else 1)
    return out


def parse_low_watermarks(text: str, page_size: int) -> dict[int, int]:
    """Bytes of the ``low`` watermark per node, summed over its zones, from ``/proc/zoneinfo``."""
    out: dict[int, int] = {}
    node = None
    for line in text.splitlines():
        head = re.match(r"Node\s+(\d+),\s+zone", line)
        if head:
            node = int(head.group(1))
            continue
        m = re.match(r"\s+low\s+(\d+)\s*$", line)
        if m and node is not None:
            out[node] = out.get(node, 0) + int(m.group(1)) * page_size
    return out


def _cgroup_dirs(proc_root: str, cgroup_root: str, problems: list[str] | None) -> list[tuple[str, int]]:
    """(directory, version) of this process's memory cgroup and its ancestors, innermost first."""
    text = read_optional(os.path.join(proc_root, "self/cgroup"), problems) or ""
    out: list[tuple[str, int]] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "" and parts[0] == "0":
            base, version = cgroup_root, 2
            if os.path.isdir(os.path.join(cgroup_root, "unified")) and not os.path.exists(
                    os.path.join(cgroup_root, "memory.max")):
                base = os.path.join(cgroup_root, "unified")
        elif "memory" in controllers.split(","):
            base, version = os.path.join(cgroup_root, "memory"), 1
        else:
            continue
        rel = path.strip("/")
        while True:
            d = os.path.join(base, rel) if rel else base
            if os.path.isdir(d):
                out.append((d, version))
            if not rel:
                break
            rel = os.path.dirname(rel)
    # v1 wins when both are listed: on hybrid hosts the memory controller sits in v1.
    v1 = [x for x in out if x[1] == 1]
    return v1 or out


def _stat(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def cgroup_memory_room(proc_root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup",
                       problems: list[str] | None = None) -> int | None:
    """Bytes the process's memory cgroup (and its ancestors) still let it allocate, counting
    clean page cache and reclaimable slab charged to the cgroup as available; None when unlimited."""
    best: int | None = None
    for d, version in _cgroup_dirs(proc_root, cgroup_root, problems):
        if version == 2:
            limit_s = read_optional(os.path.join(d, "memory.max"), problems)
            usage_s = read_optional(os.path.join(d, "memory.current"), problems)
            st = _stat(read_optional(os.path.join(d, "memory.stat"), problems))
            file = st.get("file", 0) - st.get("file_dirty", 0) - st.get("file_writeback", 0)
            slab = st.get("slab_reclaimable", 0)
        else:
            limit_s = read_optional(os.path.join(d, "memory.limit_in_bytes"), problems)
            usage_s = read_optional(os.path.join(d, "memory.usage_in_bytes"), problems)
            st = _stat(read_optional(os.path.join(d, "memory.stat"), problems))
            file = (st.get("total_cache", st.get("cache", 0)) - st.get("total_dirty", st.get("dirty", 0))
                    - st.get("total_writeback", st.get("writeback", 0)))
            slab = 0
        if not limit_s or not usage_s or limit_s == "max" or not limit_s.isdigit() or not usage_s.isdigit():
            continue
        limit, usage = int(limit_s), int(usage_s)
        if limit >= 1 << 60:  # v1 writes "unlimited" as a huge number
            continue
        room = max(0, limit - usage + max(0, file) + max(0, slab))
        best = room if best is None else min(best, room)
    return best
