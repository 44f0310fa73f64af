"""NumaAdamW under what training jobs do to an optimizer: ``p.data`` replaced between steps
(weight loading, EMA swaps, pruning) and Ctrl-C arriving in the middle of ``step()``.

The SIGINT scenario runs in a subprocess (``python -m tests.offload.test_optim_robust sigint OUT``):
a timer thread sends SIGINT to the main thread again and again while it trains, and the state it
leaves is compared with ``torch.optim.AdamW`` here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
_C = pytest.importorskip("composer_numa._C", reason="the C++ extension is not built")

from composer_numa import NumaAdamW  # noqa: E402
from tests.offload.test_optim import HYPER, assert_same_trajectory, grads_for, make  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(7,), (64, 33), (17,), (1000,), (3, 5)]


def _in_buffer(opt, p):
    return any(b.param.data_ptr() <= p.data_ptr() < b.param.data_ptr() + b.numel * b.param.element_size()
               for b in opt._buffers)


def _pair(shapes, dtype=torch.float32, **kw):
    start = make(shapes, dtype)
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    ref = [torch.nn.Parameter(p.clone().float()) for p in start]
    return start, ours, ref, NumaAdamW(ours, **HYPER, **kw), torch.optim.AdamW(ref, **HYPER)


# ------------------------------------------------------- .data replacement --

@pytest.mark.parametrize("index", [0, 1, 3, 4], ids=["first", "second", "fourth", "last"])
@pytest.mark.parametrize("offload", [False, True], ids=["resident", "offload"])
def test_replaced_data_is_readopted_and_stepped_like_torch(index, offload):
    start, ours, ref, o, r = _pair(SHAPES, offload=offload)
    g = torch.Generator().manual_seed(5)
    for step in range(10):
        if step in (3, 7):  # e.g. weights loaded by assignment, an EMA swap
            t = torch.randn(SHAPES[index], generator=g)
            ours[index].data = t.clone()
            ref[index].data = t.clone()
        for p, q, grad in zip(ours, ref, grads_for(start, step), strict=True):
            p.grad, q.grad = grad.clone(), grad
        o.step(), r.step()
    for p, q in zip(ours, ref, strict=True):
        assert_same_trajectory(p, q, steps=10)
        assert torch.equal(o.state[p]["exp_avg"], r.state[q]["exp_avg"])
        assert torch.equal(o.state[p]["exp_avg_sq"], r.state[q]["exp_avg_sq"])
        assert float(o.state[p]["step"]) == float(r.state[q]["step"]) == 10.0
    if not offload:
        assert all(_in_buffer(o, p) for p in ours)  # trains on node-local memory again


def test_replacement_through_autograd_training_matches_torch():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    b = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    b.load_state_dict(a.state_dict())
    oa, ob = NumaAdamW(a.parameters(), **HYPER), torch.optim.AdamW(b.parameters(), **HYPER)
    for step in range(8):
        if step == 3:
            new = torch.randn(3, 16)
            a[2].weight.data = new.clone()
            b[2].weight.data = new.clone()
        x = torch.randn(16, 8)
        for model, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)
        # parameters differ by ulps, so the gradients autograd computes from them do too
        torch.testing.assert_close(oa.state[p]["exp_avg"], ob.state[q]["exp_avg"], rtol=1e-5, atol=1e-7)
        assert float(oa.state[p]["step"]) == float(ob.state[q]["step"]) == 8.0


def test_bf16_replacement_resyncs_the_master_weights():
    shapes = [(17,), (40,), (9, 9)]
    start, ours, ref, o, r = _pair(shapes, torch.bfloat16)
    for step in range(6):
        if step == 2:
            t = torch.randn(40).to(torch.bfloat16)
            ours[1].data = t.clone()
            ref[1].data = t.float()
        if step == 4:  # same values in new storage (module.to, a checkpoint round trip): keep the master
            kept = o.state[ours[0]]["master_param"].clone()
            ours[0].data = ours[0].data.clone()
        for p, q, grad in zip(ours, ref, grads_for(start, step), strict=True):
            p.grad, q.grad = grad.clone(), grad.float()
        if step == 4:
            o._ensure_layout()
            assert torch.equal(o.state[ours[0]]["master_param"], kept)
        o.step(), r.step()
    for p, q in zip(ours, ref, strict=True):
        assert_same_trajectory(o.state[p]["master_param"], q, steps=6)
        assert torch.equal(p.detach(), o.state[p]["master_param"].to(torch.bfloat16))


def test_replacement_with_another_size_resets_that_state_with_one_warning():
    start, ours, ref, o, _ = _pair(SHAPES)
    for p, grad in zip(ours, grads_for(start, 0), strict=True):
        p.grad = grad
    o.step()
    ours[2].data = torch.ones(5)  # pruned: 17 -> 5 elements
    ours[2].grad = torch.ones(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o.step()
    assert len([w for w in caught if "NumaAdamW" in str(w.message)]) == 1
    assert "17" in str(caught[0].message) and "5" in str(caught[0].message)
    st = o.state[ours[2]]
    assert float(st["step"]) == 1.0 and st["exp_avg"].shape == (5,)
    torch.testing.assert_close(st["exp_avg"], torch.full((5,), 0.1))  # one step from zero moments
    assert float(o.state[ours[0]]["step"]) == 2.0 and _in_buffer(o, ours[2])


def test_dtype_and_device_moves_are_still_relaid_out():
    start, ours, _, o, _ = _pair([(33,), (8,)])
    ours[1].data = ours[1].data.to(torch.bfloat16)
    for p, grad in zip(ours, grads_for(start, 0), strict=True):
        p.grad = grad.to(p.dtype)
    o.step()
    assert {b.param_dtype for b in o._buffers} == {torch.float32, torch.bfloat16}
    assert all(_in_buffer(o, p) for p in ours) and float(o.state[ours[1]]["step"]) == 1.0


# ------------------------------------------------------------------ SIGINT --

SIGINT_STEPS, SIGINT_MORE = 300, 20


def _sigint_scenario(out: str) -> None:
    """Train with SIGINT arriving at random moments; write the state reached."""
    import random
    import time

    torch.set_num_threads(1)
    shapes = [(257, 129), (4099,), (17,), (64, 65)]
    start = make(shapes)
    params = [torch.nn.Parameter(p.clone()) for p in start]
    opt = NumaAdamW(params, **HYPER)

    def count() -> int:
        return int(opt.state[params[0]]["step"])

    # one step's duration sets the signal spacing, so signals land everywhere in a step
    probe = [torch.nn.Parameter(p.clone()) for p in start]
    probe_opt = NumaAdamW(probe, **HYPER)
    for p, g in zip(probe, grads_for(start, 0), strict=True):
        p.grad = g
    t0 = time.perf_counter()
    for _ in range(5):
        probe_opt.step()
    duration = (time.perf_counter() - t0) / 5

    stop = threading.Event()
    sent = [0]
    main = threading.main_thread().ident
    rng = random.Random(0)

    def sender() -> None:
        while not stop.wait(rng.uniform(0.2, 2.0) * duration):
            signal.pthread_kill(main, signal.SIGINT)
            sent[0] += 1

    # KeyboardInterrupt as the default handler raises it, but only while the loop is ready for it
    # (armed just before step() and disarmed by the raise), so the test's own bookkeeping is never hit.
    armed, caught = [False], [0]

    def interrupt(signum, frame):
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    timer = threading.Thread(target=sender, daemon=True)
    timer.start()
    while count() < SIGINT_STEPS:
        try:
            for p, g in zip(params, grads_for(start, count()), strict=True):
                p.grad = g
            armed[0] = True
            opt.step()
            armed[0] = False
        except KeyboardInterrupt:
            caught[0] += 1
    stop.set()
    timer.join()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    snapshot = {
        "counts": [float(opt.state[p]["step"]) for p in params],
        "params": [p.detach().clone() for p in params],
        "exp_avg": [opt.state[p]["exp_avg"].clone() for p in params],
        "exp_avg_sq": [opt.state[p]["exp_avg_sq"].clone() for p in params],
    }
    for step in range(SIGINT_STEPS, SIGINT_STEPS + SIGINT_MORE):
        for p, g in zip(params, grads_for(start, step), strict=True):
            p.grad = g
        opt.step()
    torch.save({"shapes": shapes, "sent": sent[0], "caught": caught[0], "at_stop": snapshot,
                "final": [p.detach().clone() for p in params],
                "final_counts": [float(opt.state[p]["step"]) for p in params]}, out)


def _torch_reference(shapes, steps):
    start = make(shapes)
    ref = [torch.nn.Parameter(p.clone()) for p in start]
    opt = torch.optim.AdamW(ref, **HYPER)
    for step in range(steps):
        for q, g in zip(ref, grads_for(start, step), strict=True):
            q.grad = g
        opt.step()
    return ref, opt


@pytest.mark.slow
def test_sigint_during_steps_leaves_a_consistent_state(tmp_path):
    out = tmp_path / "sigint.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "tests.offload.test_optim_robust", "sigint", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(out)
    assert got["caught"] >= 20, f"only {got['caught']} of {got['sent']} signals interrupted a step"
    snap = got["at_stop"]
    assert snap["counts"] == [float(SIGINT_STEPS)] * len(got["shapes"])  # every slot advanced together
    ref, opt = _torch_reference(got["shapes"], SIGINT_STEPS)
    for k, q in enumerate(ref):
        st = opt.state[q]
        assert torch.equal(snap["exp_avg"][k], st["exp_avg"]), f"parameter {k}: first moment differs"
        assert torch.equal(snap["exp_avg_sq"][k], st["exp_avg_sq"]), f"parameter {k}: second moment differs"
        assert_same_trajectory(snap["params"][k], q, steps=SIGINT_STEPS)
    ref, _ = _torch_reference(got["shapes"], SIGINT_STEPS + SIGINT_MORE)
    assert got["final_counts"] == [float(SIGINT_STEPS + SIGINT_MORE)] * len(ref)
    for p, q in zip(got["final"], ref, strict=True):
        assert_same_trajectory(p, q, steps=SIGINT_STEPS + SIGINT_MORE)


class _SignalDuringUpdate:
    """The extension, except that SIGINT arrives while ``adamw_step`` runs."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def adamw_step(self, pool, jobs):
        signal.raise_signal(signal.SIGINT)
        return self._real.adamw_step(pool, jobs)


