"""The worker pool: an explicit object given (cpu, node) slots, planned from the machine model by
composer_numa.offload.runtime. Placement read back from the kernel, planning on recorded trees,
static chunking, idling, re-planning only when asked, fork and exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from composer_numa.machine.sysfs import discover
from composer_numa.offload import runtime

_C = pytest.importorskip("composer_numa._C", reason="the C++ extension is not built")


def _physical_cores(cpus: set[int]) -> set[tuple[int, int]]:
    cores = set()
    for c in cpus:
        base = f"/sys/devices/system/cpu/cpu{c}/topology/"
        try:
            with open(base + "physical_package_id") as f:
                pkg = int(f.read())
            with open(base + "core_id") as f:
                core = int(f.read())
        except OSError:
            pkg, core = 0, -1 - c
        cores.add((pkg, core))
    return cores


def _task_affinity(tid: int) -> str:
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for thread {tid}")


def _task_cpu_ticks(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _run(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(autouse=True)
def default_pool():
    runtime.reset()
    yield
    runtime.reset()


# ------------------------------------------------------------ the default pool --

def test_one_worker_per_physical_core_pinned_and_read_back():
    allowed = os.sched_getaffinity(0)
    pool = runtime.pool()
    workers = pool.workers()
    assert len(workers) == len(_physical_cores(allowed)) == pool.size == len(pool)
    cpus = [w["cpu"] for w in workers]
    assert len(set(cpus)) == len(cpus) and set(cpus) <= allowed
    assert _physical_cores(set(cpus)) == _physical_cores(allowed)  # one per core, no SMT twins
    for w in workers:
        assert _task_affinity(w["tid"]) == str(w["cpu"])  # the kernel says: pinned to its core
        node = next(int(d[4:]) for d in os.listdir(f"/sys/devices/system/cpu/cpu{w['cpu']}")
                    if d.startswith("node") and d[4:].isdigit())
        assert w["node"] == node
    assert pool.nodes() == sorted({w["node"] for w in workers})
    assert pool.slots() == [(w["cpu"], w["node"]) for w in workers]


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_reset_to_n_workers_and_wraparound(n):
    runtime.reset(threads=n)
    workers = runtime.pool().workers()
    assert runtime.pool().size == n == len(workers)
    assert [w["index"] for w in workers] == list(range(n))
    assert {w["cpu"] for w in workers} <= os.sched_getaffinity(0)
    for w in workers:
        assert _task_affinity(w["tid"]) == str(w["cpu"])


@pytest.mark.parametrize("bad", [0, -1, 4097, True, 2.0, "2"])
def test_reset_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="threads must be an int from 1 to 4096"):
        runtime.reset(threads=bad)


def test_the_environment_caps_the_default_pool():
    out = _run("""
        from composer_numa.offload import runtime
        print(runtime.pool().size)
    """, env={"COMPOSER_NUMA_THREADS": "1"})
    assert out.split() == ["1"]
    out = subprocess.run([sys.executable, "-c", "from composer_numa.offload import runtime; "
                          "print(runtime.pool().size)"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COMPOSER_NUMA_THREADS": "lots"})
    assert out.returncode == 0 and int(out.stdout) == len(_physical_cores(os.sched_getaffinity(0)))
    assert "[setting-ignored] COMPOSER_NUMA_THREADS='lots'" in out.stderr


def test_the_module_has_no_hidden_pool():
    # The pool is an object the caller holds; no module-level pool that re-plans by itself.
    for name in ("num_threads", "set_num_threads", "workers", "worker_nodes", "shutdown_pool",
                 "node_meminfo", "memory_nodes", "online_nodes"):
        assert not hasattr(_C, name), name


# ------------------------------------------------------------ planning (pure) --

def _topology(tree, spec):
    sys_root, proc_root = tree(spec)
    return discover(sys_root, proc_root, env={})


def test_plan_takes_the_lowest_allowed_sibling_of_each_core_grouped_by_node(tree):
    # 2 nodes x 4 cores, SMT siblings (c, c + 8)
    spec = {"nodes": [{"cpus": "0-3,8-11", "mem_gib": 8}, {"cpus": "4-7,12-15", "mem_gib": 8}],
            "sockets": 2, "smt": "split"}
    topo = _topology(tree, spec)
    assert runtime.plan_slots(topo, range(16)) == [(0, 0), (1, 0), (2, 0), (3, 0),
                                                   (4, 1), (5, 1), (6, 1), (7, 1)]
    # only the second sibling of core 1 and both of core 5 allowed: 9 stands for core 1, 5 for core 5
    assert runtime.plan_slots(topo, {9, 5, 13, 0}) == [(0, 0), (9, 0), (5, 1)]
    # CPUs the machine does not have are ignored; none at all is an error
    assert runtime.plan_slots(topo, {3, 99}) == [(3, 0)]
    with pytest.raises(ValueError, match="no.* online CPU|is an online CPU"):
        runtime.plan_slots(topo, {99, 100})


def test_plan_cap_and_explicit_counts(tree):
    spec = {"nodes": [{"cpus": "0-5", "mem_gib": 8}, {"cpus": "6-7", "mem_gib": 8}]}
    topo = _topology(tree, spec)
    allowed = range(8)
    # a cap shares the workers out in proportion (6:2) and keeps each node served
    assert runtime.plan_slots(topo, allowed, cap=4) == [(0, 0), (1, 0), (2, 0), (6, 1)]
    assert runtime.plan_slots(topo, allowed, cap=2) == [(0, 0), (6, 1)]
    assert runtime.plan_slots(topo, allowed, cap=1) == [(0, 0)]
    assert runtime.plan_slots(topo, allowed, cap=100) == runtime.plan_slots(topo, allowed)
    # an explicit count beyond the cores wraps around them, still grouped by node
    slots = runtime.plan_slots(topo, allowed, threads=10)
    assert len(slots) == 10 and [n for _, n in slots] == [0] * 8 + [1] * 2
    assert [c for c, _ in slots] == [0, 1, 2, 3, 4, 5, 0, 1, 6, 7]
    with pytest.raises(ValueError, match="threads must be a positive int"):
        runtime.plan_slots(topo, allowed, threads=0)


def test_plan_on_a_recorded_machine_covers_every_allowed_core(tree):
    topo = _topology(tree, "nps4-256")
    slots = runtime.plan_slots(topo, [c.id for c in topo.cpus])
    assert len(slots) == topo.cores(c.id for c in topo.cpus)
    assert all(topo.cpu(c).node == n for c, n in slots)
    assert [n for _, n in slots] == sorted(n for _, n in slots)


# ------------------------------------------------------------ an explicit pool --

def test_an_explicit_pool_runs_on_the_slots_it_was_given():
    cpu = min(os.sched_getaffinity(0))
    pool = _C.Pool([(cpu, 5), (cpu, 7)])
    assert pool.nodes() == [5, 7] and [w["index_in_node"] for w in pool.workers()] == [0, 0]
    assert all(_task_affinity(w["tid"]) == str(cpu) for w in pool.workers())
    assert set(pool.chunk_owners(1000, 16, 7)) == {1}  # node 7's task ran on node 7's worker
    pool.close()
    assert pool.closed
    with pytest.raises(RuntimeError, match="closed"):
        pool.chunk_owners(10)


@pytest.mark.parametrize("slots,text", [
    ([], "at least one"),
    ([(-1, 0)], "out of range"),
    ([(0, -2)], "negative"),
])
def test_an_explicit_pool_refuses_bad_slots(slots, text):
    with pytest.raises(ValueError, match=text):
        _C.Pool(slots)


def test_a_cpu_outside_the_affinity_cannot_be_pinned():
    outside = sorted(set(range(os.cpu_count() or 1)) - os.sched_getaffinity(0))
    cpu = outside[0] if outside else 4095  # no such CPU: the kernel refuses too
    with pytest.raises(ValueError, match=f"cannot pin worker 0 to CPU {cpu}"):
        _C.Pool([(cpu, 0)])


# ------------------------------------------------------------ dispatch --

@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("n,align", [(0, 16), (1, 16), (15, 16), (16, 16), (1000, 16), (4099, 1),
                                     (100, 64)])
def test_static_chunks_are_contiguous_aligned_and_cover_everything(threads, n, align):
    runtime.reset(threads=threads)
    owners = runtime.pool().chunk_owners(n, align)
    assert len(owners) == n and all(o >= 0 for o in owners)
    # each worker owns one contiguous run, runs appear in worker order, boundaries are aligned
    runs = []
    for i, o in enumerate(owners):
        if not runs or runs[-1][0] != o:
            runs.append((o, i))
    assert [o for o, _ in runs] == sorted({o for o, _ in runs})
    assert all(start % align == 0 for _, start in runs)
    assert owners == runtime.pool().chunk_owners(n, align)  # static: the same split every time


def test_node_tasks_run_on_that_nodes_workers():
    pool = runtime.pool()
    node = pool.nodes()[0]
    owners = set(pool.chunk_owners(10_000, 16, node))
    on_node = {w["index"] for w in pool.workers() if w["node"] == node}
    assert owners <= on_node and owners
    # a node without workers (none here has id 1000) falls back to all workers
    assert set(pool.chunk_owners(10_000, 16, 1000)) == {w["index"] for w in pool.workers()}


def test_idle_workers_sleep_between_jobs():
    pool = runtime.pool()
    pool.chunk_owners(100_000, 16)
    tids = [w["tid"] for w in pool.workers()]
    time.sleep(0.05)  # past the brief spin
    before = [_task_cpu_ticks(t) for t in tids]
    time.sleep(0.5)
    after = [_task_cpu_ticks(t) for t in tids]
    # clock ticks are 10 ms: a spinning worker would burn ~50 in half a second
    assert all(b - a <= 2 for a, b in zip(before, after, strict=True)), (before, after)


def test_gil_is_released_while_kernels_run():
    done = threading.Event()
    pool = runtime.pool()
    node = pool.nodes()[0]

    def probe():
        _C.bandwidth(pool, "adamw", 8 << 20, node, node, 8)
        done.set()

    t = threading.Thread(target=probe)
    t.start()
    spins = 0
    while not done.is_set():
        spins += 1
    t.join()
    assert spins > 10_000  # the main thread kept running Python meanwhile


# ------------------------------------------------------------ re-planning --

def test_the_pool_is_replanned_only_when_asked():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs at least two CPUs to narrow the affinity")
    cpu = min(os.sched_getaffinity(0))
    out = _run(f"""
        import os
        from composer_numa.offload import runtime
        before = runtime.pool()
        n = before.size
        os.sched_setaffinity(0, {{{cpu}}})
        same = runtime.pool() is before and runtime.pool().size == n   # nothing re-plans by itself
        runtime.reset()
        ws = runtime.pool().workers()
        print(n, int(same), len(ws), ws[0]["cpu"])
    """)
    before, same, after, where = map(int, out.split())
    assert before >= 1 and same == 1 and after == 1 and where == cpu


def test_bind_rank_replans_a_loaded_runtime_and_never_loads_it():
    code = """
        import sys
        from composer_numa.binding.session import bind_rank
        from composer_numa.plan import PlanOptions
        loaded = {load}
        if loaded:
            from composer_numa.offload import runtime
            first = runtime.pool()
        binding = bind_rank(PlanOptions(mode="node"), local_rank=0, nproc=1, device=None)
        print(binding.bound_at, end=" ")
        if loaded:
            print(int(runtime.pool() is not first), end=" ")
        print(int("torch" in sys.modules), int("composer_numa._C" in sys.modules),
              int("composer_numa.offload.runtime" in sys.modules))
    """
    env = {"COMPOSER_NUMA_BINDING": "", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    assert _run(code.format(load=False), env).split() == ["exec", "0", "0", "0"]
    assert _run(code.format(load=True), env).split() == ["exec", "1", "0", "1", "1"]


# ------------------------------------------------------------ fork and exit --

def test_child_after_fork_gets_a_fresh_pool_and_parent_keeps_working():
    out = _run("""
        import os
        from composer_numa.offload import runtime
        pool = runtime.pool()
        parent = [w["tid"] for w in pool.workers()]
        pool.chunk_owners(1000, 16)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            owners = pool.chunk_owners(1000, 16)   # would hang on the parent's dead threads
            tids = [x["tid"] for x in pool.workers()]
            os.write(w, f"{len(set(owners))} {int(set(tids).isdisjoint(parent))}".encode())
            os._exit(0)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        child = os.read(r, 100).decode()
        assert len(set(pool.chunk_owners(1000, 16))) >= 1
        assert [w["tid"] for w in pool.workers()] == parent
        print(os.waitstatus_to_exitcode(status), child)
    """)
    code, used, fresh = out.split()
    assert code == "0" and int(used) >= 1 and fresh == "1"


def test_clean_exit_with_a_live_pool():
    t0 = time.monotonic()
    _run("""
        from composer_numa.offload import runtime
        runtime.reset(threads=3)
        runtime.pool().chunk_owners(10_000, 16)
        print("ok")
    """)
    assert time.monotonic() - t0 < 60
