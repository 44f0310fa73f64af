"""fork() with the extension in use: a child must work (new workers, locks a parent thread held
at the fork replaced) and never hang. Each case runs in a subprocess with a deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("composer_numa._C", reason="the C++ extension is not built")
pytest.importorskip("torch")


def _run(code: str, timeout: float = 600) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=timeout, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


_FORK_DURING_FORWARD = """
    import json, os, signal, threading, time
    import torch
    from composer_numa import NumaExperts
    from composer_numa.offload import runtime

    torch.set_num_threads(1)  # torch's own OpenMP pool is not what is tested here
    torch.manual_seed(0)
    # two slices on one node: every forward takes the layer's lock, routes, and runs the pool
    layer = NumaExperts(16, 256, 512, dtype=torch.float32, nodes=[0, 0], placement="split")
    x = torch.randn(192, 256)
    ids, w = NumaExperts.route(torch.randn(192, 16), 4)
    with torch.no_grad():
        ref = layer(x, ids, w)

    busy = threading.Event()
    stop = threading.Event()
    calls = [0]

    def hammer():
        with torch.no_grad():
            while not stop.is_set():
                busy.set()
                layer(x, ids, w)
                busy.clear()
                calls[0] += 1

    t = threading.Thread(target=hammer, daemon=True)
    t.start()
    while calls[0] < 2:
        time.sleep(0.001)
    results = []
    for i in range(10):
        time.sleep(0.003 * i)  # land at different points of a forward
        inside = busy.is_set()
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)  # a child that hangs dies instead of hanging the test
            with torch.no_grad():
                out = layer(x, ids, w)
                again = layer(x, ids, w)
            workers = runtime.pool().workers()
            os._exit(0 if torch.equal(out, ref) and torch.equal(again, ref) and len(workers) >= 1 else 3)
        deadline = time.monotonic() + 90
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                results.append([inside, os.waitstatus_to_exitcode(status)])
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                results.append([inside, "hung"])
                break
            time.sleep(0.005)
    stop.set()
    t.join()
    with torch.no_grad():
        parent_ok = torch.equal(layer(x, ids, w), ref)
    print(json.dumps({"results": results, "parent_ok": parent_ok}))
"""


def test_fork_while_another_thread_is_inside_forward_never_hangs_the_child():
    got = _run(_FORK_DURING_FORWARD)
    results = got["results"]
    assert got["parent_ok"]
    assert [code for _, code in results] == [0] * 10, results  # every child finished, right values
    # the forks really landed while the other thread was inside a forward
    assert sum(inside for inside, _ in results) >= 5, results


_FORK_DURING_STEP = """
    import json, os, signal, threading, time
    import torch
    from composer_numa import NumaAdamW
    from composer_numa.offload import runtime

    torch.set_num_threads(1)
    params = [torch.nn.Parameter(torch.randn(1 << 20)) for _ in range(4)]
    opt = NumaAdamW(params, lr=1e-3)
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            for p in params:
                p.grad.fill_(0.5)
            opt.step()

    for p in params:
        p.grad = torch.full_like(p, 0.5)
    t = threading.Thread(target=hammer, daemon=True)
    t.start()
    time.sleep(0.05)
    codes = []
    for i in range(5):
        time.sleep(0.002 * i)
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)
            q = torch.nn.Parameter(torch.ones(4096))
            o = NumaAdamW([q], lr=0.1, weight_decay=0.0)
            q.grad = torch.ones(4096)
            o.step()
            ok = bool((q.detach() < 1).all()) and runtime.pool().size >= 1
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
    stop.set()
    t.join()
    print(json.dumps({"codes": codes}))
"""


def test_fork_while_another_thread_steps_the_optimizer():
    assert _run(_FORK_DURING_STEP)["codes"] == [0] * 5


_DATALOADER = """
    import json
    import torch
    from torch.utils.data import DataLoader, Dataset
    from composer_numa import NumaExperts
    from composer_numa.offload import memory, runtime

    torch.manual_seed(0)
    layer = NumaExperts(8, 64, 96, dtype=torch.float32)
    x = torch.randn(32, 64)
    ids, w = NumaExperts.route(torch.randn(32, 8), 2)
    with torch.no_grad():
        ref = layer(x, ids, w)

    class Rows(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            buf = memory.zeros(4096, node=memory.default_node())  # node-local memory in the worker
            memory.zero_(buf)
            with torch.no_grad():
                out = layer(x[4 * i:4 * i + 4], ids[4 * i:4 * i + 4], w[4 * i:4 * i + 4])
            return out, i, runtime.pool().size

    loader = DataLoader(Rows(), batch_size=2, num_workers=2, persistent_workers=True,
                        multiprocessing_context="fork")
    ok, seen = True, 0
    for epoch in range(3):
        for out, idx, size in loader:
            for row, i in zip(out, idx.tolist()):
                ok &= torch.equal(row, ref[4 * i:4 * i + 4])
                seen += 1
            ok &= bool((size >= 1).all())
    print(json.dumps({"ok": bool(ok), "seen": seen}))
"""


def test_dataloader_workers_forked_and_persistent_use_the_layer_and_node_buffers():
    assert _run(_DATALOADER) == {"ok": True, "seen": 24}
