"""NumaAdamW and the fused kernel against torch.optim.AdamW: numerics, SIMD
paths and thread counts, gradient semantics, state dicts, the offload
pipeline, bad input, and a Composer training run."""

from __future__ import annotations

import copy
import io
import json

import pytest

torch = pytest.importorskip("torch")
_C = pytest.importorskip("composer_numa._C", reason="the C++ extension is not built")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from composer_numa import NumaAdamW, memory  # noqa: E402
from composer_numa.offload import runtime  # noqa: E402
from composer_numa.offload.optim import fused_adamw_  # noqa: E402

SHAPES = [(1,), (0,), (7,), (15,), (16,), (17,), (31, 3), (64, 33), (5, 0, 2), (1000,), (4099,)]
HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
EPS32 = torch.finfo(torch.float32).eps


def assert_same_trajectory(ours, theirs, *, steps, lr=HYPER["lr"]):
    """Two fp32 AdamW runs from the same start agree to a few ulps per step.

    Each step rounds a handful of times on values no larger than the parameter or the step size
    (``|m / sqrt(v)| <= ~1``, so an update is about ``lr``); torch's vectorised ``sqrt`` and
    division are not correctly rounded, and CPUs differ in which of those ulps they lose. So the
    bound is 4 ulps of ``max(|p|, lr)`` per step, with no dependence on one CPU's rounding.
    """
    a, b = ours.detach().double(), theirs.detach().double()
    if a.numel() == 0:
        return
    scale = max(float(a.abs().max()), float(b.abs().max()), lr)
    tol = 4 * steps * EPS32 * scale
    worst = float((a - b).abs().max())
    assert worst <= tol, f"differ by {worst:.3g}, more than {4 * steps} ulps of {scale:.3g} ({tol:.3g})"


def assert_as_accurate_as_torch(ours, theirs, reference):
    """Our fp32 result is as close to the float64 reference as torch's fp32 result is:
    at most twice torch's worst error, plus two ulps of the largest value."""
    ref = reference.detach().double()
    if ref.numel() == 0:
        return
    ours_err = float((ours.detach().double() - ref).abs().max())
    torch_err = float((theirs.detach().double() - ref).abs().max())
    tol = 2 * torch_err + 2 * EPS32 * float(ref.abs().max())
    assert ours_err <= tol, f"error {ours_err:.3g} vs float64, torch's fp32 error {torch_err:.3g}"


def reference64(shapes, steps, hyper, dtype=torch.float32, grad_scale=None):
    """torch.optim.AdamW in float64 on the same start and the same (fp32) gradients."""
    start = make(shapes, dtype)
    ref = [torch.nn.Parameter(p.clone().double()) for p in start]
    opt = torch.optim.AdamW(ref, **{**HYPER, **(hyper or {})})
    for step in range(steps):
        for q, g in zip(ref, grads_for(start, step, dtype), strict=True):
            q.grad = g.double() * (grad_scale or 1.0)
        opt.step()
    return ref


@pytest.fixture(autouse=True)
def default_pool(monkeypatch):
    monkeypatch.delenv("COMPOSER_NUMA_SIMD", raising=False)
    runtime.reset()
    yield
    runtime.reset()