@pytest.mark.parametrize("handler", ["default", "user"])
def test_sigint_during_the_update_is_delivered_after_the_count(monkeypatch, handler):
    from composer_numa.offload import optim

    start, ours, ref, o, r = _pair([(33,), (7,)])
    for p, q, g in zip(ours, ref, grads_for(start, 0), strict=True):
        p.grad, q.grad = g.clone(), g
    r.step()
    calls = []
    mine = signal.default_int_handler if handler == "default" else (lambda s, f: calls.append(s))
    previous = signal.signal(signal.SIGINT, mine)
    real = optim.native()
    monkeypatch.setattr(optim, "native", lambda: _SignalDuringUpdate(real))
    try:
        if handler == "default":
            with pytest.raises(KeyboardInterrupt):
                o.step()
        else:
            o.step()
            assert calls == [signal.SIGINT]  # delivered once, after the step, to the user's handler
        assert signal.getsignal(signal.SIGINT) is mine  # the handler in force before is back
    finally:
        signal.signal(signal.SIGINT, previous)
    for p, q in zip(ours, ref, strict=True):  # the update and its count, both
        assert float(o.state[p]["step"]) == 1.0
        assert torch.equal(o.state[p]["exp_avg"], r.state[q]["exp_avg"])


def test_steps_outside_the_main_thread_run_without_touching_signals():
    start, ours, ref, o, r = _pair([(33,)])
    for p, g in zip(ours, grads_for(start, 0), strict=True):
        p.grad = g
    before = signal.getsignal(signal.SIGINT)
    worker = threading.Thread(target=o.step)
    worker.start()
    worker.join()
    assert signal.getsignal(signal.SIGINT) is before and float(o.state[ours[0]]["step"]) == 1.0


if __name__ == "__main__":
    if sys.argv[1] == "sigint":
        _sigint_scenario(sys.argv[2])
    else:
        raise SystemExit(f"unknown scenario {sys.argv[1]!r}")
