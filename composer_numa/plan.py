"""The rank planner: a pure function from a :class:`~composer_numa.machine.topology.Topology`
and options to one binding per local rank.

No I/O happens here, so every decision can be tested from fake topologies and
shown by ``composer-numa report`` before anything is applied.

Each rank has a *home*: the CPU node nearest its GPU. Only nodes with CPUs are
homes; a GPU on a CPU-less memory node (Grace-Hopper's GPU memory, CXL) gets the
nearest CPU node by distance, which is normal and not warned about.

CPU modes (CPUs are always inside the cpuset and never empty):

- ``node``: the home's allowed CPUs.
- ``socket``: the allowed CPUs of the home's socket.
- ``exclusive``: the home's allowed physical cores (ordered by their lowest SMT
  sibling) cut into contiguous equal shares for the ranks of that home, in rank
  order, the remainder to the lowest ranks; SMT siblings stay with their core.
  More ranks than cores: cores are shared round-robin (``too-few-cores``).
- ``core-complex``: one L3 domain of the home per rank, larger domains first,
  wrapping when ranks outnumber domains.
- ``none``: all allowed CPUs; ``numa_nodes`` still names the home.

``num_threads`` is the number of physical cores of the rank's CPUs divided by
the number of ranks with exactly those CPUs (at least 1).

Memory policies: ``preferred`` (the home; in ``socket`` mode every memory node
of the socket, home first, as ``MPOL_PREFERRED_MANY``), ``bind`` and
``interleave`` (the memory nodes of the rank's ``numa_nodes``; all of the
socket's in ``socket`` mode), ``local``, ``none``. Memory nodes are always
allowed (``Mems_allowed``) and have memory: a memory-less home uses the nearest
node with memory. ``memory_target="hbm"`` puts the policy on the CPU-less memory
nodes attached to the rank's nodes instead (HBM in flat mode, CXL expanders,
Grace's GPU memory), warning ``memory-target-unavailable`` when there are none.
Where a GPU's own memory is such a node (``Gpu.memory_node``: GH200, GB200), a
rank uses its own GPU's memory node and never another GPU's, with
``memory-target-gpu-memory`` saying that host pages then take GPU memory.
With a ``memory_need`` per rank larger than what the target nodes have
available (free + reclaimable page cache, see
:mod:`composer_numa.machine.capacity`; ranks sharing nodes add up), ``bind``
falls back to ``preferred`` and the other policies keep theirs; both warn
``node-memory-insufficient``, which also warns when the ranks together need
more than the memory cgroup allows.

Special cases: a cpuset without any CPU of the home moves the rank to the
nearest node with allowed CPUs (ties: the one with fewer ranks) and warns
``cpuset-excludes-gpu-node``; a GPU whose node is unknown gets all allowed CPUs
(in ``exclusive`` and ``core-complex`` mode a share of the allowed CPUs that no
rank with a known node holds), no memory policy and ``gpu-numa-unknown``. Machine-wide
warnings: ``sub-numa-clustering`` (more CPU nodes than sockets),
``numa-balancing-enabled`` and ``more-ranks-than-gpus``. Warnings are
deduplicated and in a stable order.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from enum import Enum

from composer_numa.diagnostics import (
    CPUSET_EXCLUDES_GPU_NODE,
    GPU_NUMA_UNKNOWN,
    MEMORY_TARGET_GPU_MEMORY,
    MEMORY_TARGET_UNAVAILABLE,
    MORE_RANKS_THAN_GPUS,
    NODE_MEMORY_INSUFFICIENT,
    NUMA_BALANCING_ENABLED,
    SUB_NUMA_CLUSTERING,
    TOO_FEW_CORES,
    Diagnostic,
)
from composer_numa.errors import ComposerNumaError, PlanError
from composer_numa.machine.topology import Gpu, Topology
from composer_numa.units import format_cpulist, format_size, parse_size

__all__ = ["Mode", "MemoryPolicy", "MemoryTarget", "MAX_RANKS", "PlanOptions", "RankPlan", "Plan", "plan",
           "normalise"]


class Mode(str, Enum):
    """Which CPUs a rank gets."""

    NODE = "node"  # the allowed CPUs of its GPU's node
    SOCKET = "socket"  # the allowed CPUs of its GPU's socket
    EXCLUSIVE = "exclusive"  # a contiguous, SMT-whole share of its node's physical cores
    CORE_COMPLEX = "core-complex"  # one L3 domain of its node
    NONE = "none"  # leave CPU affinity alone


class MemoryPolicy(str, Enum):
    """Where a rank's memory goes (Linux ``set_mempolicy`` modes)."""

    PREFERRED = "preferred"
    BIND = "bind"
    INTERLEAVE = "interleave"
    LOCAL = "local"
    NONE = "none"


