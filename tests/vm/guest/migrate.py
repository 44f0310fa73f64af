"""Guest program: late, in-process binding with page migration (what the callback does).

Run under ``numactl --membind=0``: the process allocates and touches MIB of memory (all on
node 0), then plans itself with composer_numa (the GPU stand-in is on
node 1) and applies the plan in-process with ``migrate=True``. It prints one JSON line with
the mapping's pages per node before and after (read from numa_maps by alloc.py's own
reader), the affinity and policy after, and what ``bind.apply`` reported.

Usage: migrate.py MIB
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from alloc import allocate, get_mempolicy, mapping_numa, thread_affinities, vma_size  # noqa: E402


def main() -> None:
    mib = int(sys.argv[1])
    size = mib << 20
    _keep, address = allocate(size)
    before = mapping_numa(address)["pages"]

    from composer_numa import bind
    from composer_numa.machine.sysfs import discover
    from composer_numa.plan import PlanOptions, plan

    # (numactl's bind does not narrow Cpus_allowed/Mems_allowed, which the planner honours)
    rank_plan = plan(discover(), PlanOptions(nproc=1)).ranks[0]
    applied = bind.apply(rank_plan, migrate=True)
    after = mapping_numa(address)
    policy, nodes = get_mempolicy()
    print(json.dumps({
        "plan": rank_plan.to_json(),
        "applied": applied.to_json(),
        "before": {str(n): c for n, c in sorted(before.items())},
        "pages": {str(n): c for n, c in sorted(after["pages"].items())},
        "expected_pages": size // (after["page_kb"] << 10),
        "vma_bytes": vma_size(address),
        "affinity": sorted(os.sched_getaffinity(0)),
        "threads": thread_affinities(),
        "mempolicy": {"mode": policy, "nodes": nodes},
    }), flush=True)


if __name__ == "__main__":
    main()
