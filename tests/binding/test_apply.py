"""apply / read_back / verify: on the live kernel in subprocesses, failure paths in-process."""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from composer_numa import bind, diagnostics
from composer_numa.binding import linux
from composer_numa.errors import BindError, ComposerNumaError
from composer_numa.plan import MemoryPolicy, RankPlan

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                 os.environ.get("PYTHONPATH")])))
CPUS = tuple(sorted(os.sched_getaffinity(0)))
needs_numa = pytest.mark.skipif(
    not os.path.exists("/sys/devices/system/node/node0"),
    reason="kernel without NUMA support (no /sys/devices/system/node)")


def rank_plan(cpus=CPUS, policy=MemoryPolicy.PREFERRED, nodes=(0,), threads=2, rank=0):
    return RankPlan(local_rank=rank, gpu=None, gpu_pci_bus_id=None, numa_nodes=(0,),
                    cpus=tuple(cpus), memory_policy=policy, memory_nodes=tuple(nodes),
                    num_threads=threads)


DRIVER = r"""
import json, os, sys, threading
from composer_numa import bind
from composer_numa.plan import RankPlan
plan = RankPlan.from_json(sys.argv[1])
ev = threading.Event()
threads = [threading.Thread(target=ev.wait) for _ in range(3)]
for t in threads: t.start()
applied = bind.apply(plan, migrate=len(sys.argv) > 2)
def status(tid, key):
    for line in open(f"/proc/self/task/{tid}/status"):
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
out = {
    "applied": applied.to_json(),
    "binding": bind.binding_document(applied, "exec"),
    "cpus_by_thread": {t: status(t, "Cpus_allowed_list") for t in os.listdir("/proc/self/task")},
    "verify": [str(d) for d in bind.verify(plan)],
    "verify_all": [d.what for d in bind.verify(plan, all_threads=True)],
    "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                           "KMP_AFFINITY", "GOMP_CPU_AFFINITY")},
}
# a thread started after apply() inherits the memory policy
t = threading.Thread(target=lambda: out.update(late=bind.read_back(pages=False).memory_policy))
t.start(); t.join()
ev.set()
print(json.dumps(out))
"""


def run_apply(plan: RankPlan, *extra: str, env: dict | None = None) -> dict:
    e = dict(ENV)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_AFFINITY", "GOMP_CPU_AFFINITY"):
        e.pop(k, None)
    e.update(env or {})
    out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(plan.to_json()), *extra],
                         capture_output=True, text=True, env=e, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"stderr": out.stderr}


@needs_numa
@pytest.mark.parametrize("policy, nodes, kernel_name", [
    (MemoryPolicy.BIND, (0,), "bind"),
    (MemoryPolicy.PREFERRED, (0,), "preferred"),
    (MemoryPolicy.INTERLEAVE, (0,), "interleave"),
    (MemoryPolicy.LOCAL, (), "local"),
])
def test_apply_binds_every_thread_and_the_policy(policy, nodes, kernel_name):
    one = CPUS[-1]
    plan = rank_plan(cpus=(one,), policy=policy, nodes=nodes, threads=3)
    got = run_apply(plan)
    a = got["applied"]
    assert a["not_applied"] == []
    assert a["cpus"] == [one] and a["threads"] == 4
    assert set(got["cpus_by_thread"].values()) == {str(one)}  # every thread, read from /proc
    assert a["memory_policy"] == kernel_name and a["memory_nodes"] == list(nodes)
    assert got["verify"] == []
    # threads that ran before apply() keep their policy: only all_threads shows it
    assert got["verify_all"] == ["thread_memory_policy"]
    assert got["late"] == kernel_name
    assert got["env"] == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3",
                          "KMP_AFFINITY": None, "GOMP_CPU_AFFINITY": None}
    assert any("3 other running thread(s) keep theirs" in n for n in a["notes"])
    assert "warning" not in got["stderr"]