class MemoryTarget(str, Enum):
    """Which kind of memory node a rank's policy names."""

    LOCAL = "local"  # the DRAM of the rank's own nodes
    HBM = "hbm"  # the CPU-less memory nodes attached to them (HBM flat mode, CXL, GPU memory)


#: Most local ranks one plan may hold (no host runs more processes than this).
MAX_RANKS = 1 << 16


@dataclass(frozen=True)
class PlanOptions:
    """What the user asked for.

    Attributes:
        nproc: ranks on this host (local world size), at least 1.
        mode: CPU placement mode (a :class:`Mode` or its value, e.g. ``"exclusive"``).
        memory: memory policy (a :class:`MemoryPolicy` or its value).
        memory_need: bytes one rank needs on its node (or a size such as ``"380G"``);
            a strict ``bind`` that cannot hold it falls back to ``preferred``.
        memory_target: :class:`MemoryTarget` (or its value): the rank's own nodes
            (``local``) or the CPU-less memory nodes attached to them (``hbm``).
            :func:`plan` returns the options normalised to enums and bytes.
    """

    nproc: int = 1
    mode: Mode = Mode.NODE
    memory: MemoryPolicy = MemoryPolicy.PREFERRED
    memory_need: int | None = None
    memory_target: MemoryTarget = MemoryTarget.LOCAL


@dataclass(frozen=True)
class RankPlan:
    """The binding of one local rank.

    Attributes:
        local_rank: rank on this host.
        gpu: device ordinal it drives; None for CPU-only ranks.
        gpu_pci_bus_id: that GPU's PCI address, when known.
        numa_nodes: nodes its CPUs belong to.
        cpus: CPUs its threads may run on (never empty, always allowed).
        memory_policy: the policy to apply.
        memory_nodes: nodes for the policy (empty for ``local`` and ``none``).
        num_threads: intra-op threads it should use.
    """

    local_rank: int
    gpu: int | None
    gpu_pci_bus_id: str | None
    numa_nodes: tuple[int, ...]
    cpus: tuple[int, ...]
    memory_policy: MemoryPolicy
    memory_nodes: tuple[int, ...]
    num_threads: int

    def to_json(self) -> dict:
        d = asdict(self)
        d["memory_policy"] = self.memory_policy.value
        for k in ("numa_nodes", "cpus", "memory_nodes"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict | str) -> RankPlan:
        if isinstance(d, str):
            d = json.loads(d)
        return cls(
            local_rank=int(d["local_rank"]),
            gpu=None if d.get("gpu") is None else int(d["gpu"]),
            gpu_pci_bus_id=d.get("gpu_pci_bus_id"),
            numa_nodes=tuple(int(x) for x in d["numa_nodes"]),
            cpus=tuple(int(x) for x in d["cpus"]),
            memory_policy=MemoryPolicy(d["memory_policy"]),
            memory_nodes=tuple(int(x) for x in d["memory_nodes"]),
            num_threads=int(d["num_threads"]),
        )


@dataclass(frozen=True)
class Plan:
    """Bindings for every local rank plus the warnings the planner raised."""

    options: PlanOptions
    ranks: tuple[RankPlan, ...]
    warnings: tuple[Diagnostic, ...] = ()


