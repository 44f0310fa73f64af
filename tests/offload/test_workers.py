"""The pinned worker pool of the C++ extension: placement read back from the
kernel, static chunking, idling, affinity changes, fork and exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

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


def _run(code: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(autouse=True)
def default_pool():
    _C.set_num_threads(0)
    yield
    _C.set_num_threads(0)


def test_one_worker_per_physical_core_pinned_and_read_back():
    allowed = os.sched_getaffinity(0)
    workers = _C.workers()
    assert len(workers) == len(_physical_cores(allowed)) == _C.num_threads()
    cpus = [w["cpu"] for w in workers]
    assert len(set(cpus)) == len(cpus) and set(cpus) <= allowed
    assert _physical_cores(set(cpus)) == _physical_cores(allowed)  # one per core, no SMT twins
    for w in workers:
        assert _task_affinity(w["tid"]) == str(w["cpu"])  # the kernel says: pinned to its core
        node = next(int(d[4:]) for d in os.listdir(f"/sys/devices/system/cpu/cpu{w['cpu']}")
                    if d.startswith("node") and d[4:].isdigit())
        assert w["node"] == node
    assert _C.worker_nodes() == sorted({w["node"] for w in workers})


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_set_num_threads_and_wraparound(n):
    _C.set_num_threads(n)
    workers = _C.workers()
    assert _C.num_threads() == n == len(workers)
    assert [w["index"] for w in workers] == list(range(n))
    assert {w["cpu"] for w in workers} <= os.sched_getaffinity(0)
    for w in workers:
        assert _task_affinity(w["tid"]) == str(w["cpu"])


def test_set_num_threads_rejects_negative():
    with pytest.raises(ValueError):
        _C.set_num_threads(-1)


@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("n,align", [(0, 16), (1, 16), (15, 16), (16, 16), (1000, 16), (4099, 1),
                                     (100, 64)])
def test_static_chunks_are_contiguous_aligned_and_cover_everything(threads, n, align):
    _C.set_num_threads(threads)
    owners = _C.chunk_owners(n, align)
    assert len(owners) == n and all(o >= 0 for o in owners)
    # each worker owns one contiguous run, runs appear in worker order, boundaries are aligned
    runs = []
    for i, o in enumerate(owners):
        if not runs or runs[-1][0] != o:
            runs.append((o, i))
    assert [o for o, _ in runs] == sorted({o for o, _ in runs})
    assert all(start % align == 0 for _, start in runs)
    assert owners == _C.chunk_owners(n, align)  # static: the same split every time


def test_node_tasks_run_on_that_nodes_workers():
    node = _C.worker_nodes()[0]
    owners = set(_C.chunk_owners(10_000, 16, node))
    on_node = {w["index"] for w in _C.workers() if w["node"] == node}
    assert owners <= on_node and owners
    # a node without workers (none here has index 4096) falls back to all workers
    assert set(_C.chunk_owners(10_000, 16, 4096)) == {w["index"] for w in _C.workers()}


def test_idle_workers_sleep_between_jobs():
    _C.chunk_owners(100_000, 16)
    tids = [w["tid"] for w in _C.workers()]
    time.sleep(0.05)  # past the brief spin
    before = [_task_cpu_ticks(t) for t in tids]
    time.sleep(0.5)
    after = [_task_cpu_ticks(t) for t in tids]
    # clock ticks are 10 ms: a spinning worker would burn ~50 in half a second
    assert all(b - a <= 2 for a, b in zip(before, after, strict=True)), (before, after)


def test_gil_is_released_while_kernels_run():
    done = threading.Event()

    def probe():
        _C.bandwidth("adamw", 8 << 20, _C.worker_nodes()[0], _C.worker_nodes()[0], 8)
        done.set()

    t = threading.Thread(target=probe)
    t.start()
    spins = 0
    while not done.is_set():
        spins += 1
    t.join()
    assert spins > 10_000  # the main thread kept running Python meanwhile


def test_pool_follows_affinity_changes():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs at least two CPUs to narrow the affinity")
    cpu = min(os.sched_getaffinity(0))
    out = _run(f"""
        import os
        from composer_numa import _C
        before = _C.num_threads()
        os.sched_setaffinity(0, {{{cpu}}})
        ws = _C.workers()
        print(before, len(ws), ws[0]["cpu"])
    """)
    before, after, where = map(int, out.split())
    assert before >= 1 and after == 1 and where == cpu


def test_child_after_fork_gets_a_fresh_pool_and_parent_keeps_working():
    out = _run("""
        import os
        from composer_numa import _C
        parent = [w["tid"] for w in _C.workers()]
        _C.chunk_owners(1000, 16)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            owners = _C.chunk_owners(1000, 16)   # would hang on the parent's dead threads
            tids = [x["tid"] for x in _C.workers()]
            os.write(w, f"{len(set(owners))} {int(set(tids).isdisjoint(parent))}".encode())
            os._exit(0)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        child = os.read(r, 100).decode()
        assert len(set(_C.chunk_owners(1000, 16))) >= 1
        print(os.waitstatus_to_exitcode(status), child)
    """)
    code, used, fresh = out.split()
    assert code == "0" and int(used) >= 1 and fresh == "1"


def test_clean_exit_with_a_live_pool():
    t0 = time.monotonic()
    _run("""
        from composer_numa import _C
        _C.set_num_threads(3)
        _C.chunk_owners(10_000, 16)
        print("ok")
    """)
    assert time.monotonic() - t0 < 60