@needs_numa
def test_apply_keeps_user_thread_counts_and_reports_inherited_pinning():
    got = run_apply(rank_plan(threads=2), env={"OMP_NUM_THREADS": "7", "GOMP_CPU_AFFINITY": "0"})
    assert got["env"]["OMP_NUM_THREADS"] == "7"
    assert got["env"]["MKL_NUM_THREADS"] == "2"
    assert got["env"]["KMP_AFFINITY"] is None
    assert got["applied"]["env"] == {"MKL_NUM_THREADS": "2"}
    notes = " ".join(got["applied"]["notes"])
    assert "OMP_NUM_THREADS=7 kept" in notes and "GOMP_CPU_AFFINITY=0 is inherited" in notes


@needs_numa
def test_apply_with_migration_leaves_no_page_behind():
    got = run_apply(rank_plan(policy=MemoryPolicy.BIND), "migrate")
    assert got["applied"]["pages_not_migrated"] == 0
    assert got["applied"]["not_applied"] == []


def test_binding_json_round_trips():
    plan = rank_plan(cpus=(1,), policy=MemoryPolicy.BIND, rank=1)
    applied = bind.Applied(plan, (1,), 4, "bind", (0,), None, {"OMP_NUM_THREADS": "2"}, (), ())
    doc = json.loads(json.dumps(bind.binding_document(applied, "launch")))
    assert RankPlan.from_json(doc) == plan
    assert doc["bound_at"] == "launch" and doc["schema"] == 1 and doc["pid"] == os.getpid()
    assert doc["applied"]["memory_policy"] == "bind" and doc["applied"]["not_applied"] == []
    env = {"COMPOSER_NUMA_BINDING": json.dumps(doc)}
    assert bind.binding_from_env(env) == (plan, doc)
    assert bind.binding_from_env({}) is None
    assert bind.made_for(doc, os.getpid()) and not bind.made_for(doc, os.getpid() + 1)
    with pytest.raises(ComposerNumaError, match="COMPOSER_NUMA_BINDING is not a binding"):
        bind.binding_from_env({"COMPOSER_NUMA_BINDING": "{\"cpus\": [1]}"})
    with pytest.raises(ComposerNumaError, match="COMPOSER_NUMA_BINDING is not a binding"):
        bind.binding_from_env({"COMPOSER_NUMA_BINDING": "not json"})


# -- failures: warn once and go on, or raise with strict ------------------------------


@needs_numa
def test_nonexistent_node_warns_and_continues():
    plan = rank_plan(policy=MemoryPolicy.BIND, nodes=(63,))
    env: dict[str, str] = {}
    with pytest.warns(diagnostics.NumaWarning, match=r"\[bind-not-applied\].*node 63") as rec:
        applied = bind.apply(plan, environ=env)
    assert len(rec) == 1
    assert not applied.ok and applied.memory_policy is None
    assert applied.cpus == CPUS  # the affinity part still applied
    assert "not an allowed memory node" in applied.not_applied[0]
    assert env["OMP_NUM_THREADS"] == "2"
    assert linux.get_mempolicy() == (linux.MPOL_DEFAULT, ())
    # the same failure again: no second warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bind.apply(plan, environ={})


@needs_numa
def test_strict_raises_bind_error():
    with pytest.raises(BindError, match=r"local rank 0: memory policy bind on nodes 63"):
        bind.apply(rank_plan(policy=MemoryPolicy.BIND, nodes=(63,)), strict=True, environ={})


def test_cpus_outside_the_machine_are_reported(capsys):
    applied = bind.apply(rank_plan(cpus=(4000,), policy=MemoryPolicy.NONE), environ={},
                         stderr=True)
    assert applied.cpus is None
    err = capsys.readouterr().err
    assert err.startswith("composer-numa: warning: [bind-not-applied] local rank 0: CPU affinity")
    assert err.count("\n") == 1
    assert tuple(sorted(os.sched_getaffinity(0))) == CPUS