def plan(topology: Topology, options: PlanOptions | None = None) -> Plan:
    """Plan every local rank's CPUs, memory policy and thread count.

    Rank ``r`` drives GPU ``r`` (``topology.gpus`` is in device-ordinal order);
    with more ranks than GPUs, GPU ``r mod count``. Each rank gets a *home*: the
    CPU node nearest its GPU (the GPU's own node, or for a GPU hanging off a
    CPU-less memory node, Grace-Hopper style, the nearest node with CPUs — that
    is how such machines are built, so it is not warned about). CPU-only ranks
    are spread over the nodes that have allowed CPUs in contiguous blocks, the
    remainder going to the lower nodes. See the module docstring for the modes,
    memory policies and warnings.

    Args:
        topology: the machine, from :func:`composer_numa.machine.topology.discover` or built by hand.
            An empty ``allowed_cpus`` / ``allowed_mems`` means "no cpuset restriction".
        options: what to plan; ``mode`` and ``memory`` may be given as strings and
            ``memory_need`` as a size string (``"380G"``). Defaults to ``PlanOptions()``.

    Returns:
        The plan, whose ``options`` are the normalised options.

    Raises:
        PlanError: the options are invalid (``nproc`` < 1, negative memory need, an
            unknown mode or policy) or the topology has no usable CPU.

    Example:
        >>> from composer_numa.machine.topology import Cpu, Gpu, Node, Topology
        >>> topo = Topology(
        ...     nodes=(Node(0, (0, 1), 1 << 30, 1 << 30, (10,)),),
        ...     cpus=(Cpu(0, 0, 0, 0, (0,), (0, 1)), Cpu(1, 0, 0, 1, (1,), (0, 1))),
        ...     gpus=(Gpu(0, "0000:01:00.0", "nvidia", 0),),
        ... )
        >>> plan(topo, PlanOptions(nproc=1)).ranks[0].cpus
        (0, 1)
    """
    opts = normalise(options)
    view = _View(topology)
    diags: list[Diagnostic] = []
    _machine_warnings(view, diags)
    homes = _homes(view, opts.nproc, diags)
    cpus = _cpus(view, opts.mode, [h for _, h in homes], diags)
    if opts.mode is Mode.NONE:
        numa_nodes = [(h,) if h is not None else view.nodes_of(view.allowed) for _, h in homes]
    else:
        numa_nodes = [view.nodes_of(c) for c in cpus]
    threads = _threads(view, opts.mode, cpus, diags)
    policies, memory_nodes = _memory(view, opts, homes, numa_nodes, diags)
    ranks = tuple(
        RankPlan(
            local_rank=r,
            gpu=None if gpu is None else gpu.index,
            gpu_pci_bus_id=None if gpu is None else gpu.pci_bus_id,
            numa_nodes=numa_nodes[r],
            cpus=cpus[r],
            memory_policy=policies[r],
            memory_nodes=memory_nodes[r],
            num_threads=threads[r],
        )
        for r, (gpu, _) in enumerate(homes)
    )
    return Plan(options=opts, ranks=ranks, warnings=tuple(dict.fromkeys(diags)))


# --- options -----------------------------------------------------------------


def _coerce(enum_cls: type[Enum], value: object, what: str):
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, str):
        key = value.strip().lower().replace("_", "-")
        for member in enum_cls:
            if member.value == key:
                return member
    valid = ", ".join(m.value for m in enum_cls)
    raise PlanError(f"unknown {what} {value!r}; valid: {valid}")


