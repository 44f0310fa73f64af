"""The NumaAffinity Composer callback.

Training runs that change process-wide affinity run in subprocesses: this file
is also a script (``python -m tests.composer.test_callback SCENARIO OUT.json``) whose
scenarios train tiny CPU models with Composer's Trainer and write what the
kernel reports as JSON; the tests assert on that. The pytest process itself is
never bound.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CPUS = tuple(sorted(os.sched_getaffinity(0)))
# Variables a launcher or an earlier binding could have left; every run starts clean.
_SCRUB = ("COMPOSER_NUMA_BINDING", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
          "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "KMP_AFFINITY", "GOMP_CPU_AFFINITY")
needs_numa = pytest.mark.skipif(not os.path.exists("/sys/devices/system/node/node0"),
                                reason="kernel without NUMA support (no /sys/devices/system/node)")
needs_two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="needs at least 2 allowed CPUs")


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["PYTHONWARNINGS"] = "ignore::UserWarning:torch.utils.data.dataloader"
    return env


def _failed(cmd: list[str], proc: subprocess.CompletedProcess) -> str:
    return f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def run_scenario(name: str, out: Path, prefix: tuple[str, ...] = (), timeout: int = 300, **env: str) -> dict:
    cmd = [*prefix, sys.executable, "-m", "tests.composer.test_callback", name, str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env() | env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, _failed(cmd, proc)
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------
# Scenarios (run in a subprocess)
# ---------------------------------------------------------------------------------------------


def _status(path: str, key: str) -> str:
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
    raise KeyError(key)


def _threads_cpus() -> dict[str, str]:
    """Cpus_allowed_list of every thread of this process, as the kernel reports it."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[tid] = _status(f"/proc/self/task/{tid}/status", "Cpus_allowed_list")
        except (OSError, KeyError):
            pass
    return out


def _record_worker(directory: str, worker_id: int) -> None:
    """A user's worker_init_fn: records that it ran, where, and on which CPUs."""
    with open(os.path.join(directory, f"worker{worker_id}.json"), "w") as f:
        json.dump({"pid": os.getpid(), "affinity": sorted(os.sched_getaffinity(0))}, f)


def _policy() -> list:
    from composer_numa.binding import linux

    mode, nodes = linux.get_mempolicy()
    return [linux.POLICY_NAMES.get(mode, str(mode)), list(nodes)]