def test_not_linux_applies_nothing_and_warns(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.warns(diagnostics.NumaWarning, match="not Linux"):
        applied = bind.apply(rank_plan(), environ={})
    assert applied.cpus is None and applied.memory_policy is None
    with pytest.raises(BindError, match="not Linux"):
        bind.apply(rank_plan(), strict=True, environ={})


@pytest.mark.parametrize("err, text", [(errno.ENOSYS, "no NUMA support"),
                                       (errno.EPERM, "not permitted")])
def test_syscall_refused(monkeypatch, err, text):
    monkeypatch.setattr(linux, "_call", lambda name, *a: -err)
    with pytest.warns(diagnostics.NumaWarning, match=text):
        applied = bind.apply(rank_plan(policy=MemoryPolicy.BIND), environ={})
    assert applied.cpus == CPUS and applied.memory_policy is None
    assert text in applied.not_applied[0]


def test_preferred_many_falls_back_to_the_first_node(monkeypatch):
    calls = []

    def fake_set(mode, nodes=(), flags=0):
        calls.append((mode, tuple(nodes)))
        if mode == linux.MPOL_PREFERRED_MANY:
            raise linux.NumaSyscallError(errno.EINVAL, "unsupported")

    monkeypatch.setattr(linux, "set_mempolicy", fake_set)
    monkeypatch.setattr(linux, "mems_allowed", lambda: (0, 1))
    with pytest.warns(diagnostics.NumaWarning, match=r"\[memory-policy-fallback\] .* no MPOL_PREFERRED_MANY"):
        applied = bind.apply(rank_plan(nodes=(1, 0)), environ={})
    assert calls == [(linux.MPOL_PREFERRED_MANY, (1, 0)), (linux.MPOL_PREFERRED, (1,))]
    assert applied.ok and applied.memory_policy == "preferred"
    assert applied.memory_nodes == (1,)
    with pytest.raises(BindError, match="no MPOL_PREFERRED_MANY"):
        bind.apply(rank_plan(nodes=(1, 0)), environ={}, strict=True)


def test_local_falls_back_on_old_kernels(monkeypatch):
    calls = []

    def fake_set(mode, nodes=(), flags=0):
        calls.append(mode)
        if mode == linux.MPOL_LOCAL:
            raise linux.NumaSyscallError(errno.EINVAL, "unsupported")

    monkeypatch.setattr(linux, "set_mempolicy", fake_set)
    applied = bind.apply(rank_plan(policy=MemoryPolicy.LOCAL, nodes=()), environ={})
    assert calls == [linux.MPOL_LOCAL, linux.MPOL_PREFERRED]
    assert applied.ok and applied.memory_policy == "local"


def test_policy_none_touches_nothing(monkeypatch):
    monkeypatch.setattr(linux, "set_mempolicy", lambda *a, **k: pytest.fail("policy was set"))
    applied = bind.apply(rank_plan(policy=MemoryPolicy.NONE, nodes=()), set_env=False,
                         environ={})
    assert applied.ok and applied.memory_policy is None and applied.env == {}


# -- read_back / verify ------------------------------------------------------------------


@needs_numa
def test_read_back_sees_memory_we_touch():
    before = bind.read_back()
    size = 64 << 20
    buf = mmap.mmap(-1, size)
    try:
        for off in range(0, size, mmap.PAGESIZE):
            buf[off] = 1
        after = bind.read_back(thread_policies=True)
    finally:
        buf.close()
    grown = sum(after.pages.process.values()) - sum(before.pages.process.values())
    assert grown >= size * 0.95
    assert after.affinity == {t: linux.get_affinity(t) for t in linux.thread_ids()}
    assert after.memory_policy == "default" and after.errors == ()
    assert after.thread_policies[os.getpid()] == ("default", ())
    doc = json.loads(json.dumps(after.to_json()))
    assert doc["pid"] == os.getpid()


def test_verify_names_each_difference():
    state = bind.State(pid=10, affinity={10: (0, 1), 11: (0, 1), 12: (1,)},
                       memory_policy="default", memory_nodes=(),
                       thread_policies={10: ("default", ()), 11: ("bind", (0,)),
                                        12: ("interleave", (0,))})
    plan = rank_plan(cpus=(1,), policy=MemoryPolicy.BIND)
    diffs = bind.verify(plan, state, all_threads=True)
    assert [d.what for d in diffs] == ["cpus", "memory_policy", "thread_memory_policy"]
    assert str(diffs[0]) == "2 thread(s) (10,11) may run on CPUs 0-1, planned 1"
    assert str(diffs[1]) == "memory policy is default, planned bind:0"
    # the main thread (10) is reported once, as the process policy
    assert str(diffs[2]) == "1 thread(s) (first 12) have memory policy interleave:0, planned bind:0"
    assert [d.what for d in bind.verify(plan, state)] == ["cpus", "memory_policy"]
    assert bind.verify(plan, bind.State(10, {10: (1,)}, "bind", (0,))) == []


@pytest.mark.parametrize("policy, nodes, kernel, knodes, ok", [
    (MemoryPolicy.PREFERRED, (1,), "preferred", (1,), True),
    (MemoryPolicy.PREFERRED, (1, 0), "preferred-many", (0, 1), True),
    (MemoryPolicy.PREFERRED, (1, 0), "preferred", (1,), True),  # kernel without PREFERRED_MANY
    (MemoryPolicy.PREFERRED, (1, 0), "preferred", (0,), False),
    (MemoryPolicy.LOCAL, (), "local", (), True),
    (MemoryPolicy.LOCAL, (), "preferred", (), True),
    (MemoryPolicy.BIND, (0, 1), "bind", (0,), False),
    (MemoryPolicy.INTERLEAVE, (0, 1), "interleave", (0, 1), True),
    (MemoryPolicy.INTERLEAVE, (0, 1), None, (), False),
    (MemoryPolicy.NONE, (), "bind", (3,), True),
])
def test_verify_policy_equivalences(policy, nodes, kernel, knodes, ok):
    state = bind.State(pid=1, affinity={1: CPUS}, memory_policy=kernel, memory_nodes=knodes)
    assert (bind.verify(rank_plan(policy=policy, nodes=nodes), state) == []) is ok


def test_verify_locality():
    from composer_numa.binding.locality import NumaMaps

    maps = NumaMaps(process={0: 10, 1: 90})
    state = bind.State(pid=1, affinity={1: CPUS}, memory_policy="bind", memory_nodes=(1,),
                       pages=maps)
    plan = rank_plan(policy=MemoryPolicy.BIND, nodes=(1,))
    assert bind.verify(plan, state, min_local_fraction=0.9) == []
    (d,) = bind.verify(plan, state, min_local_fraction=0.95)
    assert d.what == "locality" and str(d) == ("90.0% of resident memory is on nodes 1, "
                                               "required 95%")


def test_omp_num_threads_zero_counts_as_unset():
    got = run_apply(rank_plan(threads=2), env={"OMP_NUM_THREADS": "0", "MKL_NUM_THREADS": ""})
    assert got["env"]["OMP_NUM_THREADS"] == "2" and got["env"]["MKL_NUM_THREADS"] == "2"
    assert got["applied"]["env"] == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


PINNED = r"""
import json, os, sys, threading
from composer_numa import bind
from composer_numa.plan import RankPlan
plan = RankPlan.from_json(sys.argv[1])
cpus = sorted(os.sched_getaffinity(0))
ready, stop, tids = threading.Barrier(3), threading.Event(), {}
def worker(name, pin):
    if pin is not None:
        os.sched_setaffinity(0, pin)  # a library pinning its own thread on purpose
    tids[name] = threading.get_native_id()
    ready.wait()
    stop.wait()
threads = [threading.Thread(target=worker, args=("pinned", [cpus[-1]])),
           threading.Thread(target=worker, args=("plain", None))]
for t in threads: t.start()
ready.wait()
applied = bind.apply(plan, respect_pinned=sys.argv[2] == "1")
def cpus_of(tid):
    return sorted(os.sched_getaffinity(tid))
out = {k: cpus_of(v) for k, v in tids.items()} | {"kept": list(applied.kept_threads), "main": cpus_of(0)}
stop.set()
for t in threads: t.join()
print(json.dumps(out))
"""


@pytest.mark.skipif(len(CPUS) < 2, reason="needs two allowed CPUs")
@pytest.mark.parametrize("respect", [True, False])
def test_threads_pinned_elsewhere_on_purpose_are_left_alone(respect):
    plan = rank_plan(cpus=CPUS[:1], policy=MemoryPolicy.NONE, nodes=())
    out = subprocess.run([sys.executable, "-c", PINNED, json.dumps(plan.to_json()), "1" if respect else "0"],
                         capture_output=True, text=True, env=ENV, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["main"] == [CPUS[0]] and got["plain"] == [CPUS[0]]
    if respect:
        assert got["pinned"] == [CPUS[-1]] and len(got["kept"]) == 1
    else:
        assert got["pinned"] == [CPUS[0]] and got["kept"] == []