def normalise(options: PlanOptions | None) -> PlanOptions:
    """``options`` with enums and bytes in place of their strings, validated.

    Raises:
        PlanError: an invalid value, named in one line.
    """
    if options is None:
        options = PlanOptions()
    if not isinstance(options, PlanOptions):
        raise PlanError(f"plan options must be PlanOptions, got {type(options).__name__}")
    nproc = options.nproc
    if isinstance(nproc, bool) or not isinstance(nproc, int):
        raise PlanError(f"nproc must be an integer, got {nproc!r}")
    if not 1 <= nproc <= MAX_RANKS:
        raise PlanError(f"nproc must be between 1 and {MAX_RANKS}, got {nproc}")
    need = options.memory_need
    if isinstance(need, str):
        try:
            need = parse_size(need)
        except ComposerNumaError as e:
            raise PlanError(f"memory_need: {e}") from None
    elif need is not None and (isinstance(need, bool) or not isinstance(need, int)):
        raise PlanError(f"memory_need must be a number of bytes, got {need!r}")
    if need is not None and not 0 <= need < 1 << 64:
        raise PlanError(f"memory_need must be between 0 and 16 EiB, got {need}")
    return PlanOptions(
        nproc=nproc,
        mode=_coerce(Mode, options.mode, "mode"),
        memory=_coerce(MemoryPolicy, options.memory, "memory policy"),
        memory_need=need,
        memory_target=_coerce(MemoryTarget, options.memory_target, "memory target"),
    )


# --- the machine as the planner sees it --------------------------------------


