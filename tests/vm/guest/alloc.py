"""Guest program: allocate and touch memory, then report where it really is.

Run inside a VM guest (often under ``numactl`` or ``composer-numa exec``). It prints one JSON
line: the process's CPU affinity (every thread), its memory policy read with
``get_mempolicy(2)``, the policy and per-node page counts of the allocation read from
``/proc/self/numa_maps``, and the ``COMPOSER_NUMA_BINDING`` it was given. Everything is
read straight from the kernel with code of its own, so that it checks composer_numa
rather than agreeing with it.

Usage: alloc.py MIB [--touch-from-cpu CPU]

``--touch-from-cpu`` moves the process onto CPU before it touches the memory (after its
inherited affinity was recorded): pages then land on the policy's node only if the memory
policy really works, not merely because the process runs there.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re

MPOL_NAMES = {0: "default", 1: "preferred", 2: "bind", 3: "interleave", 4: "local",
              5: "preferred-many", 6: "weighted-interleave"}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
NR_GET_MEMPOLICY = 239  # x86_64 (the guests are x86_64)


def get_mempolicy() -> tuple[str, list[int]]:
    mode = ctypes.c_int(0)
    mask = (ctypes.c_ulong * 16)()  # 1024 nodes
    ret = _libc.syscall(NR_GET_MEMPOLICY, ctypes.byref(mode), mask, ctypes.c_ulong(1024),
                        ctypes.c_void_p(None), ctypes.c_ulong(0))
    if ret < 0:
        raise OSError(ctypes.get_errno(), "get_mempolicy")
    nodes = [w * 64 + b for w in range(16) for b in range(64) if mask[w] >> b & 1]
    m = mode.value & 0x1FFF  # strip MPOL_F_STATIC_NODES / RELATIVE_NODES / NUMA_BALANCING
    return MPOL_NAMES.get(m, str(m)), nodes


def thread_affinities() -> dict[str, list[int]]:
    return {tid: sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")}


def mapping_numa(address: int) -> dict:
    """Policy and N<node>=pages of the numa_maps line starting at ``address``."""
    with open("/proc/self/numa_maps") as f:
        for line in f:
            start, _, rest = line.partition(" ")
            if int(start, 16) == address:
                fields = rest.split()
                pages = {int(n): int(c) for n, c in re.findall(r"\bN(\d+)=(\d+)", rest)}
                kb = re.search(r"kernelpagesize_kB=(\d+)", rest)
                return {"policy": fields[0], "pages": pages,
                        "page_kb": int(kb.group(1)) if kb else 4, "line": line.strip()}
    raise LookupError(f"no numa_maps line at {address:#x}")


def vma_size(address: int) -> int:
    """Length of the mapping that starts at ``address`` (/proc/self/maps)."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, _, hi = line.split()[0].partition("-")
            if int(lo, 16) == address:
                return int(hi, 16) - int(lo, 16)
    raise LookupError(f"no mapping at {address:#x}")


def allocate(size: int) -> tuple[object, int]:
    """``size`` bytes of anonymous memory in a mapping of its own, touched page by page.

    PROT_NONE guard pages on both sides keep the kernel from merging it with neighbouring
    anonymous mappings, so its numa_maps line counts exactly these pages.
    Returns (the mmap object, keep it alive; the start address).
    """
    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, size + 2 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    for guard in (base, base + page + size):
        if _libc.mprotect(ctypes.c_void_p(guard), ctypes.c_size_t(page), 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")
    address = base + page
    ctypes.memset(address, 1, size)  # first touch of every page, by this thread
    return buf, address


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("mib", type=int)
    ap.add_argument("--touch-from-cpu", type=int, default=None)
    args = ap.parse_args()
    mib = args.mib
    size = mib << 20
    affinity, threads = sorted(os.sched_getaffinity(0)), thread_affinities()
    if args.touch_from_cpu is not None:
        os.sched_setaffinity(0, {args.touch_from_cpu})
    _keep, address = allocate(size)
    numa = mapping_numa(address)
    page_bytes = numa["page_kb"] << 10
    binding = os.environ.get("COMPOSER_NUMA_BINDING")
    policy, nodes = get_mempolicy()
    out = {
        "pid": os.getpid(),
        "mib": mib,
        "affinity": affinity,
        "threads": threads,
        "touched_from": sorted(os.sched_getaffinity(0)),
        "mempolicy": {"mode": policy, "nodes": nodes},
        "map_policy": numa["policy"],
        "pages": {str(n): c for n, c in sorted(numa["pages"].items())},
        "expected_pages": size // page_bytes,
        "vma_bytes": vma_size(address),
        "binding": json.loads(binding) if binding else None,
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
