"""NumaAdamW's state layouts against a float64 AdamW, with tolerances derived from bf16 ulps.

Layouts: fp32 everything; fp32 parameters with bf16 moments; bf16 parameters with fp32
master weights and moments (the default); bf16 parameters updated in place with fp32
moments (``master_weights=False``, DeepSpeed CPUAdam's layout); bf16 parameters and
moments (``master_weights=False, state_dtype=torch.bfloat16``, torch fused AdamW's layout
with bf16 parameters). Every rounding to bf16 is to nearest, ties to even.
"""

from __future__ import annotations

import copy
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("composer_numa._C", reason="the C++ extension is not built")

from composer_numa import NumaAdamW  # noqa: E402
from composer_numa.offload import runtime  # noqa: E402

HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
EPS32 = torch.finfo(torch.float32).eps
HALF_ULP_BF16 = 2.0**-8  # bf16 keeps 8 significant bits: rounding moves a value by <= 2^-8 of it
SHAPES = [(257,), (16, 33), (5,)]

LAYOUTS = {
    "fp32": (torch.float32, {}),
    "fp32-params-bf16-moments": (torch.float32, dict(state_dtype=torch.bfloat16)),
    "bf16-master": (torch.bfloat16, {}),
    "bf16-no-master": (torch.bfloat16, dict(master_weights=False)),
    "bf16-no-master-bf16-moments": (torch.bfloat16, dict(master_weights=False, state_dtype=torch.bfloat16)),
}


@pytest.fixture(autouse=True)
def default_pool(monkeypatch):
    monkeypatch.delenv("COMPOSER_NUMA_SIMD", raising=False)
    runtime.reset()
    yield
    runtime.reset()