class _View:
    """Facts derived once from a topology: allowed CPUs per node, memory nodes, distances."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.cpu = {c.id: c for c in topo.cpus}
        if not self.cpu:
            raise PlanError("the topology lists no online CPUs")
        if topo.allowed_cpus:
            allowed = sorted(set(topo.allowed_cpus) & self.cpu.keys())
            if not allowed:
                raise PlanError(
                    f"none of the allowed CPUs ({format_cpulist(topo.allowed_cpus)}) is online"
                )
        else:
            allowed = sorted(self.cpu)
        self.allowed = tuple(allowed)
        self.node_ids = [n.id for n in topo.nodes]
        # Node.cpus is the authority (it is what cpu_nodes uses); Cpu.node covers strays.
        self.node_of: dict[int, int] = {}
        for n in topo.nodes:
            for c in n.cpus:
                self.node_of.setdefault(c, n.id)
        for c in topo.cpus:
            self.node_of.setdefault(c.id, c.node)
        self.cpu_nodes = [n.id for n in topo.cpu_nodes]
        self.node_allowed = {
            n: tuple(c for c in self.allowed if self.node_of[c] == n) for n in self.cpu_nodes
        }
        self.usable = [n for n in self.cpu_nodes if self.node_allowed[n]]
        if not self.usable:
            raise PlanError(
                f"no NUMA node with CPUs holds an allowed CPU ({format_cpulist(self.allowed)})"
            )
        mems = set(topo.allowed_mems) if topo.allowed_mems else set(self.node_ids)
        self.allowed_mems = tuple(sorted(mems))
        self.mem_nodes = [n.id for n in topo.nodes if n.id in mems and n.has_memory]
        self.available = {n.id: n.available for n in topo.nodes}

    def dist(self, a: int, b: int) -> int:
        try:
            return self.topo.distance(a, b)
        except (KeyError, ValueError):
            return 10 if a == b else 20

    def nearest(self, src: int, candidates: list[int]) -> int:
        return min(candidates, key=lambda c: (self.dist(src, c), c))

    def nodes_of(self, cpus: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted({self.node_of[c] for c in cpus}))

    def cores(self, cpus: tuple[int, ...]) -> int:
        return len({self.cpu[c].core_key for c in cpus})

    def attached_memory(self, cpu_nodes: tuple[int, ...]) -> tuple[int, ...]:
        """Allowed CPU-less memory nodes whose nearest CPU node is one of ``cpu_nodes``."""
        return tuple(n.id for n in self.topo.nodes
                     if not n.has_cpus and n.id in self.mem_nodes
                     and self.topo.attached_cpu_node(n.id) in cpu_nodes)

    def memory_node(self, node: int) -> int | None:
        """Where memory meant for ``node`` goes: itself, or the nearest allowed node with memory."""
        if node in self.mem_nodes:
            return node
        if not self.mem_nodes:
            return None
        return self.nearest(node, self.mem_nodes)


def _machine_warnings(view: _View, diags: list[Diagnostic]) -> None:
    topo = view.topo
    sockets = len({c.socket for c in topo.cpus})
    nodes = len(view.cpu_nodes)
    if nodes > sockets:
        diags.append(Diagnostic(
            SUB_NUMA_CLUSTERING,
            f"{nodes} NUMA nodes with CPUs on {sockets} socket(s): sub-NUMA clustering (SNC / NPS) is on",
            f"ranks are planned per node, and anything kept once per node (e.g. per-node weight "
            f"copies) multiplies memory by {nodes}" + ("" if sockets == 1 else f" instead of {sockets}"),
        ))
    if topo.numa_balancing:
        diags.append(Diagnostic(
            NUMA_BALANCING_ENABLED,
            "kernel.numa_balancing is on: the kernel's automatic NUMA balancing migrates pages "
            "and threads against the planned binding",
            "disable it with `sysctl kernel.numa_balancing=0`",
        ))


# --- which node each rank lives on --------------------------------------------


def _homes(view: _View, nproc: int, diags: list[Diagnostic]) -> list[tuple[Gpu | None, int | None]]:
    """(GPU, home CPU node) per rank; home None means the GPU's node is unknown."""
    topo = view.topo
    if not topo.gpus:
        base, extra = divmod(nproc, len(view.usable))
        out: list[tuple[Gpu | None, int | None]] = []
        for i, n in enumerate(view.usable):
            out += [(None, n)] * (base + (1 if i < extra else 0))
        return out

    gpus = topo.gpus
    if nproc > len(gpus):
        diags.append(Diagnostic(
            MORE_RANKS_THAN_GPUS,
            f"{nproc} ranks but {len(gpus)} visible GPU(s)",
            f"rank r drives GPU r mod {len(gpus)}, so GPUs and their CPUs are shared",
        ))
    homes: list[int | None] = []
    excluded: list[tuple[int, Gpu, int, int]] = []
    warned: set[int] = set()
    for r in range(nproc):
        gpu = gpus[r % len(gpus)]
        node = gpu.numa_node
        if len(view.node_ids) == 1 and node not in view.node_ids:
            node = view.node_ids[0]  # one node: there is nowhere else it could be
        if node is None or node not in view.node_ids:
            if gpu.index not in warned:
                warned.add(gpu.index)
                why = (gpu.numa_unknown_reason if node is None and gpu.numa_unknown_reason
                       else "it has no NUMA node" if node is None
                       else f"it reports NUMA node {node}, which does not exist")
                hint = ("" if gpu.pci_bus_id is None
                        else " (the firmware does not say where the device is attached, common in VMs)")
                diags.append(Diagnostic(
                    GPU_NUMA_UNKNOWN,
                    f"GPU {gpu.index} ({gpu.pci_bus_id or 'PCI address unknown'}): NUMA node unknown on this "
                    f"{len(view.node_ids)}-node machine: {why}{hint}",
                    "its rank gets allowed CPUs no other rank holds and no memory policy",
                ))
            homes.append(None)
            continue
        cpu_node = node if node in view.node_allowed else view.nearest(node, view.cpu_nodes)
        if view.node_allowed[cpu_node]:
            homes.append(cpu_node)
        else:
            homes.append(None)
            excluded.append((r, gpu, node, cpu_node))

    # Ranks whose node the cpuset excludes go to the nearest node with allowed CPUs;
    # among equally near nodes, the one with the fewest ranks so far.
    load = Counter(h for h in homes if h is not None)
    for r, gpu, node, cpu_node in excluded:
        best = min(view.dist(node, n) for n in view.usable)
        choice = min(
            (n for n in view.usable if view.dist(node, n) == best), key=lambda n: (load[n], n)
        )
        load[choice] += 1
        homes[r] = choice
        via = "" if node == cpu_node else f" (its nearest CPU node is {cpu_node})"
        diags.append(Diagnostic(
            CPUSET_EXCLUDES_GPU_NODE,
            f"GPU {gpu.index} is on node {node}{via} but the cpuset allows none of node "
            f"{cpu_node}'s CPUs (allowed: {format_cpulist(view.allowed)})",
            f"rank {r} uses node {choice}, the nearest node with allowed CPUs (distance {best})",
        ))
    return [(gpus[r % len(gpus)], homes[r]) for r in range(nproc)]


