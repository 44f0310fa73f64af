"""Guest program: the C++ extension's node-local memory, worker pool and NumaAdamW on a
real multi-node kernel. Prints one JSON line.

Page placement is read back with this script's own numa_maps parser, not with
composer_numa.offload.memory.nodes_of, so that it checks the extension rather than agreeing with it.

Usage: node_buffers.py MIB   (MIB: size of each placed buffer)
"""

from __future__ import annotations

import json
import re
import sys


def numa_maps_pages(address: int) -> dict[int, int]:
    """Pages per node of the mapping starting at ``address``, in 4 KiB units."""
    with open("/proc/self/numa_maps") as f:
        for line in f:
            start, _, rest = line.partition(" ")
            if int(start, 16) == address:
                kb = re.search(r"kernelpagesize_kB=(\d+)", rest)
                unit = int(kb.group(1)) // 4 if kb else 1
                return {int(n): int(c) * unit for n, c in re.findall(r"\bN(\d+)=(\d+)", rest)}
    raise LookupError(f"no numa_maps line at {address:#x}")


def main() -> int:
    mib = int(sys.argv[1])
    import torch

    from composer_numa import _C, NumaAdamW, memory
    from composer_numa.offload import runtime

    out: dict = {"simd": _C.simd_level(), "memory_nodes": memory.memory_nodes()}
    pool = runtime.pool()
    out["workers"] = [{"cpu": w["cpu"], "node": w["node"]} for w in pool.workers()]
    out["node_chunk_owners"] = {str(n): sorted(set(pool.chunk_owners(4096, 16, n))) for n in pool.nodes()}

    placed = {}
    for node in memory.memory_nodes():
        t = memory.empty((mib << 20) // 4, torch.float32, node=node)
        placed[str(node)] = {"numa_maps": numa_maps_pages(t.data_ptr()),
                             "nodes_of": memory.nodes_of(t), "policy": memory.policy_of(t)}
        del t
    out["empty"] = placed
    inter = memory.empty((mib << 20) // 4, torch.float32, policy="interleave")
    out["interleave"] = numa_maps_pages(inter.data_ptr())
    del inter

    try:
        memory.empty(8 << 30, torch.uint8, node=memory.memory_nodes()[-1])
        out["too_big"] = "allocated"
    except MemoryError as e:
        out["too_big"] = str(e)

    torch.manual_seed(0)
    shapes = [(1024, 1024), (1024,), (512, 1024), (7,)]
    start = [torch.randn(s) for s in shapes]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    ref = [torch.nn.Parameter(p.clone()) for p in start]
    opt = NumaAdamW(ours, lr=1e-2, weight_decay=0.1, nodes=memory.memory_nodes())
    tref = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(ours, ref, strict=True):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        tref.step()
    # excess over torch.testing's fp32 tolerance (rtol 1e-6, atol 1e-8); <= 0 means close
    out["adamw_excess"] = max(
        float(((p.detach() - q.detach()).abs() - 1e-8 - 1e-6 * q.detach().abs()).max())
        for p, q in zip(ours, ref, strict=True))
    out["adamw_buffers"] = [
        {"node": b.node, "elements": b.numel,
         "numa_maps": {name: numa_maps_pages(getattr(b, name).data_ptr())
                       for name in ("param", "grad", "exp_avg", "exp_avg_sq")}}
        for b in opt._buffers]
    out["param_nodes"] = [memory.nodes_of(p.detach()) for p in ours]
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