def _start(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def _grads(step, dtype):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def _run(layout, steps):
    dtype, kw = LAYOUTS[layout]
    params = [torch.nn.Parameter(p.clone()) for p in _start(dtype)]
    opt = NumaAdamW(params, **HYPER, **kw)
    for step in range(steps):
        for p, g in zip(params, _grads(step, dtype), strict=True):
            p.grad = g
        opt.step()
    return params, opt


def _reference_and_bounds(layout, steps):
    """AdamW in float64 on the same start and gradients, and per-element error bounds.

    The bound adds, per step and per element:
    * fp32 arithmetic: 4 ulps of max(|p|, lr) (torch's and our fp32 steps round a handful of times);
    * bf16 parameters without master weights: the parameter is rounded every step, <= 2^-8 |p|;
      with master weights only the final copy is rounded, once;
    * bf16 moments: each step's rounding of m (v) adds <= 2^-8 |m| (|v|) to an error that decays
      by beta1 (beta2), giving E_m, E_v; the update lr/bc1 * m / (sqrt(v/bc2) + eps) then moves by
      at most lr/bc1 * (E_m + |m| * E_v / (2 v) * sqrt(v/bc2) / D) / D with D = sqrt(v/bc2) + eps,
      doubled for the second-order terms this first-order estimate leaves out.
    """
    dtype, kw = LAYOUTS[layout]
    bf16_params = dtype == torch.bfloat16
    rounds_param = bf16_params and not kw.get("master_weights", True)
    bf16_moments = kw.get("state_dtype") == torch.bfloat16
    lr, (b1, b2), eps, wd = HYPER["lr"], HYPER["betas"], HYPER["eps"], HYPER["weight_decay"]
    p = [x.double() for x in _start(dtype)]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    em = [torch.zeros_like(x) for x in p]
    ev = [torch.zeros_like(x) for x in p]
    bound = [torch.zeros_like(x) for x in p]
    for step in range(steps):
        t = step + 1
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        for i, g in enumerate(_grads(step, dtype)):
            g = g.double()
            p[i] = p[i] * (1 - lr * wd)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            d = (v[i] / bc2).sqrt() + eps
            p[i] = p[i] - lr / bc1 * m[i] / d
            bound[i] += 4 * EPS32 * max(float(p[i].abs().max()), lr)
            if rounds_param:
                bound[i] += HALF_ULP_BF16 * p[i].abs()
            if bf16_moments:
                em[i] = b1 * em[i] + HALF_ULP_BF16 * m[i].abs()
                ev[i] = b2 * ev[i] + HALF_ULP_BF16 * v[i]
                rel_d = ev[i] / (2 * v[i]) * (v[i] / bc2).sqrt() / d
                bound[i] += 2 * lr / bc1 * (em[i] + m[i].abs() * rel_d) / d
    if bf16_params and not rounds_param:
        bound = [b + HALF_ULP_BF16 * x.abs() for b, x in zip(bound, p, strict=True)]
    return p, m, v, bound, em, ev


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_stays_within_its_bf16_error_bound_of_float64_adamw(layout):
    steps = 30
    params, opt = _run(layout, steps)
    ref, m_ref, v_ref, bound, em, ev = _reference_and_bounds(layout, steps)
    dtype, kw = LAYOUTS[layout]
    for i, p in enumerate(params):
        assert p.dtype == dtype
        err = (p.detach().double() - ref[i]).abs()
        assert bool((err <= bound[i]).all()), (layout, float((err - bound[i]).max()))
        st = opt.state[p]
        want_state = kw.get("state_dtype", torch.float32)
        assert st["exp_avg"].dtype == want_state and st["exp_avg_sq"].dtype == want_state
        assert ("master_param" in st) == (dtype == torch.bfloat16 and kw.get("master_weights", True))
        if want_state == torch.bfloat16:  # the moments themselves: decayed sum of half-ulp roundings
            tol = 2 * EPS32 * steps
            assert bool(((st["exp_avg"].double() - m_ref[i]).abs() <= em[i] + tol * m_ref[i].abs()
                         + 1e-12).all())
            assert bool(((st["exp_avg_sq"].double() - v_ref[i]).abs() <= ev[i] + tol * v_ref[i]
                         + 1e-12).all())


def test_the_bounds_rank_the_layouts_as_their_errors_do():
    # The derived bounds are not vacuous: keeping fp32 master weights is more accurate than
    # rounding the bf16 parameters every step, and the measured errors agree.
    steps = 30
    errs = {}
    for layout in ("bf16-master", "bf16-no-master"):
        params, _ = _run(layout, steps)
        ref = _reference_and_bounds(layout, steps)[0]
        errs[layout] = max(float((p.detach().double() - r).abs().max()) for p, r in zip(params, ref, strict=True))
    assert errs["bf16-master"] < errs["bf16-no-master"]
    scale = max(float(r.abs().max()) for r in _reference_and_bounds("bf16-master", steps)[0])
    assert errs["bf16-master"] <= HALF_ULP_BF16 * scale + 4 * steps * EPS32 * scale


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_state_dict_round_trip_continues_bit_identically(layout):
    dtype, kw = LAYOUTS[layout]
    a, oa = _run(layout, 4)
    sd = copy.deepcopy(oa.state_dict())
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ob = NumaAdamW(b, **HYPER, **kw)
    ob.load_state_dict(sd)
    for pa, pb in zip(a, b, strict=True):
        for k, t in oa.state[pa].items():
            assert torch.equal(ob.state[pb][k], t), (layout, k)
            assert ob.state[pb][k].dtype == t.dtype
    for step in range(4, 8):
        for opt, ps in ((oa, a), (ob, b)):
            for p, g in zip(ps, _grads(step, dtype), strict=True):
                p.grad = g
            opt.step()
    for pa, pb in zip(a, b, strict=True):
        assert torch.equal(pa.detach().view(torch.uint8), pb.detach().view(torch.uint8))
        assert math.isfinite(float(pa.detach().float().abs().max()))


@pytest.mark.parametrize("layout", ["fp32", "bf16-no-master-bf16-moments"])
def test_many_chunks_claimed_by_any_number_of_workers_give_the_scalar_bits(layout, monkeypatch):
    # A job's workers claim 16-aligned chunks (4K..64K elements) dynamically; a 300001-element
    # tensor makes dozens of them with an odd tail, next to small tensors that go whole.
    dtype, kw = LAYOUTS[layout]
    shapes = [(300_001,), (4096,), (17,), (70_000,)]
    results = []
    for simd, threads in (("scalar", 1), ("avx2", 1), ("avx2", 2), ("avx2", 7)):
        monkeypatch.setenv("COMPOSER_NUMA_SIMD", simd)
        runtime.reset(threads=threads)
        g = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
        opt = NumaAdamW(params, **HYPER, **kw)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            opt.step()
        got = [p.detach().clone() for p in params]
        got += [t.clone() for p in params for k, t in opt.state[p].items() if k != "step"]
        results.append(got)
    for got in results[1:]:
        for a, b in zip(results[0], got, strict=True):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