# --- CPUs per rank ----------------------------------------------------------------


def _pool(view: _View, home: int | None) -> tuple[int, ...]:
    return view.allowed if home is None else view.node_allowed[home]


def _socket_pool(view: _View, home: int | None) -> tuple[int, ...]:
    if home is None:
        return view.allowed
    sockets = {view.cpu[c].socket for c in view.node_allowed[home]}
    return tuple(c for c in view.allowed if view.cpu[c].socket in sockets)


def _split_cores(view: _View, pool: tuple[int, ...], k: int) -> list[tuple[int, ...]]:
    """``k`` contiguous shares of the pool's physical cores, SMT siblings kept together."""
    by_core: dict[int, list[int]] = {}
    for c in pool:
        by_core.setdefault(view.cpu[c].core_key, []).append(c)
    cores = [tuple(v) for _, v in sorted(by_core.items())]
    if k > len(cores):
        return [cores[i % len(cores)] for i in range(k)]
    base, extra = divmod(len(cores), k)
    out, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        out.append(tuple(sorted(c for core in cores[start:start + size] for c in core)))
        start += size
    return out


def _l3_domains(view: _View, pool: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The pool's L3 domains, larger first (ties: lowest CPU first)."""
    by_l3: dict[tuple[int, ...], list[int]] = {}
    for c in pool:
        by_l3.setdefault(view.cpu[c].l3, []).append(c)
    return sorted((tuple(v) for v in by_l3.values()), key=lambda d: (-len(d), d[0]))


def _cpus(
    view: _View, mode: Mode, homes: list[int | None], diags: list[Diagnostic]
) -> list[tuple[int, ...]]:
    if mode is Mode.NODE:
        return [_pool(view, h) for h in homes]
    if mode is Mode.SOCKET:
        return [_socket_pool(view, h) for h in homes]
    if mode is Mode.NONE:
        return [view.allowed for _ in homes]

    groups: dict[int | None, list[int]] = {}
    for r, h in enumerate(homes):
        groups.setdefault(h, []).append(r)
    out: list[tuple[int, ...]] = [()] * len(homes)
    # Ranks with a known node first: ranks whose GPU's node is unknown take what they leave.
    for home in sorted(groups, key=lambda h: (h is None, h if h is not None else 0)):
        ranks = groups[home]
        pool = _pool(view, home)
        if home is None:
            held = {c for r, share in enumerate(out) if share for c in share}
            rest = tuple(c for c in pool if c not in held)
            pool = rest or pool
        if mode is Mode.EXCLUSIVE:
            shares = _split_cores(view, pool, len(ranks))
            cores = view.cores(pool)
            if len(ranks) > cores:
                where = (f"node {home}" if home is not None else
                         "the allowed CPUs no other rank holds" if pool != view.allowed else "the allowed CPUs")
                diags.append(Diagnostic(
                    TOO_FEW_CORES,
                    f"{_count(len(ranks), 'rank')} ({_ranks(ranks)}) on {where} but only {cores} allowed "
                    f"physical core(s)",
                    "ranks share cores round-robin",
                ))
            elif home is None and pool == view.allowed and len(groups) > 1:
                diags.append(Diagnostic(
                    TOO_FEW_CORES,
                    f"rank{'s' if len(ranks) > 1 else ''} {_ranks(ranks)}, whose GPU's node is unknown, "
                    "find no allowed CPU that another rank does not hold",
                    "they share CPUs with the other ranks",
                ))
        else:
            domains = _l3_domains(view, pool)
            shares = [domains[i % len(domains)] for i in range(len(ranks))]
        for r, share in zip(ranks, shares, strict=True):
            out[r] = share
    return out


def _threads(
    view: _View, mode: Mode, cpus: list[tuple[int, ...]], diags: list[Diagnostic]
) -> list[int]:
    sharing: dict[tuple[int, ...], list[int]] = {}
    for r, c in enumerate(cpus):
        sharing.setdefault(c, []).append(r)
    if mode is not Mode.EXCLUSIVE:  # exclusive mode already warned per node
        for c, ranks in sharing.items():
            cores = view.cores(c)
            if len(ranks) > cores:
                diags.append(Diagnostic(
                    TOO_FEW_CORES,
                    f"{len(ranks)} ranks ({_ranks(ranks)}) share CPUs {format_cpulist(c)}, which "
                    f"have only {cores} physical core(s)",
                    "their threads compete",
                ))
    total = view.cores(view.allowed)
    if len(cpus) > total and not any(d.code == TOO_FEW_CORES for d in diags):
        diags.append(Diagnostic(
            TOO_FEW_CORES,
            f"{len(cpus)} ranks but only {total} allowed physical core(s) "
            f"({format_cpulist(view.allowed)})",
            "ranks share cores",
        ))
    return [max(1, view.cores(c) // len(sharing[c])) for c in cpus]


# --- memory policy --------------------------------------------------------------


def _memory(
    view: _View,
    opts: PlanOptions,
    homes: list[tuple[Gpu | None, int | None]],
    numa_nodes: list[tuple[int, ...]],
    diags: list[Diagnostic],
) -> tuple[list[MemoryPolicy], list[tuple[int, ...]]]:
    n = len(homes)
    policies = [MemoryPolicy.NONE] * n
    nodes: list[tuple[int, ...]] = [()] * n
    primary: list[int | None] = [None] * n
    targets: list[tuple[int, ...]] = [()] * n  # where each rank's memory lands
    if opts.memory is MemoryPolicy.NONE:
        return policies, nodes
    if not view.mem_nodes:
        if any(h is not None for _, h in homes):
            diags.append(Diagnostic(
                NODE_MEMORY_INSUFFICIENT,
                f"no allowed memory node (allowed: {format_cpulist(view.allowed_mems, 'none')}) "
                f"reports any memory",
                "no memory policy is set",
            ))
        return policies, nodes

    hbm = opts.memory_target is MemoryTarget.HBM and opts.memory is not MemoryPolicy.LOCAL
    missing_hbm: list[int] = []
    on_gpu_memory: list[tuple[int, int, int]] = []  # (rank, GPU, node): host pages in a GPU's own memory
    gpu_memory = {g.memory_node: g.index for g in view.topo.gpus if g.memory_node is not None}
    for r, (gpu, home) in enumerate(homes):
        if home is None:
            continue  # unknown GPU node: already warned, no policy
        first = view.memory_node(home)
        assert first is not None  # mem_nodes is not empty
        if gpu is not None and first != home and view.topo.node(home).has_memory:
            diags.append(Diagnostic(
                CPUSET_EXCLUDES_GPU_NODE,
                f"the cpuset's memory nodes ({format_cpulist(view.allowed_mems)}) exclude node "
                f"{home}, GPU {gpu.index}'s node",
                f"its rank's memory goes to node {first}",
            ))
        policies[r] = opts.memory
        if opts.memory is MemoryPolicy.LOCAL:
            targets[r] = (first,)
            primary[r] = first
            continue
        spread = opts.memory is not MemoryPolicy.PREFERRED or opts.mode is Mode.SOCKET
        if spread:
            mapped = {view.memory_node(x) for x in numa_nodes[r]}
            wanted = tuple(x for x in mapped if x is not None)
        else:
            wanted = (first,)
        near = first
        if hbm:
            own = gpu.memory_node if gpu is not None else None
            if own is not None and own in view.mem_nodes:
                attached: tuple[int, ...] = (own,)  # its GPU's own memory, never a neighbour's
            else:
                attached = tuple(x for x in view.attached_memory(numa_nodes[r] if spread else (home,))
                                 if x not in gpu_memory)
            on_gpu_memory += [(r, gpu_memory[x], x) for x in attached if x in gpu_memory]
            if attached:
                wanted = attached
                near = min(attached, key=lambda x: (view.dist(home, x), x))
            else:
                missing_hbm.append(r)
        # preferred lists the nearest node first (the fallback when MPOL_PREFERRED_MANY is missing)
        if opts.memory is MemoryPolicy.PREFERRED:
            wanted = tuple(sorted(wanted, key=lambda x, h=home, n=near: (x != n, view.dist(h, x), x)))
        else:
            wanted = tuple(sorted(wanted))
        primary[r] = near
        targets[r] = nodes[r] = wanted
    if missing_hbm:
        diags.append(Diagnostic(
            MEMORY_TARGET_UNAVAILABLE,
            f"memory target hbm: the nodes of rank{'s' if len(missing_hbm) > 1 else ''} "
            f"{_ranks(missing_hbm)} have no CPU-less memory node attached (HBM, CXL or GPU memory)",
            "their policy uses their own nodes' memory",
        ))
    if on_gpu_memory:
        where = ", ".join(f"rank {r} on node {x} (GPU {g})" for r, g, x in on_gpu_memory[:8])
        more = f" and {len(on_gpu_memory) - 8} more" if len(on_gpu_memory) > 8 else ""
        diags.append(Diagnostic(
            MEMORY_TARGET_GPU_MEMORY,
            f"memory target hbm: the CPU-less memory nodes here are GPU memory, so host memory goes to "
            f"each rank's own GPU: {where}{more}",
            "those pages take memory the GPU's CUDA allocations also need and CPU threads reach them "
            "over the CPU-GPU link; use memory target local to keep host memory in the CPU node's memory",
        ))

    need = opts.memory_need
    if not need:
        return policies, nodes
    # Ranks sharing nodes add up; a rank spread over several nodes loads each evenly.
    demand: dict[int, float] = {}
    groups: dict[tuple[int, ...], list[int]] = {}
    for r, t in enumerate(targets):
        if t:
            groups.setdefault(t, []).append(r)
            for x in t:
                demand[x] = demand.get(x, 0.0) + need / len(t)
    for t, ranks in groups.items():
        want = sum(demand[x] for x in t)
        have = sum(view.available.get(x, 0) for x in t)
        if want <= have:
            continue
        where = f"node {t[0]}" if len(t) == 1 else f"nodes {format_cpulist(t)}"
        policy = policies[ranks[0]]
        if policy is MemoryPolicy.BIND:
            for r in ranks:
                policies[r] = MemoryPolicy.PREFERRED
                nodes[r] = (primary[r],)
            outcome = "a strict bind would run out of memory, so the policy is preferred instead"
        else:
            outcome = f"with {policy.value} the rest spills to other nodes (remote memory)"
        who = f"rank {ranks[0]} needs" if len(ranks) == 1 else f"ranks {_ranks(ranks)} need"
        each = " each" if len(ranks) > 1 else ""
        diags.append(Diagnostic(
            NODE_MEMORY_INSUFFICIENT,
            f"{who} {format_size(need)}{each}; {where} would have to hold {format_size(int(want))} but "
            f"{'has' if len(t) == 1 else 'have'} {format_size(have)} available",
            outcome,
        ))
    room = view.topo.memory_room
    planned = sum(1 for t in targets if t)
    if room is not None and planned and need * planned > room:
        diags.append(Diagnostic(
            NODE_MEMORY_INSUFFICIENT,
            f"{_count(planned, 'rank')} need{'s' if planned == 1 else ''} {format_size(need * planned)} "
            f"together but the memory cgroup allows {format_size(room)} more",
            "a memory policy cannot help: expect the OOM killer unless the cgroup limit is raised",
        ))
    return policies, nodes


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _ranks(ranks: list[int]) -> str:
    return format_cpulist(ranks)