def make(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def grads_for(params, step, dtype=None, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(p.shape, generator=g).to(dtype or p.dtype) for p in params]


def run_pair(shapes, steps=50, ours_kw=None, torch_kw=None, dtype=torch.float32, ref_dtype=None,
             grad_scale=None):
    """Step NumaAdamW and torch.optim.AdamW (on ref_dtype copies) with the same grads."""
    start = make(shapes, dtype)
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    ref = [torch.nn.Parameter(p.clone().to(ref_dtype or dtype)) for p in start]
    o = NumaAdamW(ours, **{**HYPER, **(ours_kw or {})})
    r = torch.optim.AdamW(ref, **{**HYPER, **(torch_kw or {})})
    for step in range(steps):
        gs = grads_for(start, step, dtype)
        for p, q, g in zip(ours, ref, gs, strict=True):
            p.grad = g.clone()
            q.grad = g.to(q.dtype) * (grad_scale or 1.0)
        o.step(grad_scale=grad_scale)
        r.step()
    return o, r, ours, ref


# ---------------------------------------------------------------- numerics --

@pytest.mark.arm64
def test_fp32_matches_torch_adamw_over_50_steps_on_many_shapes():
    o, r, ours, ref = run_pair(SHAPES)
    exact = reference64(SHAPES, 50, None)
    for p, q, x in zip(ours, ref, exact, strict=True):
        assert_same_trajectory(p, q, steps=50)
        assert_as_accurate_as_torch(p, q, x)
        so, sr = o.state[p], r.state[q]
        assert torch.equal(so["exp_avg"], sr["exp_avg"]) and torch.equal(so["exp_avg_sq"], sr["exp_avg_sq"])
        assert float(so["step"]) == float(sr["step"]) == 50.0


@pytest.mark.arm64
def test_moments_are_bit_identical_to_torch():
    # torch's lerp and addcmul use one fused multiply-add each; so do we.
    o, r, ours, ref = run_pair([(4099,), (17,)], steps=10)
    for p, q in zip(ours, ref, strict=True):
        assert torch.equal(o.state[p]["exp_avg"], r.state[q]["exp_avg"])
        assert torch.equal(o.state[p]["exp_avg_sq"], r.state[q]["exp_avg_sq"])


@pytest.mark.arm64
@pytest.mark.parametrize("hyper", [
    dict(maximize=True),
    dict(weight_decay=0.0),
    dict(betas=(0.3, 0.5)),  # lerp weight >= 0.5 takes torch's other formula
    dict(eps=1e-3, lr=0.5),
])
def test_hyperparameter_variants_match(hyper):
    o, r, ours, ref = run_pair([(33,), (100, 3)], steps=20, ours_kw=hyper, torch_kw=hyper)
    exact = reference64([(33,), (100, 3)], 20, hyper)
    for p, q, x in zip(ours, ref, exact, strict=True):
        assert_same_trajectory(p, q, steps=20, lr=hyper.get("lr", HYPER["lr"]))
        assert_as_accurate_as_torch(p, q, x)


def test_grad_scale_multiplies_gradients_without_touching_them():
    o, r, ours, ref = run_pair([(257,)], steps=10, grad_scale=0.25)
    assert_same_trajectory(ours[0], ref[0], steps=10)
    assert_as_accurate_as_torch(ours[0], ref[0], reference64([(257,)], 10, None, grad_scale=0.25)[0])


def test_param_groups_with_own_hyperparameters_and_a_scheduler():
    start = make([(40,), (41,), (5, 5)])
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    ref = [torch.nn.Parameter(p.clone()) for p in start]

    def groups(ps):
        return [{"params": ps[:1], "lr": 0.05, "weight_decay": 0.0},
                {"params": ps[1:], "betas": (0.8, 0.99), "maximize": True}]

    o, r = NumaAdamW(groups(ours), lr=1e-2), torch.optim.AdamW(groups(ref), lr=1e-2)
    so = torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)
    sr = torch.optim.lr_scheduler.StepLR(r, step_size=3, gamma=0.5)
    for step in range(12):
        for p, q, g in zip(ours, ref, grads_for(start, step), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        o.step(), r.step(), so.step(), sr.step()
    assert o.param_groups[0]["lr"] == r.param_groups[0]["lr"] < 0.05
    for p, q in zip(ours, ref, strict=True):
        assert_same_trajectory(p, q, steps=12, lr=0.05)


@pytest.mark.arm64
def test_bf16_params_with_fp32_master_match_fp32_adamw_within_bf16_rounding():
    shapes = [(17,), (1000,), (31, 7)]
    start = [p.to(torch.bfloat16) for p in make(shapes)]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    ref = [torch.nn.Parameter(p.float()) for p in start]  # fp32 AdamW on the same start
    o, r = NumaAdamW(ours, **HYPER), torch.optim.AdamW(ref, **HYPER)
    for step in range(50):
        for p, q, g in zip(ours, ref, grads_for(start, step), strict=True):
            p.grad, q.grad = g.clone(), g.float()
        o.step(), r.step()
    for p, q in zip(ours, ref, strict=True):
        master = o.state[p]["master_param"]
        assert master.dtype == torch.float32 and o.state[p]["exp_avg"].dtype == torch.float32
        assert_same_trajectory(master, q, steps=50)
        assert torch.equal(p.detach(), master.to(torch.bfloat16))  # round-to-nearest-even copy
        torch.testing.assert_close(p.detach().float(), q.detach(), rtol=2**-8, atol=1e-6)


def _emulate_bf16_states(start, steps, h):
    """fp32 math, moments rounded to bf16 after every step (what state_dtype=bf16 does)."""
    p = [x.clone() for x in start]
    m = [torch.zeros_like(x, dtype=torch.bfloat16) for x in start]
    v = [torch.zeros_like(x, dtype=torch.bfloat16) for x in start]
    b1, b2 = h["betas"]
    for step in range(steps):
        for i, g in enumerate(grads_for(start, step)):
            t = step + 1
            p[i].mul_(1 - h["lr"] * h["weight_decay"])
            mf = m[i].float().lerp_(g, 1 - b1)
            vf = v[i].float().mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (vf.sqrt() / (1 - b2**t) ** 0.5).add_(h["eps"])
            p[i].addcdiv_(mf, denom, value=-h["lr"] / (1 - b1**t))
            m[i], v[i] = mf.to(torch.bfloat16), vf.to(torch.bfloat16)
    return p, m, v


@pytest.mark.arm64
def test_bf16_state_dtype():
    shapes = [(33,), (500,)]
    start = make(shapes)
    ours = [torch.nn.Parameter(x.clone()) for x in start]
    o = NumaAdamW(ours, state_dtype=torch.bfloat16, **HYPER)
    for step in range(20):
        for p, g in zip(ours, grads_for(start, step), strict=True):
            p.grad = g
        o.step()
    p_ref, m_ref, v_ref = _emulate_bf16_states(start, 20, HYPER)
    for i, p in enumerate(ours):
        assert o.state[p]["exp_avg"].dtype == torch.bfloat16
        torch.testing.assert_close(p.detach(), p_ref[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(o.state[p]["exp_avg"].float(), m_ref[i].float(),
                                   rtol=2**-7, atol=1e-6)
        torch.testing.assert_close(o.state[p]["exp_avg_sq"].float(), v_ref[i].float(),
                                   rtol=2**-7, atol=1e-8)


@pytest.mark.arm64
def test_bf16_rounding_is_round_to_nearest_even_like_torch():
    x = torch.tensor([1.0, 1.00390625, 1.01171875, -2.5e-40, 3.0e38, 3.4e38, float("inf"),
                      -float("inf"), 1.0 + 2**-8 + 2**-20, 1.0 + 2**-8, -(1.0 + 3 * 2**-8)])
    torch_bits = (x.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF).tolist()
    assert [_C.float_to_bf16(float(v)) for v in x] == torch_bits  # ties to even, denormals kept
    nan = _C.float_to_bf16(float("nan"))  # torch itself uses 0x7fc0 (scalar) or 0xffff (vector)
    assert nan & 0x7F80 == 0x7F80 and nan & 0x007F


# ------------------------------------------- SIMD paths and thread counts --

def _trajectory(simd, threads, monkeypatch, **kw):
    monkeypatch.setenv("COMPOSER_NUMA_SIMD", simd)
    runtime.reset(threads=threads)
    assert _C.simd_path() == {"avx512": 2, "avx2": 1, "neon": 3, "scalar": 0}[simd] or simd != _C.simd_level()
    start = make(SHAPES, kw.pop("dtype", torch.float32))
    ps = [torch.nn.Parameter(p.clone()) for p in start]
    o = NumaAdamW(ps, **HYPER, **kw)
    for step in range(15):
        for p, g in zip(ps, grads_for(start, step), strict=True):
            p.grad = g
        o.step()
    out = [p.detach().clone() for p in ps]
    for p in ps:
        out += [t.clone() for k, t in o.state[p].items() if k != "step"]
    return out


@pytest.mark.arm64
@pytest.mark.parametrize("kw", [dict(), dict(dtype=torch.bfloat16), dict(state_dtype=torch.bfloat16),
                                dict(dtype=torch.bfloat16, master_weights=False),
                                dict(dtype=torch.bfloat16, master_weights=False, state_dtype=torch.bfloat16)],
                         ids=["fp32", "bf16-master", "bf16-states", "bf16-no-master", "bf16-all"])
def test_every_simd_path_and_thread_count_gives_identical_bits(kw, monkeypatch):
    levels = ["scalar"]
    feats = _C.cpu_features()
    if feats["avx2"] and feats["fma"]:
        levels.append("avx2")
    if feats["avx512f"] and feats["avx512bw"] and feats["avx512vl"]:
        levels.append("avx512")
    if feats["asimd"]:
        levels.append("neon")
    assert levels[-1] == _C.simd_level()  # the widest path is among those compared
    reference = None
    for simd in levels:
        for threads in (1, 2, 7):
            got = _trajectory(simd, threads, monkeypatch, **dict(kw))
            if reference is None:
                reference = got
                continue
            for a, b in zip(reference, got, strict=True):
                assert torch.equal(a.view(torch.uint8) if a.numel() else a,
                                   b.view(torch.uint8) if b.numel() else b), (simd, threads)


@pytest.mark.parametrize("kw", [dict(), dict(dtype=torch.bfloat16, master_weights=False, state_dtype=torch.bfloat16)],
                         ids=["fp32", "bf16-all"])
def test_software_prefetch_choice_never_changes_a_bit(kw, monkeypatch):
    # Intel gets software prefetches, AMD only with bf16 streams (_C.adamw_prefetch()); both
    # kinds of loop must give the bits of the scalar path.
    feats = _C.cpu_features()
    best = "avx512" if feats["avx512f"] and feats["avx512bw"] and feats["avx512vl"] else "avx2"
    if not (feats["avx2"] and feats["fma"]):
        pytest.skip("no x86 SIMD path on this CPU")
    reference = _trajectory("scalar", 1, monkeypatch, **dict(kw))
    for pf in ("0", "1"):
        monkeypatch.setenv("COMPOSER_NUMA_ADAMW_PREFETCH", pf)
        assert _C.adamw_prefetch() == _C.adamw_prefetch(False) == (pf == "1")
        got = _trajectory(best, 2, monkeypatch, **dict(kw))
        for a, b in zip(reference, got, strict=True):
            assert torch.equal(a.view(torch.uint8) if a.numel() else a,
                               b.view(torch.uint8) if b.numel() else b), pf
    monkeypatch.delenv("COMPOSER_NUMA_ADAMW_PREFETCH")
    assert _C.adamw_prefetch() == (not feats["amd"]) and _C.adamw_prefetch(False)


@pytest.mark.arm64
def test_env_switch_caps_the_simd_path(monkeypatch):
    monkeypatch.setenv("COMPOSER_NUMA_SIMD", "scalar")
    assert _C.simd_path() == 0 and _C.simd_level() == "scalar"
    if _C.cpu_features()["asimd"]:
        monkeypatch.setenv("COMPOSER_NUMA_SIMD", "neon")
        assert _C.simd_path() == 3 and _C.simd_level() == "neon"
        return
    monkeypatch.setenv("COMPOSER_NUMA_SIMD", "avx2")
    assert _C.simd_path() <= 1


# ------------------------------------------------------ buffers and grads --

def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def test_params_and_grads_are_views_of_node_local_flat_buffers():
    model = _mlp()
    opt = NumaAdamW(model.parameters())
    model(torch.randn(4, 8)).sum().backward()
    (buf,) = opt._buffers
    lo = buf.param.data_ptr()
    hi = lo + buf.param.numel() * 4
    glo = buf.grad.data_ptr()
    for p in model.parameters():
        assert lo <= p.data_ptr() < hi
        assert glo <= p.grad.data_ptr() < glo + buf.grad.numel() * 4
    node = memory.default_node()
    assert memory.nodes_of(buf.param).keys() == {node}
    assert memory.policy_of(buf.exp_avg) == ("bind", [node])
    (info,) = opt.placement()
    assert info["node"] == node and set(info["pages_per_node"]) == {node}
    g_before = [p.grad for p in model.parameters()]
    opt.step()
    opt.zero_grad()
    assert all(p.grad is g for p, g in zip(model.parameters(), g_before, strict=True))
    assert all(not p.grad.any() for p in model.parameters())


def test_training_loop_with_autograd_matches_torch_including_unused_params():
    torch.manual_seed(0)
    a, b = _mlp(), _mlp()
    extra_a = torch.nn.Linear(8, 3)  # used only on even steps
    extra_b = copy.deepcopy(extra_a)
    oa = NumaAdamW(list(a.parameters()) + list(extra_a.parameters()), lr=1e-2)
    ob = torch.optim.AdamW(list(b.parameters()) + list(extra_b.parameters()), lr=1e-2)
    for step in range(12):
        x = torch.randn(16, 8)
        for model, extra, opt in ((a, extra_a, oa), (b, extra_b, ob)):
            opt.zero_grad()
            out = model(x)
            if step % 2 == 0:
                out = out + extra(x)
            out.square().mean().backward()
            opt.step()
    for p, q in zip(list(a.parameters()) + list(extra_a.parameters()),
                    list(b.parameters()) + list(extra_b.parameters()), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)
        assert float(oa.state[p]["step"]) == float(ob.state[q]["step"])
    assert float(oa.state[extra_a.weight]["step"]) == 6.0


def test_gradient_accumulation_over_microbatches():
    a, b = _mlp(), _mlp()
    oa, ob = NumaAdamW(a.parameters()), torch.optim.AdamW(b.parameters())
    for _ in range(3):
        oa.zero_grad(), ob.zero_grad()
        for _ in range(4):
            x = torch.randn(8, 8)
            a(x).sum().backward()
            b(x).sum().backward()
        oa.step(), ob.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)


def test_model_zero_grad_set_to_none_is_recovered_at_step():
    a, b = _mlp(), _mlp()
    oa, ob = NumaAdamW(a.parameters()), torch.optim.AdamW(b.parameters())
    for _ in range(3):
        a.zero_grad(set_to_none=True)  # replaces the views with None
        b.zero_grad(set_to_none=True)
        x = torch.randn(8, 8)
        a(x).sum().backward()
        b(x).sum().backward()
        oa.step(), ob.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)
    assert all(p.grad is s.grad for p, s in zip(a.parameters(), oa._slots, strict=True))


@pytest.mark.arm64
def test_nan_gradient_propagates_like_torch():
    start = make([(40,)])
    p, q = torch.nn.Parameter(start[0].clone()), torch.nn.Parameter(start[0].clone())
    o, r = NumaAdamW([p], **HYPER), torch.optim.AdamW([q], **HYPER)
    g = torch.randn(40)
    g[[3, 17]] = float("nan")
    p.grad, q.grad = g.clone(), g.clone()
    o.step(), r.step()
    assert torch.equal(torch.isnan(p.detach()), torch.isnan(q.detach()))
    assert torch.isnan(p.detach()).sum() == 2
    finite = ~torch.isnan(q.detach())
    assert_same_trajectory(p.detach()[finite], q.detach()[finite], steps=1)


# ------------------------------------------------------------ state dicts --

def _continue(opt, params, start, steps, offset):
    for step in range(offset, offset + steps):
        for p, g in zip(params, grads_for(start, step), strict=True):
            p.grad = g.clone()
        opt.step()


def test_state_dict_loads_into_torch_adamw_and_training_continues_identically():
    shapes = [(33,), (7, 9)]
    start = make(shapes)
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    o = NumaAdamW(ours, **HYPER)
    _continue(o, ours, start, 5, 0)
    buf = io.BytesIO()
    torch.save(o.state_dict(), buf)
    buf.seek(0)
    clone = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    t = torch.optim.AdamW(clone, lr=123.0)
    t.load_state_dict(torch.load(buf))
    assert t.param_groups[0]["lr"] == HYPER["lr"]
    _continue(o, ours, start, 5, 5)
    _continue(t, clone, start, 5, 5)
    for p, q in zip(ours, clone, strict=True):
        assert_same_trajectory(p, q, steps=10)


def test_torch_adamw_state_dict_loads_into_numa_adamw():
    shapes = [(33,), (7, 9)]
    start = make(shapes)
    ref = [torch.nn.Parameter(p.clone()) for p in start]
    t = torch.optim.AdamW(ref, **HYPER)
    _continue(t, ref, start, 5, 0)
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    o = NumaAdamW(ours, lr=0.5)
    o.load_state_dict(copy.deepcopy(t.state_dict()))
    assert o.param_groups[0]["lr"] == HYPER["lr"]
    assert float(o.state[ours[0]]["step"]) == 5.0
    _continue(o, ours, start, 5, 5)
    _continue(t, ref, start, 5, 5)
    for p, q in zip(ours, ref, strict=True):
        assert_same_trajectory(p, q, steps=10)


def test_bf16_master_weights_survive_a_round_trip():
    start = [p.to(torch.bfloat16) for p in make([(64,)])]
    a = [torch.nn.Parameter(start[0].clone())]
    oa = NumaAdamW(a, **HYPER)
    _continue(oa, a, start, 3, 0)
    sd = copy.deepcopy(oa.state_dict())
    b = [torch.nn.Parameter(a[0].detach().clone())]
    ob = NumaAdamW(b, **HYPER)
    ob.load_state_dict(sd)
    assert torch.equal(ob.state[b[0]]["master_param"], oa.state[a[0]]["master_param"])
    _continue(oa, a, start, 3, 3)
    _continue(ob, b, start, 3, 3)
    assert torch.equal(a[0].detach(), b[0].detach())


def test_load_state_dict_rejects_mismatched_layouts():
    o = NumaAdamW([torch.nn.Parameter(torch.ones(3))])
    other = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="parameters"):
        o.load_state_dict(other.state_dict())
    bad = torch.optim.AdamW([torch.nn.Parameter(torch.ones(4))])
    bad.state[bad.param_groups[0]["params"][0]] = {
        "step": torch.tensor(1.0), "exp_avg": torch.zeros(4), "exp_avg_sq": torch.zeros(4)}
    with pytest.raises(ValueError, match="elements"):
        o.load_state_dict(bad.state_dict())


