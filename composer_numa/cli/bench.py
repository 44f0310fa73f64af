"""``composer-numa bench``: what memory bandwidth this rank's cores actually get.

``--bandwidth`` runs STREAM-style probes of the C++ extension on the pinned
worker pool (one worker per physical core of this process's CPUs): ``read``,
``copy``, ``triad`` and ``adamw`` (in place, 4 reads and 3 writes per element:
the optimizer's traffic), then the node-to-node matrix: workers on node i
reading a buffer bound to node j. Bytes are counted the STREAM way (no
write-allocate traffic). Never imports torch.

Example:
    composer-numa bench --bandwidth --size 256M --passes 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from typing import Any

from composer_numa.cli.options import count
from composer_numa.errors import ComposerNumaError
from composer_numa.offload import memory, runtime
from composer_numa.offload.native import NativeExtensionError, native
from composer_numa.units import format_size, parse_size

__all__ = ["register", "run", "measure"]

log = logging.getLogger(__name__)

KERNELS = ("read", "copy", "triad", "adamw")
_STREAMS = {"read": 1, "copy": 2, "triad": 3, "adamw": 7}
_ARRAYS = {"read": 1, "copy": 2, "triad": 3, "adamw": 4}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure memory bandwidth per node and the node-to-node matrix",
        description="STREAM-style bandwidth probes on pinned workers (one per physical core of "
        "this process's CPUs) and the node-to-node read bandwidth matrix.",
    )
    p.add_argument("--bandwidth", action="store_true",
                   help="run the bandwidth probes (the default benchmark)")
    p.add_argument("--size", default="256M", metavar="SIZE",
                   help="bytes per array, e.g. 256M (default 256M)")
    p.add_argument("--passes", type=lambda t: count(t, "a number of passes", 1000), default=5,
                   help="timed passes per probe (default 5)")
    p.add_argument("--threads", type=lambda t: count(t, "a number of workers", 4096), default=None,
                   help="workers (default: one per physical core of this process's CPUs)")
    p.add_argument("--no-matrix", action="store_true", help="skip the node-to-node matrix")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=run)


def _rate(r: dict[str, Any]) -> tuple[float, float]:
    """(best, median) GB/s of one probe, the first pass counted as warm-up when possible."""
    secs = r["seconds"][1:] if len(r["seconds"]) > 1 else r["seconds"]
    return r["bytes_per_pass"] / min(secs) / 1e9, r["bytes_per_pass"] / statistics.median(secs) / 1e9


def measure(size: int, passes: int, matrix: bool = True) -> dict[str, Any]:
    """Run the probes; returns the JSON document ``--format json`` prints.

    Args:
        size: bytes per array.
        passes: timed passes per probe (one more is run as warm-up).
        matrix: also measure every (CPU node, memory node) pair.
    """
    try:
        c = native()
        pool = runtime.pool()
    except (NativeExtensionError, ValueError) as e:
        raise ComposerNumaError(str(e)) from None
    elements = max(1024, size // 4)
    array_bytes = -(-elements // 16) * 16 * 4  # the probe rounds arrays up to 16 elements
    cpu_nodes = list(pool.nodes())
    mem_nodes = runtime.memory_nodes()
    home = next((n for n in cpu_nodes if n in mem_nodes), mem_nodes[0] if mem_nodes else 0)
    doc: dict[str, Any] = {
        "schema": 1,
        "threads": pool.size,
        "workers": [{"cpu": w["cpu"], "node": w["node"]} for w in pool.workers()],
        "bytes_per_array": elements * 4,
        "kernels": [],
        "matrix": None,
        "skipped": [],
    }
    for kernel in KERNELS:
        try:
            with memory.reserved(array_bytes * _ARRAYS[kernel], [home]):
                r = c.bandwidth(pool, kernel, elements, home, home, passes + 1)
        except MemoryError as e:
            doc["skipped"].append(f"{kernel}: {e}")
            continue
        best, median = _rate(r)
        doc["kernels"].append({"kernel": kernel, "cpu_node": home, "mem_node": home,
                               "threads": r["threads"], "bytes_per_element": 4 * _STREAMS[kernel],
                               "gbps_best": best, "gbps_median": median})
    if matrix:
        grid: list[list[float | None]] = []
        for i in cpu_nodes:
            row: list[float | None] = []
            for j in mem_nodes:
                try:
                    with memory.reserved(array_bytes, [j]):
                        row.append(_rate(c.bandwidth(pool, "read", elements, i, j, passes + 1))[1])
                except MemoryError as e:
                    doc["skipped"].append(f"read cpu {i} / mem {j}: {e}")
                    row.append(None)
            grid.append(row)
        doc["matrix"] = {"kernel": "read", "cpu_nodes": cpu_nodes, "mem_nodes": mem_nodes,
                         "gbps_median": grid}
    return doc


def format_table(doc: dict[str, Any]) -> str:
    lines = [f"STREAM-style bandwidth: {doc['threads']} pinned workers, "
             f"{format_size(doc['bytes_per_array'])} per array"]
    lines.append(f"{'kernel':8} {'node':>4} {'threads':>7} {'B/elem':>6} "
                 f"{'best GB/s':>10} {'median GB/s':>12}")
    for k in doc["kernels"]:
        lines.append(f"{k['kernel']:8} {k['cpu_node']:>4} {k['threads']:>7} "
                     f"{k['bytes_per_element']:>6} {k['gbps_best']:>10.1f} {k['gbps_median']:>12.1f}")
    m = doc["matrix"]
    if m is not None:
        lines.append("")
        lines.append("node-to-node read bandwidth, median GB/s (rows: workers on node i, "
                     "columns: memory on node j)")
        lines.append(" " * 8 + "".join(f"{'mem ' + str(j):>10}" for j in m["mem_nodes"]))
        for i, row in zip(m["cpu_nodes"], m["gbps_median"], strict=True):
            cells = "".join(f"{'-' if v is None else format(v, '.1f'):>10}" for v in row)
            lines.append(f"{'cpu ' + str(i):8}{cells}")
    for s in doc["skipped"]:
        lines.append(f"skipped: {s}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    if size < 4096:
        raise ComposerNumaError(f"--size must be at least 4K, got {args.size}")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if size * 4 > total:  # the adamw probe maps four arrays
        raise ComposerNumaError(f"--size {args.size}: four arrays of it need {format_size(size * 4)}, "
                                f"more than this machine's {format_size(total)}")
    if args.threads is not None:
        runtime.reset(threads=args.threads)  # planned (and checked) when measure() starts the pool
    doc = measure(size, args.passes, matrix=not args.no_matrix)
    if args.format == "json":
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(doc))
    return 0
