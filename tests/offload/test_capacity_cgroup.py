"""Two ranks allocating at once in one memory cgroup: the one that does not fit gets a MemoryError,
nobody is OOM-killed. Capacity is answered by composer_numa.machine.capacity under its
cross-process reservation, held from the check until the pages are faulted in.

Needs a writable cgroup v1 memory controller (a child group with memory.limit_in_bytes is
created and the two subprocesses move themselves into it); skipped with the reason otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("composer_numa._C", reason="the C++ extension is not built")
pytest.importorskip("torch")

LIMIT = 1536 << 20  # the test group's limit; room left after two interpreters with torch ~ 0.9 GiB


def _own_memory_cgroup() -> Path | None:
    base = Path("/sys/fs/cgroup/memory")
    if not (base / "memory.limit_in_bytes").exists():
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return base / path.lstrip("/")
    return base


@pytest.fixture
def cgroup():
    parent = _own_memory_cgroup()
    if parent is None:
        pytest.skip("no cgroup v1 memory controller at /sys/fs/cgroup/memory")
    group = parent / f"composer-numa-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(LIMIT))
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(LIMIT))  # no swapping out of the limit: over it is an OOM kill
    except OSError as e:
        if group.exists():
            group.rmdir()
        pytest.skip(f"the cgroup v1 memory controller is not writable here ({e})")
    yield group
    for _ in range(50):  # the children have exited; the kernel may need a moment to release the group
        try:
            group.rmdir()
            break
        except OSError:
            time.sleep(0.1)


_CHILD = """
    import os, sys, time, json
    from pathlib import Path
    group, work, index, what = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    (group / "cgroup.procs").write_text(str(os.getpid()))  # everything from here is charged to the group
    import torch
    from composer_numa.offload import memory, runtime
    torch.set_num_threads(1)
    runtime.pool()
    memory.empty(1 << 20, torch.uint8)  # warm: pool threads, lock files, the first mapping
    (work / f"ready{index}").write_text("")
    while not (work / "go").exists():
        time.sleep(0.01)
    nbytes = int((work / "go").read_text())
    result = {"index": index}
    try:
        if what == "empty":
            t = memory.empty(nbytes, torch.uint8)
            result["ok"] = memory.nodes_of(t).get(-1, 0) == 0  # every page faulted in
        else:  # NumaAdamW over fp32 parameters of nbytes: params, grads, moments on the node
            params = [torch.nn.Parameter(torch.randn(nbytes // 16)) for _ in range(4)]
            from composer_numa import NumaAdamW
            opt = NumaAdamW(params, lr=1e-3)
            for p in params:
                p.grad.fill_(1.0)  # the gradients are views of the optimizer's node-local buffer
            opt.step()
            result["ok"] = True
    except MemoryError as e:
        result["memory_error"] = str(e)
    print(json.dumps(result))
"""


def _two_ranks(group: Path, tmp_path: Path, what: str, fraction: float) -> tuple[list[dict], int]:
    code = textwrap.dedent(_CHILD)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(group), str(tmp_path), str(i), what],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "COMPOSER_NUMA_LOCK_DIR": str(tmp_path)})
             for i in range(2)]
    try:
        deadline = time.monotonic() + 300
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "the children did not get ready"
            time.sleep(0.05)
        nbytes = int(_room(group) * fraction)
        (tmp_path / "go").write_text(str(nbytes))
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], (codes, [err[-2000:] for _, err in outs])  # -9 would be the OOM killer
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs], nbytes


def _room(group: Path) -> int:
    """What the group still allows, counting its clean page cache as free (as capacity counts it)."""
    stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
    clean = int(stat["total_cache"]) - int(stat.get("total_dirty", 0)) - int(stat.get("total_writeback", 0))
    return LIMIT - int((group / "memory.usage_in_bytes").read_text()) + max(0, clean)


def _oom_kills(group: Path) -> int:
    for line in (group / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


def test_two_ranks_each_asking_for_60_percent_of_the_room_one_memory_error_no_oom_kill(cgroup, tmp_path):
    results, nbytes = _two_ranks(cgroup, tmp_path, "empty", 0.6)
    assert sorted("memory_error" in r for r in results) == [False, True], results
    winner = next(r for r in results if "memory_error" not in r)
    loser = next(r for r in results if "memory_error" in r)
    assert winner["ok"]
    msg = loser["memory_error"]
    assert "\n" not in msg and "the memory cgroup allows only" in msg, msg
    assert _oom_kills(cgroup) == 0


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="under AddressSanitizer, torch's freed tensors sit in ASan's quarantine and its "
                           "shadow memory is charged to the group: memory no capacity check can see")
def test_two_ranks_building_numa_adamw_in_one_cgroup(cgroup, tmp_path):
    # each rank: parameters of 12 % of the room, then 4 buffers of that size (param, grad, moments),
    # checked as one request: one rank fits (60 % at its peak), the second's 48 % no longer does
    results, nbytes = _two_ranks(cgroup, tmp_path, "adamw", 0.12)
    assert sorted("memory_error" in r for r in results) == [False, True], results
    loser = next(r for r in results if "memory_error" in r)
    assert "the memory cgroup allows only" in loser["memory_error"], loser
    assert _oom_kills(cgroup) == 0