def test_add_param_group_keeps_existing_state():
    start = make([(10,), (6,)])
    p0, p1 = (torch.nn.Parameter(x.clone()) for x in start)
    q0, q1 = (torch.nn.Parameter(x.clone()) for x in start)
    o, r = NumaAdamW([p0], **HYPER), torch.optim.AdamW([q0], **HYPER)
    _continue(o, [p0], start[:1], 3, 0)
    _continue(r, [q0], start[:1], 3, 0)
    o.add_param_group({"params": [p1], "lr": 0.05})
    r.add_param_group({"params": [q1], "lr": 0.05})
    _continue(o, [p0, p1], start, 3, 3)
    _continue(r, [q0, q1], start, 3, 3)
    for p, q in ((p0, q0), (p1, q1)):
        assert_same_trajectory(p, q, steps=6, lr=0.05)


# ------------------------------------------------------------ offload -----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("during_backward", [False, True])
def test_offload_bucket_pipeline_with_cpu_stand_in_tensors(dtype, during_backward):
    """offload=True on CPU tensors runs the GPU path's buckets with synchronous copies."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).to(dtype)
    b = copy.deepcopy(a).float()
    ptrs = [p.data_ptr() for p in a.parameters()]
    oa = NumaAdamW(a.parameters(), offload=True, bucket_bytes=512,
                   copy_during_backward=during_backward, **HYPER)
    ob = torch.optim.AdamW(b.parameters(), **HYPER)
    assert len(oa._units) >= 3  # really several buckets
    for _ in range(6):
        x = torch.randn(16, 32)
        for model, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            model(x.to(next(model.parameters()).dtype)).float().square().mean().backward()
        if dtype == torch.bfloat16:  # same gradients for both, so only the update is compared
            for p, q in zip(a.parameters(), b.parameters(), strict=True):
                q.grad = p.grad.float()
        oa.step(), ob.step()
    assert [p.data_ptr() for p in a.parameters()] == ptrs  # "device" params stay put
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        if dtype == torch.float32:
            assert_same_trajectory(p, q, steps=6)
        else:
            assert_same_trajectory(oa.state[p]["master_param"], q, steps=6)
            assert torch.equal(p.detach(), oa.state[p]["master_param"].to(torch.bfloat16))


def _two_microbatches(copy_during_backward, scale_after_backward):
    torch.manual_seed(0)
    a = torch.nn.Linear(16, 16)
    b = copy.deepcopy(a)
    oa = NumaAdamW(a.parameters(), offload=True, copy_during_backward=copy_during_backward)
    ob = torch.optim.AdamW(b.parameters())
    for model in (a, b):
        model(torch.ones(2, 16)).sum().backward()
        model(torch.full((2, 16), 2.0)).sum().backward()  # accumulates after the first copy
        if scale_after_backward:
            with torch.no_grad():
                model.weight.grad.sub_(10.0)  # flips the sign: Adam's first step is sign(grad)
    oa.step(), ob.step()
    return a, b


def test_offload_prefetch_is_redone_after_each_accumulation():
    a, b = _two_microbatches(copy_during_backward=True, scale_after_backward=False)
    assert_same_trajectory(a.weight, b.weight, steps=1)
    assert_same_trajectory(a.bias, b.bias, steps=1)


def test_offload_prefetch_does_not_see_gradients_changed_after_backward():
    # documented: with copy_during_backward, change gradients through step(grad_scale=...) only
    a, b = _two_microbatches(copy_during_backward=True, scale_after_backward=True)
    assert not torch.allclose(a.weight.detach(), b.weight.detach(), rtol=1e-6, atol=0)
    a, b = _two_microbatches(copy_during_backward=False, scale_after_backward=True)
    assert_same_trajectory(a.weight, b.weight, steps=1)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_offload_matches_torch(dtype):
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(),
                            torch.nn.Linear(512, 256)).cuda().to(dtype)
    b = copy.deepcopy(a).float()
    oa = NumaAdamW(a.parameters(), bucket_bytes=64 << 10, **HYPER)
    ob = torch.optim.AdamW(b.parameters(), **HYPER)
    assert oa._offload and all(buf.exp_avg.is_pinned() for buf in oa._buffers)
    for _ in range(5):
        x = torch.randn(32, 256, device="cuda")
        for model, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            model(x.to(dtype)).float().square().mean().backward()
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            q.grad = p.grad.float()
        oa.step(), ob.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        if dtype == torch.float32:
            assert_same_trajectory(p, q, steps=5)
        else:  # the bf16 parameter is the fp32 master rounded once more: half a bf16 ulp
            torch.testing.assert_close(p.detach().float(), q.detach(), rtol=2**-8, atol=0.0)


# ------------------------------------------------------------ bad input ---

def test_constructor_rejects_what_it_cannot_do():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="amsgrad"):
        NumaAdamW([p], amsgrad=True)
    with pytest.raises(ValueError, match="learning rate"):
        NumaAdamW([p], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        NumaAdamW([p], betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="float16"):
        NumaAdamW([torch.nn.Parameter(torch.ones(3, dtype=torch.float16))])
    with pytest.raises(TypeError, match="state_dtype"):
        NumaAdamW([p], state_dtype=torch.float16)
    with pytest.raises(ValueError, match="one device"):
        NumaAdamW([p, torch.nn.Parameter(torch.ones(3, device="meta"))])
    with pytest.raises(ValueError, match="CPU and CUDA"):
        NumaAdamW([torch.nn.Parameter(torch.ones(3, device="meta"))])
    with pytest.raises(ValueError, match="does not exist"):
        NumaAdamW([p], nodes=[1000])


def test_step_rejects_a_gradient_of_the_wrong_shape_or_sparse():
    p = torch.nn.Parameter(torch.ones(4, 4))
    o = NumaAdamW([p])
    p.grad = torch.ones(4, 4)
    o.step()
    o.zero_grad()
    with torch.no_grad():
        p.grad = torch.ones(4, 4).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        o.step()


@pytest.mark.parametrize("bad,exc,text", [
    (dict(grad=torch.ones(5, dtype=torch.float16)), TypeError, "grad has dtype torch.float16"),
    (dict(exp_avg=torch.zeros(5, dtype=torch.bfloat16)), TypeError, "differ"),
    (dict(grad=torch.ones(10)[::2]), ValueError, "contiguous"),
    (dict(grad=torch.ones(6)), ValueError, "shape"),
    (dict(param=torch.ones(5, device="meta")), ValueError, "meta"),
    (dict(master=torch.ones(5, dtype=torch.bfloat16)), TypeError, "master must be float32"),
    (dict(grad=[1.0] * 5), TypeError, "torch.Tensor"),
    (dict(step=0), ValueError, "step"),
    (dict(step=2**63), ValueError, "step must be an int from 1 to 2\\*\\*63 - 1"),
    (dict(lr=-1.0), ValueError, "learning rate"),
])
def test_fused_adamw_bad_input_is_a_clear_error(bad, exc, text):
    args = dict(param=torch.ones(5), grad=torch.ones(5), exp_avg=torch.zeros(5),
                exp_avg_sq=torch.zeros(5), step=1)
    args.update(bad)
    with pytest.raises(exc, match=text):
        fused_adamw_(**args)


@pytest.mark.parametrize("job_fix,text", [
    ({2: torch.ones(10)[::2]}, "grad must be contiguous"),
    ({2: torch.ones(6)}, "grad has 6 elements"),
    ({1: torch.ones(5, dtype=torch.float64)}, "param has dtype float64"),
    ({4: torch.zeros(5, dtype=torch.bfloat16)}, "same dtype"),
    ({5: torch.ones(5, dtype=torch.bfloat16)}, "master weights must be float32"),
    ({11: 0}, "step must be >= 1"),
])
def test_native_kernel_validates_its_tensors(job_fix, text):
    job = [-1, torch.ones(5), torch.ones(5), torch.zeros(5), torch.zeros(5), None,
           1e-3, 0.9, 0.999, 1e-8, 0.0, 1, 1.0, False]
    for k, v in job_fix.items():
        job[k] = v
    with pytest.raises(ValueError, match=text):
        _C.adamw_step(runtime.pool(), [tuple(job)])


_FLOATS = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.lists(st.integers(0, 9), min_size=0, max_size=3),
       dtypes=st.tuples(_FLOATS, _FLOATS, _FLOATS, _FLOATS),
       other_shape=st.booleans(), transpose=st.booleans(), with_master=st.booleans())
def test_fused_adamw_never_crashes(shape, dtypes, other_shape, transpose, with_master):
    def t(dt, s=tuple(shape)):
        return torch.ones(s, dtype=dt) if dt != torch.int32 else torch.ones(s, dtype=dt)
    param, grad, m, v = (t(d) for d in dtypes)
    if other_shape:
        grad = t(dtypes[1], tuple(shape) + (2,))
    if transpose and param.dim() >= 2:
        param = param.transpose(0, 1)
    master = torch.ones(param.shape) if with_master else None
    try:
        fused_adamw_(param, grad, m, v, step=1, master=master)
    except (TypeError, ValueError):
        return
    # accepted: it must really be a supported combination, and the update must be finite
    assert {param.dtype, grad.dtype} <= {torch.float32, torch.bfloat16}
    assert m.dtype == v.dtype and m.dtype in (torch.float32, torch.bfloat16)
    assert param.is_contiguous() and grad.shape == param.shape
    assert torch.isfinite(param.float()).all()


# ------------------------------------------------------------ Composer ----

@pytest.mark.slow
def test_composer_trainer_trains_the_example_model_to_the_same_loss():
    import contextlib
    import pathlib
    import sys

    examples = pathlib.Path(__file__).resolve().parents[2] / "examples"
    sys.path.insert(0, str(examples))
    try:
        import train  # examples/train.py
    finally:
        sys.path.remove(str(examples))
    losses = {}
    for name in ("adamw", "numa-adamw"):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert train.main(["--steps", "12", "--device", "cpu", "--no-callback",
                               "--optimizer", name]) == 0
        lines = [x for x in out.getvalue().splitlines() if x.startswith("composer-numa-example ")]
        report = json.loads(lines[-1].split(" ", 1)[1])
        assert report["batches"] == 12
        losses[name] = report["loss"]
    assert losses["adamw"] == pytest.approx(losses["numa-adamw"], rel=1e-4, abs=1e-6)


def test_mixed_dtypes_and_groups_use_several_buffers_and_still_match():
    start = make([(40,), (17,), (9, 9), (33,)])
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]
    ours = [torch.nn.Parameter(p.clone().to(d)) for p, d in zip(start, dtypes, strict=True)]
    ref = [torch.nn.Parameter(p.clone().to(d).float()) for p, d in zip(start, dtypes, strict=True)]

    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.03, "weight_decay": 0.0}]

    o, r = NumaAdamW(groups(ours), **HYPER), torch.optim.AdamW(groups(ref), **HYPER)
    assert len(o._buffers) == 2 and len(o._units) == 4  # (fp32, bf16) x two groups
    for step in range(10):
        for p, q, g in zip(ours, ref, grads_for(start, step), strict=True):
            p.grad, q.grad = g.to(p.dtype), g.to(p.dtype).float()
        o.step(), r.step()
    for p, q in zip(ours, ref, strict=True):
        got = o.state[p].get("master_param", p).detach()
        assert_same_trajectory(got, q, steps=10)


def test_sync_from_params_after_loading_model_weights():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8).to(torch.bfloat16)
    o = NumaAdamW(model.parameters(), **HYPER)
    new = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(new)  # in place: the bf16 params change, the fp32 master does not
    assert not torch.equal(o.state[model.weight]["master_param"].to(torch.bfloat16),
                           model.weight.detach())
    o.sync_from_params()
    assert torch.equal(o.state[model.weight]["master_param"].to(torch.bfloat16), new["weight"])
    model.weight.grad = torch.zeros_like(model.weight)
    model.bias.grad = torch.zeros_like(model.bias)
    o.step()  # zero gradient, so only weight decay moves the weights away from what was loaded
    torch.testing.assert_close(model.weight.detach().float(), new["weight"].float() * (1 - 1e-3),
                               rtol=2**-7, atol=1e-3)


def test_offload_state_dict_resyncs_host_copies_from_the_device_params():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    o = NumaAdamW(model.parameters(), offload=True, **HYPER)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    o.step()
    sd = copy.deepcopy(o.state_dict())
    with torch.no_grad():
        model.weight.fill_(0.5)  # "loaded" weights, changed outside the optimizer
    o.load_state_dict(sd)
    torch.testing.assert_close(o._slots[0].host_param, model.weight.detach())


def test_state_assignments_copy_into_the_buffers():
    """Composer's Trainer reassigns every state tensor (optimizer_to_device)."""
    model = _mlp()
    o = NumaAdamW(model.parameters())
    views = {k: v for k, v in o.state[model[0].weight].items()}
    for state in o.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                state[k] = v.clone().fill_(3.0)
    for k, v in o.state[model[0].weight].items():
        assert v is views[k] and bool((v == 3.0).all())
    assert float(o._buffers[0].exp_avg[0]) == 3.0
    assert all(type(s) is dict for s in o.state_dict()["state"].values())


def test_parameters_replaced_after_construction_are_relaid_out_with_their_state():
    a, b = _mlp(), _mlp()
    oa, ob = NumaAdamW(a.parameters(), **HYPER), torch.optim.AdamW(b.parameters(), **HYPER)
    x = torch.randn(8, 8)
    for model, opt in ((a, oa), (b, ob)):
        model(x).sum().backward()
        opt.step()
    # what module.to(device) does: new storage behind the same Parameter objects
    for model in (a, b):
        for p in model.parameters():
            p.data = p.data.clone()
            p.grad = None
    for model, opt in ((a, oa), (b, ob)):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)
    (buf,) = oa._buffers
    assert all(buf.param.data_ptr() <= p.data_ptr() < buf.param.data_ptr() + buf.numel * 4
               for p in a.parameters())
