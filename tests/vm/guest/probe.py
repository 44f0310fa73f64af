"""Guest program: the machine as the kernel shows it, and as composer_numa discovers it.

Prints one JSON line with ``raw`` (read here from sysfs/procfs with code of its own, so the
rig itself is checked against the layout QEMU was given) and ``discover`` (what
``composer_numa.machine.topology.discover()`` returned, or the error it raised).
"""

from __future__ import annotations

import glob
import json
import os
import re
import traceback


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _cpulist(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, text.split(",")):
        a, _, b = part.partition("-")
        out += range(int(a), int(b or a) + 1)
    return out


def raw() -> dict:
    nodes = []
    for d in sorted(glob.glob("/sys/devices/system/node/node[0-9]*"),
                    key=lambda p: int(p.rsplit("node", 1)[1])):
        meminfo = _read(f"{d}/meminfo")
        total = int(re.search(r"MemTotal:\s+(\d+) kB", meminfo).group(1))
        nodes.append({"id": int(d.rsplit("node", 1)[1]), "cpus": _cpulist(_read(f"{d}/cpulist")),
                      "memory_total_kb": total,
                      "distances": [int(x) for x in _read(f"{d}/distance").split()]})
    cpus = {}
    for d in glob.glob("/sys/devices/system/cpu/cpu[0-9]*"):
        cpus[int(d.rsplit("cpu", 1)[1])] = int(_read(f"{d}/topology/physical_package_id"))
    pci = {}
    for d in glob.glob("/sys/bus/pci/devices/*"):
        pci[os.path.basename(d)] = {"class": _read(f"{d}/class"),
                                    "numa_node": int(_read(f"{d}/numa_node"))}
    return {"nodes": nodes, "socket_of_cpu": {str(k): v for k, v in sorted(cpus.items())},
            "pci": pci, "numa_balancing": _read("/proc/sys/kernel/numa_balancing")}


def discovered() -> dict:
    from composer_numa.machine.sysfs import discover

    t = discover()
    return {
        "nodes": [{"id": n.id, "cpus": list(n.cpus), "memory_total": n.memory_total,
                   "memory_free": n.memory_free, "distances": list(n.distances)} for n in t.nodes],
        "cpus": [{"id": c.id, "node": c.node, "socket": c.socket, "core": c.core} for c in t.cpus],
        "gpus": [{"index": g.index, "pci_bus_id": g.pci_bus_id, "numa_node": g.numa_node}
                 for g in t.gpus],
        "allowed_cpus": list(t.allowed_cpus),
        "allowed_mems": list(t.allowed_mems),
        "numa_balancing": t.numa_balancing,
        "diagnostics": [d.code for d in t.diagnostics],
    }


def main() -> None:
    out: dict = {"raw": raw()}
    try:
        out["discover"] = discovered()
    except Exception:  # reported to the host test, which fails with it
        out["discover_error"] = traceback.format_exc()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
