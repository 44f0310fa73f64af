"""Build :class:`~composer_numa.machine.topology.Topology` objects directly, for planner tests.

CPUs are numbered the way Linux numbers x86 servers: the first thread of every
core (node 0's cores, then node 1's, ...), then the second SMT thread of every
core in the same order. Nodes ``0 .. sockets*nodes_per_socket-1`` have CPUs;
``memory_nodes`` appends CPU-less nodes (Grace-Hopper GPU memory, CXL, HBM).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from composer_numa.machine.topology import Cpu, Gpu, Node, Topology

GiB = 1 << 30

__all__ = ["GiB", "make_topology", "node_cpus"]


def node_cpus(topo: Topology, node: int) -> tuple[int, ...]:
    """The CPUs of ``node``."""
    return topo.node(node).cpus


def make_topology(
    *,
    sockets: int = 1,
    nodes_per_socket: int = 1,
    cores_per_node: int = 4,
    smt: int = 1,
    l3_per_node: int = 1,
    gpus: Sequence[int | None] = (),
    memory_nodes: Sequence[tuple[int, int]] = (),
    memoryless: Sequence[int] = (),
    mem_total: int | Mapping[int, int] = 64 * GiB,
    mem_free: int | Mapping[int, int] | None = None,
    allowed_cpus: Sequence[int] | None = None,
    allowed_mems: Sequence[int] | None = None,
    numa_balancing: bool | None = False,
    distances: Sequence[Sequence[int]] | None = None,
) -> Topology:
    """A machine from a compact description.

    Args:
        sockets: packages.
        nodes_per_socket: NUMA nodes per package (more than 1: SNC / NPS).
        cores_per_node: physical cores per node.
        smt: threads per core.
        l3_per_node: L3 domains per node (cores split evenly; must divide ``cores_per_node``).
        gpus: the NUMA node of each GPU in device-ordinal order (None: unknown).
        memory_nodes: CPU-less nodes to append, each ``(nearest CPU node, bytes)``;
            a size of 0 gives an empty node (neither CPUs nor memory).
        memoryless: CPU nodes without memory.
        mem_total: bytes per CPU node, or a mapping node -> bytes.
        mem_free: free bytes (same forms); defaults to ``mem_total``.
        allowed_cpus: the cpuset; None allows every CPU.
        allowed_mems: the memory nodes allowed; None allows every node.
        numa_balancing: ``kernel.numa_balancing``.
        distances: a full distance matrix; by default 10 local, 12 within a socket,
            32 across sockets, and a CPU-less node is 40 from its CPU node.
    """
    if cores_per_node % l3_per_node:
        raise ValueError("l3_per_node must divide cores_per_node")
    n_cpu_nodes = sockets * nodes_per_socket
    total_cores = n_cpu_nodes * cores_per_node
    per_l3 = cores_per_node // l3_per_node

    def thread_ids(core: int) -> tuple[int, ...]:
        return tuple(t * total_cores + core for t in range(smt))

    cpus: list[Cpu] = []
    by_node: dict[int, list[int]] = {n: [] for n in range(n_cpu_nodes)}
    for core in range(total_cores):
        node, i = divmod(core, cores_per_node)
        socket = node // nodes_per_socket
        first = node * cores_per_node + (i // per_l3) * per_l3
        l3 = tuple(sorted(c for cc in range(first, first + per_l3) for c in thread_ids(cc)))
        for cid in thread_ids(core):
            cpus.append(Cpu(cid, node, socket, core % (nodes_per_socket * cores_per_node),
                            thread_ids(core), l3))
            by_node[node].append(cid)
    cpus.sort(key=lambda c: c.id)

    ids = list(range(n_cpu_nodes + len(memory_nodes)))
    near = {n: n for n in range(n_cpu_nodes)}
    for j, (cpu_node, _) in enumerate(memory_nodes):
        near[n_cpu_nodes + j] = cpu_node

    def cpu_dist(a: int, b: int) -> int:
        if a == b:
            return 10
        return 12 if a // nodes_per_socket == b // nodes_per_socket else 32

    def dist(a: int, b: int) -> int:
        if distances is not None:
            return distances[a][b]
        if a == b:
            return 10
        extra = (a >= n_cpu_nodes) + (b >= n_cpu_nodes)
        base = 0 if near[a] == near[b] else cpu_dist(near[a], near[b])
        return base + 40 * extra

    def size(spec: int | Mapping[int, int], n: int) -> int:
        return spec.get(n, 0) if isinstance(spec, Mapping) else spec

    nodes = []
    for n in ids:
        if n < n_cpu_nodes:
            total = 0 if n in memoryless else size(mem_total, n)
            free = total if mem_free is None else min(total, size(mem_free, n))
            node_cpu_ids = tuple(sorted(by_node[n]))
        else:
            total = free = memory_nodes[n - n_cpu_nodes][1]
            node_cpu_ids = ()
        nodes.append(Node(n, node_cpu_ids, total, free, tuple(dist(n, m) for m in ids)))

    gpu_objs = tuple(
        Gpu(i, f"0000:{0x10 + i:02x}:00.0", "nvidia", node,
            () if node is None else tuple(by_node.get(near.get(node, -1), ())))
        for i, node in enumerate(gpus)
    )
    all_cpus = tuple(c.id for c in cpus)
    return Topology(
        nodes=tuple(nodes),
        cpus=tuple(cpus),
        gpus=gpu_objs,
        allowed_cpus=all_cpus if allowed_cpus is None else tuple(sorted(allowed_cpus)),
        allowed_mems=tuple(ids) if allowed_mems is None else tuple(sorted(allowed_mems)),
        numa_balancing=numa_balancing,
    )