def _train(callback, *, duration="2ep", num_workers=0, worker_init_fn=None, probe=None) -> dict:
    """Train a tiny classifier on CPU with ``callback``; returns the numa/* logs and more."""
    import torch
    from composer import Trainer
    from composer.loggers import InMemoryLogger
    from composer.models import ComposerClassifier
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x = torch.randn(128, 8)
    y = (x.sum(1) > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, num_workers=num_workers,
                        persistent_workers=num_workers > 0, worker_init_fn=worker_init_fn)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model = ComposerClassifier(net, num_classes=2)
    logger = InMemoryLogger()
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=duration, device="cpu",
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
                      callbacks=[callback] + ([probe] if probe else []), loggers=[logger],
                      progress_bar=False, log_to_console=False)
    trainer.fit()
    result = {
        "hparams": {k: v for k, v in logger.hyperparameters.items() if k.startswith("numa/")},
        "metrics": {k: [[int(ts.batch), v] for ts, v in vals] for k, vals in logger.data.items()
                    if k.startswith("numa/")},
        "batches": int(trainer.state.timestamp.batch),
        "torch_threads": torch.get_num_threads(),
        "threads_cpus": _threads_cpus(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "policy": _policy(),
        "state_dict": callback.state_dict(),
    }
    trainer.close()
    # close() leaves the process as it is.
    result["after_close"] = {"affinity": sorted(os.sched_getaffinity(0)), "policy": _policy(),
                             "torch_threads": torch.get_num_threads()}
    return result


def _warning_codes(caught) -> list[str]:
    return sorted({str(w.message).split("]")[0].lstrip("[") for w in caught if str(w.message).startswith("[")})


def scenario_single(out: str) -> None:
    """One rank, no launcher: strict failures, the default binding, worker cores, fallbacks."""
    import torch
    from composer.core import Callback

    from composer_numa import NumaAffinity
    from composer_numa.errors import ComposerNumaError
    from composer_numa.machine.sysfs import discover
    from composer_numa.plan import PlanOptions, plan

    result: dict = {"cpus_at_start": sorted(os.sched_getaffinity(0)), "policy_at_start": _policy(),
                    "threads_at_start": torch.get_num_threads()}
    planned = plan(discover(), PlanOptions(nproc=1)).ranks[0]
    result["plan"] = planned.to_json()

    # 1. Strict mode, impossible requests: a clear error, and nothing applied.
    strict = {}
    for name, kwargs in (("memory", {"memory": "bind", "memory_need": "1P"}),
                         ("worker_cores", {"worker_cores": 64})):
        try:
            NumaAffinity(strict=True, **kwargs).bind()
            strict[name] = None
        except ComposerNumaError as e:
            strict[name] = f"{type(e).__name__}: {e}"
    result["strict"] = strict
    result["after_strict"] = {"affinity": sorted(os.sched_getaffinity(0)), "policy": _policy(),
                              "omp": os.environ.get("OMP_NUM_THREADS")}

    # 2. The default binding, locality logged at fit start, every epoch end and fit end.
    result["basic"] = _train(NumaAffinity(), duration="2ep")

    # 3. Locality switched off, and logged on a batch interval.
    result["no_locality"] = _train(NumaAffinity(log_locality=False), duration="2ba")
    result["every_2ba"] = _train(NumaAffinity(log_locality="2ba"), duration="4ba")

    # 4. A core reserved for two persistent DataLoader workers; the user's worker_init_fn still runs.
    wdir = os.path.join(os.path.dirname(out), "workers")
    os.makedirs(wdir, exist_ok=True)

    class WorkerProbe(Callback):
        def __init__(self):
            self.seen = {}

        def batch_end(self, state, logger):
            iterator = getattr(state.dataloader, "_iterator", None)
            for w in getattr(iterator, "_workers", None) or ():
                self.seen[str(w.pid)] = _status(f"/proc/{w.pid}/status", "Cpus_allowed_list")
            self.seen_main = _threads_cpus()

    probe = WorkerProbe()
    result["workers"] = _train(NumaAffinity(worker_cores=1), duration="2ep", num_workers=2,
                               worker_init_fn=functools.partial(_record_worker, wdir), probe=probe)
    result["workers"]["worker_status"] = probe.seen
    result["workers"]["main_threads_during"] = probe.seen_main
    result["workers"]["user_fn"] = {p.name: json.loads(p.read_text()) for p in sorted(Path(wdir).glob("*.json"))}

    # 5. Default mode, the same impossible requests: warnings with stable codes, and it trains.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result["fallback"] = _train(NumaAffinity(memory="bind", memory_need="1P", worker_cores=64), duration="1ep")
    result["fallback"]["warnings"] = _warning_codes(caught)
    Path(out).write_text(json.dumps(result))


def scenario_adopt(out: str) -> None:
    """Started by ``composer-numa exec``: verify (and repair) the binding instead of re-planning."""
    from composer_numa import NumaAffinity, bind

    result: dict = {"binding": json.loads(os.environ["COMPOSER_NUMA_BINDING"]),
                    "affinity_at_start": sorted(os.sched_getaffinity(0)), "policy_at_start": _policy()}
    result["verify_at_start"] = [str(d) for d in bind.verify(bind.binding_from_env()[0])]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result["adopt"] = _train(NumaAffinity(mode="node"), duration="1ba")
    result["adopt"]["warnings"] = _warning_codes(caught)
    result["adopt"]["messages"] = [str(w.message) for w in caught if "options-ignored" in str(w.message)]

    # Something moved the main thread: the callback warns binding-mismatch and puts it back.
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    result["drifted_to"] = sorted(os.sched_getaffinity(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result["drifted"] = _train(NumaAffinity(), duration="1ba")
    result["drifted"]["warnings"] = _warning_codes(caught)

    # A binding document inherited from another process (another PID) is not this process's.
    doc = dict(result["binding"], pid=1)
    os.environ["COMPOSER_NUMA_BINDING"] = json.dumps(doc)
    result["inherited"] = _train(NumaAffinity(), duration="1ba")
    Path(out).write_text(json.dumps(result))


def scenario_adopt_workers(out: str) -> None:
    """Started by ``composer-numa exec`` with a whole node: worker cores are carved out of that binding."""
    from composer.core import Callback

    from composer_numa import NumaAffinity

    class WorkerProbe(Callback):
        seen: dict = {}

        def batch_end(self, state, logger):
            iterator = getattr(state.dataloader, "_iterator", None)
            for w in getattr(iterator, "_workers", None) or ():
                self.seen[str(w.pid)] = _status(f"/proc/{w.pid}/status", "Cpus_allowed_list")

    result: dict = {"binding": json.loads(os.environ["COMPOSER_NUMA_BINDING"])}
    probe = WorkerProbe()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result["run"] = _train(NumaAffinity(worker_cores=1), duration="1ep", num_workers=2, probe=probe)
    result["run"]["warnings"] = _warning_codes(caught)
    result["run"]["worker_status"] = probe.seen
    Path(out).write_text(json.dumps(result))


def scenario_bad_rank(out: str) -> None:
    """LOCAL_RANK outside LOCAL_WORLD_SIZE: a binding problem, warned once; training goes on."""
    from composer_numa import NumaAffinity

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _train(NumaAffinity(), duration="1ba")
    result["warnings"] = _warning_codes(caught)
    result["messages"] = [str(w.message) for w in caught if str(w.message).startswith("[")]
    Path(out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Tests of the scenarios
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return run_scenario("single", tmp_path_factory.mktemp("single") / "out.json")


def _cpulist(text: str) -> list[int]:
    from composer_numa.units import parse_cpulist

    return list(parse_cpulist(text))


@needs_numa
def test_hyperparameters_logged(single):
    hp, plan = single["basic"]["hparams"], single["plan"]
    assert hp["numa/local_rank"] == 0
    assert hp["numa/gpu_pci_bus_id"] == plan["gpu_pci_bus_id"]
    assert _cpulist(hp["numa/nodes"]) == plan["numa_nodes"]
    assert _cpulist(hp["numa/cpus"]) == plan["cpus"]
    assert hp["numa/memory_policy"] == plan["memory_policy"] == "preferred"
    assert _cpulist(hp["numa/memory_nodes"]) == plan["memory_nodes"]
    assert hp["numa/num_threads"] == plan["num_threads"]
    assert hp["numa/bound_at"] == "callback"
    assert hp["numa/worker_cpus"] == ""
    assert "NUMA node" in hp["numa/machine"]


@needs_numa
def test_threads_affinity_and_policy_are_the_plans(single):
    basic, plan = single["basic"], single["plan"]
    assert basic["torch_threads"] == plan["num_threads"]
    # Every thread of the process, read back from the kernel, is on the planned CPUs.
    assert {t: _cpulist(c) for t, c in basic["threads_cpus"].items()} == {
        t: plan["cpus"] for t in basic["threads_cpus"]}
    assert basic["policy"] == ["preferred", plan["memory_nodes"]]


@needs_numa
def test_local_memory_fraction_logged_at_fit_start_and_epoch_ends(single):
    series = single["basic"]["metrics"]["numa/local_memory_fraction"]
    # fit start (batch 0), end of epoch 1 (batch 4) and 2 (batch 8); fit end coincides with the last
    assert [b for b, _ in series] == [0, 4, 8]
    assert all(0.0 <= v <= 1.0 for _, v in series)
    # one node: every resident page is local
    assert all(v == 1.0 for _, v in series)


@needs_numa
def test_numastat_counters_logged_when_readable(single):
    metrics = single["basic"]["metrics"]
    for key in ("numa/node0/numa_miss", "numa/node0/other_node"):
        assert [b for b, _ in metrics[key]] == [0, 4, 8]
        assert all(isinstance(v, int) and v >= 0 for _, v in metrics[key])


@needs_numa
def test_locality_can_be_switched_off_or_set_to_an_interval(single):
    assert not any(k.startswith("numa/node") or k == "numa/local_memory_fraction"
                   for k in single["no_locality"]["metrics"])
    assert single["no_locality"]["hparams"]["numa/bound_at"] == "callback"
    series = single["every_2ba"]["metrics"]["numa/local_memory_fraction"]
    assert [b for b, _ in series] == [0, 2, 4]


def test_state_dict_empty_and_close_leaves_the_process_bound(single):
    basic = single["basic"]
    assert basic["state_dict"] == {}
    assert basic["after_close"] == {"affinity": basic["affinity"], "policy": basic["policy"],
                                    "torch_threads": basic["torch_threads"]}


@needs_two_cpus
def test_worker_cores_pin_workers_and_move_main_threads_off(single):
    w = single["workers"]
    reserved = _cpulist(w["hparams"]["numa/worker_cpus"])
    assert len(reserved) == 1 and reserved[0] in single["plan"]["cpus"]
    train_cpus = sorted(set(single["plan"]["cpus"]) - set(reserved))
    assert _cpulist(w["hparams"]["numa/cpus"]) == train_cpus
    # two persistent workers, each on the reserved core (read from /proc/<pid>/status)
    assert len(w["worker_status"]) == 2
    assert all(_cpulist(c) == reserved for c in w["worker_status"].values())
    # no thread of the training process may run on it, during and after training
    for threads in (w["main_threads_during"], w["threads_cpus"]):
        assert threads and all(not set(_cpulist(c)) & set(reserved) for c in threads.values())
    # threads scaled to the cores left: plan's count * (cores left / cores)
    assert w["torch_threads"] == w["hparams"]["numa/num_threads"] == max(
        1, single["plan"]["num_threads"] * len(train_cpus) // len(single["plan"]["cpus"]))


@needs_two_cpus
def test_user_worker_init_fn_still_runs_after_pinning(single):
    w = single["workers"]
    reserved = _cpulist(w["hparams"]["numa/worker_cpus"])
    ran = w["user_fn"]
    assert sorted(ran) == ["worker0.json", "worker1.json"]
    assert {str(r["pid"]) for r in ran.values()} == set(w["worker_status"])
    # the user's function runs after the worker is pinned
    assert all(r["affinity"] == reserved for r in ran.values())


def test_strict_impossible_plan_raises_clearly_and_applies_nothing(single):
    strict = single["strict"]
    assert strict["memory"] is not None and strict["memory"].startswith("PlanError")
    assert "node-memory-insufficient" in strict["memory"] and "strict" in strict["memory"]
    assert strict["worker_cores"] is not None and "worker_cores=64" in strict["worker_cores"]
    assert single["after_strict"] == {"affinity": single["cpus_at_start"], "policy": single["policy_at_start"],
                                      "omp": None}


@needs_numa
def test_default_impossible_plan_warns_and_trains(single):
    fb = single["fallback"]
    assert fb["batches"] == 4
    assert {"node-memory-insufficient", "too-few-cores"} <= set(fb["warnings"])
    assert set(fb["hparams"]["numa/warnings"].split(",")) >= {"node-memory-insufficient", "too-few-cores"}
    # bind fell back to preferred; no worker core could be reserved
    assert fb["hparams"]["numa/memory_policy"] == "preferred"
    assert fb["hparams"]["numa/worker_cpus"] == ""
    assert _cpulist(fb["hparams"]["numa/cpus"]) == single["plan"]["cpus"]


@needs_numa
@needs_two_cpus
def test_exec_binding_is_verified_not_replanned(tmp_path):
    prefix = ("composer-numa", "exec", "--mode", "exclusive", "--local-rank", "1", "--nproc", "2", "--")
    if shutil.which("composer-numa") is None:
        prefix = (sys.executable, "-m", "composer_numa.cli", *prefix[1:])
    r = run_scenario("adopt", tmp_path / "out.json", prefix=prefix)
    want = r["binding"]["cpus"]
    assert r["binding"]["bound_at"] == "exec" and len(want) == 1
    assert r["affinity_at_start"] == want and r["verify_at_start"] == []
    # mode='node' in the callback does not override the exclusive binding made at birth
    adopt = r["adopt"]["hparams"]
    assert adopt["numa/bound_at"] == "exec"
    # ... and says so, once
    assert r["adopt"]["warnings"] == ["options-ignored"] and adopt["numa/warnings"] == "options-ignored"
    (msg,) = r["adopt"]["messages"]
    assert "NumaAffinity(mode='node') differs from the binding composer-numa exec made" in msg
    assert _cpulist(adopt["numa/cpus"]) == want and adopt["numa/local_rank"] == 1
    assert r["adopt"]["affinity"] == want
    # drifted main thread: warned with its code and put back
    assert r["drifted_to"] != want
    assert "binding-mismatch" in r["drifted"]["warnings"]
    assert "binding-mismatch" in r["drifted"]["hparams"]["numa/warnings"]
    assert r["drifted"]["affinity"] == want
    assert all(_cpulist(c) == want for c in r["drifted"]["threads_cpus"].values())
    # a document from another process is ignored: the callback plans rank 0 of 1 itself, within
    # the CPUs this process was started with
    assert r["inherited"]["hparams"]["numa/bound_at"] == "callback"
    assert r["inherited"]["hparams"]["numa/local_rank"] == 0
    assert r["inherited"]["affinity"] == want


def test_a_local_rank_outside_the_local_world_warns_once_and_trains(tmp_path):
    r = run_scenario("bad_rank", tmp_path / "out.json", LOCAL_RANK="3", LOCAL_WORLD_SIZE="2")
    assert r["batches"] == 1
    assert r["warnings"] == ["bind-not-applied"] and len(r["messages"]) == 1
    assert "local rank 3 from LOCAL_RANK is not below the local world size 2" in r["messages"][0]
    assert r["hparams"]["numa/bound_at"] == "none" and r["hparams"]["numa/warnings"] == "bind-not-applied"


@needs_numa
@needs_two_cpus
def test_worker_cores_under_exec_narrow_the_birth_binding_without_mismatch(tmp_path):
    prefix = ("composer-numa", "exec", "--mode", "node", "--local-rank", "0", "--nproc", "1", "--")
    if shutil.which("composer-numa") is None:
        prefix = (sys.executable, "-m", "composer_numa.cli", *prefix[1:])
    r = run_scenario("adopt_workers", tmp_path / "out.json", prefix=prefix)
    run, birth = r["run"], r["binding"]["cpus"]
    hp = run["hparams"]
    assert hp["numa/bound_at"] == "exec" and hp["numa/warnings"] == "" and run["warnings"] == []
    reserved, train = _cpulist(hp["numa/worker_cpus"]), _cpulist(hp["numa/cpus"])
    assert reserved and train and sorted(reserved + train) == birth
    assert len(run["worker_status"]) == 2 and all(_cpulist(c) == reserved for c in run["worker_status"].values())
    assert all(_cpulist(c) == train for c in run["threads_cpus"].values())


# ---------------------------------------------------------------------------------------------
# Two ranks through Composer's launcher, and through composer-numa launch
# ---------------------------------------------------------------------------------------------


def _two_ranks(tmp_path: Path, launcher: list[str], *args: str) -> list[dict]:
    reports = tmp_path / "reports"
    cmd = [*launcher, "examples/train.py", "--steps", "4", *args, "--report-dir", str(reports)]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, _failed(cmd, proc)
    return [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]


def _exclusive_plan() -> list[list[int]]:
    from composer_numa.machine.sysfs import discover
    from composer_numa.plan import Mode, PlanOptions, plan

    return [list(r.cpus) for r in plan(discover(), PlanOptions(nproc=2, mode=Mode.EXCLUSIVE)).ranks]


@pytest.mark.slow
@needs_numa
@needs_two_cpus
def test_two_ranks_under_composer_launcher_each_on_its_own_cpu(tmp_path):
    if shutil.which("composer") is None:
        pytest.skip("Composer's launcher (composer) is not on PATH")
    ranks = _two_ranks(tmp_path, ["composer", "-n", "2"], "--numa-mode", "exclusive")
    plan = _exclusive_plan()
    for r, report in enumerate(ranks):
        assert report["local_rank"] == r and report["local_world_size"] == 2
        assert report["numa"]["numa/bound_at"] == "callback"
        assert report["numa"]["numa/local_rank"] == r
        # each rank on its own single CPU, as the exclusive plan says, read back from the kernel
        assert report["affinity"] == plan[r] and len(plan[r]) == 1
        assert _cpulist(report["numa"]["numa/cpus"]) == plan[r]
        assert report["torch_num_threads"] == report["numa"]["numa/num_threads"] == 1
        assert report["memory_policy"] == "preferred"
        assert 0.0 <= report["numa_metrics"]["numa/local_memory_fraction"] <= 1.0
    assert ranks[0]["affinity"] != ranks[1]["affinity"]


@pytest.mark.slow
@needs_numa
@needs_two_cpus
def test_two_ranks_under_composer_numa_launch_log_bound_at_launch(tmp_path):
    pytest.importorskip("composer_numa.cli.launch")
    ranks = _two_ranks(tmp_path, ["composer-numa", "launch", "-n", "2", "--numa-mode", "exclusive"])
    plan = _exclusive_plan()
    for r, report in enumerate(ranks):
        assert report["local_rank"] == r
        assert report["numa"]["numa/bound_at"] == "launch"
        assert report["affinity"] == plan[r]
        assert _cpulist(report["numa"]["numa/cpus"]) == plan[r]
        assert 0.0 <= report["numa_metrics"]["numa/local_memory_fraction"] <= 1.0
    assert ranks[0]["affinity"] != ranks[1]["affinity"]


# ---------------------------------------------------------------------------------------------
# In-process checks that bind nothing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, words", [
    ({"mode": "sockets"}, "unknown mode 'sockets'"),
    ({"memory": "membind"}, "unknown memory policy 'membind'"),
    ({"memory_need": "lots"}, "memory_need"),
    ({"num_threads": 0}, "num_threads"),
    ({"worker_cores": -1}, "worker_cores"),
    ({"log_locality": "5xx"}, "log_locality"),
])
def test_bad_options_are_clear_errors_before_binding(kwargs, words):
    from composer_numa import NumaAffinity

    before = os.sched_getaffinity(0)
    with pytest.raises(ValueError, match=words):
        NumaAffinity(**kwargs)
    assert os.sched_getaffinity(0) == before


def test_reserve_cores_keeps_smt_siblings_together():
    from composer_numa.binding.workers import reserve_cores

    cpus = (0, 1, 2, 3, 8, 9, 10, 11)  # siblings (c, c + 8)
    core_of = lambda c: c % 8  # noqa: E731
    assert reserve_cores(cpus, core_of, 1) == ((0, 1, 2, 8, 9, 10), (3, 11))
    assert reserve_cores(cpus, core_of, 3) == ((0, 8), (1, 2, 3, 9, 10, 11))
    assert reserve_cores(cpus, core_of, 4) is None  # the training threads need a core
    assert reserve_cores((5,), lambda c: c, 1) is None


def _identity_fn(calls, worker_id):
    calls.append(worker_id)


def test_install_chains_the_users_worker_init_fn_once():
    torch_data = pytest.importorskip("torch.utils.data")
    from composer_numa.binding.workers import WorkerAffinity, install

    ds = torch_data.TensorDataset(pytest.importorskip("torch").zeros(4, 1))
    calls: list[int] = []
    user = functools.partial(_identity_fn, calls)
    loader = torch_data.DataLoader(ds, num_workers=2, worker_init_fn=user)
    assert install(loader, CPUS) == 0  # no iterator running yet
    wrapped = loader.worker_init_fn
    assert isinstance(wrapped, WorkerAffinity) and wrapped.user_fn is user and wrapped.cpus == CPUS
    install(loader, CPUS)
    assert loader.worker_init_fn is wrapped  # idempotent: never wrapped twice
    install(loader, CPUS[:1])
    assert loader.worker_init_fn.user_fn is user and loader.worker_init_fn.cpus == CPUS[:1]
    # picklable for spawn/forkserver workers
    clone = pickle.loads(pickle.dumps(WorkerAffinity(CPUS, None)))
    assert clone.cpus == CPUS and clone.user_fn is None
    # pinning to the CPUs we already have changes nothing, and the user's function runs
    WorkerAffinity(CPUS, user)(7)
    assert calls == [7] and tuple(sorted(os.sched_getaffinity(0))) == CPUS
    # loaders without workers are left alone
    plain = torch_data.DataLoader(ds, num_workers=0, worker_init_fn=user)
    install(plain, CPUS)
    assert plain.worker_init_fn is user


def test_numastat_read_from_a_sysfs_tree(tmp_path):
    from composer_numa.machine.sysfs import read_numastat

    for n, miss in ((0, 5), (1, 7)):
        d = tmp_path / "devices/system/node" / f"node{n}"
        d.mkdir(parents=True)
        (d / "numastat").write_text(f"numa_hit 100\nnuma_miss {miss}\nnuma_foreign 0\nother_node {miss * 2}\n")
    got = read_numastat(str(tmp_path))
    assert got[0]["numa_miss"] == 5 and got[1]["other_node"] == 14
    assert read_numastat(str(tmp_path / "missing")) == {}


def test_rank_plan_follows_the_device_the_trainer_uses():
    from composer_numa.binding.session import plan_for_device
    from composer_numa.plan import PlanOptions
    from tests.topo_factory import make_topology

    # two sockets, GPUs 0,1 on node 0 and 2,3 on node 1
    topo = make_topology(sockets=2, cores_per_node=4, gpus=[0, 0, 1, 1])
    node1 = topo.node(1).cpus
    options = PlanOptions(nproc=2)
    _, rp = plan_for_device(topo, options, 1, 1)  # Composer's default: local rank r drives cuda:r
    assert rp.gpu == 1 and rp.numa_nodes == (0,) and rp.local_rank == 1
    # device=DeviceGPU(device_id=3) on local rank 0: the plan of GPU 3 (node 1), for rank 0
    _, rp = plan_for_device(topo, options, 0, 3)
    assert rp.gpu == 3 and rp.numa_nodes == (1,) and rp.cpus == node1 and rp.local_rank == 0
    assert rp.gpu_pci_bus_id == topo.gpus[3].pci_bus_id
    # device='cpu' on the GPU host: CPU-only ranks spread over the nodes, no GPU named
    _, rp = plan_for_device(topo, options, 1, "cpu")
    assert rp.gpu is None and rp.gpu_pci_bus_id is None and rp.numa_nodes == (1,)


def test_device_of_reads_composers_device(monkeypatch):
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from composer.devices import DeviceCPU, DeviceGPU

    from composer_numa.composer.callback import _device_of

    assert _device_of(SimpleNamespace(device=DeviceCPU())) == "cpu"
    # DeviceGPU(device_id=2) makes cuda:2 the current device; its constructor needs CUDA, so stand in
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert _device_of(SimpleNamespace(device=DeviceGPU.__new__(DeviceGPU))) == 2
    assert _device_of(SimpleNamespace(device=object())) == "auto"


def test_importing_composer_numa_does_not_import_torch_or_composer():
    code = ("import sys, composer_numa; "
            "assert 'torch' not in sys.modules and 'composer' not in sys.modules; "
            "assert 'NumaAffinity' in composer_numa.__all__")
    subprocess.run([sys.executable, "-c", code], check=True, env=clean_env(), cwd=ROOT)


# ---------------------------------------------------------------------------------------------


_SCENARIOS = {"single": scenario_single, "adopt": scenario_adopt, "adopt_workers": scenario_adopt_workers,
              "bad_rank": scenario_bad_rank}

if __name__ == "__main__":
    _SCENARIOS[sys.argv[1]](sys.argv[2])
