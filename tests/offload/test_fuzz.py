"""A bounded fuzzer of the extension's public API and of ``composer_numa._C`` itself.

Every call either works or raises one of the documented exceptions; none crashes, hangs or
(under the AddressSanitizer + UBSan build of docs/sanitizers.md) touches memory it should not.
Public calls also keep their messages to one line. Sizes are drawn either small or far beyond
any machine, never in between, so no example can push the machine into swapping or the OOM
killer.
"""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

_C = pytest.importorskip("composer_numa._C", reason="the C++ extension is not built")
torch = pytest.importorskip("torch")

from composer_numa import NumaExperts  # noqa: E402
from composer_numa.offload import memory, runtime  # noqa: E402
from composer_numa.offload.optim import fused_adamw_  # noqa: E402

NODE = memory.default_node()
FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Small enough to allocate, or too large for any machine (nothing in between).
sizes = st.one_of(st.integers(0, 1 << 16), st.integers(1 << 50, 1 << 64), st.integers(-(1 << 64), -1))
ints = st.one_of(st.integers(-3, 40), st.sampled_from([2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64]),
                 st.integers(-(2**64), -(2**31)))
# Each strategy mixes mostly valid values (so the kernels run) with wild ones (so the checks do).
node_ids = st.one_of(st.just(NODE), st.just(NODE), st.integers(-2, 1100), st.sampled_from([2**31, 2**63, -(2**63)]))
valid_dtypes = st.sampled_from([torch.float32, torch.bfloat16])
dtypes = st.one_of(valid_dtypes, valid_dtypes,
                   st.sampled_from([torch.float16, torch.float64, torch.int64, torch.uint8]))
float_args = st.one_of(st.sampled_from([0.0, 1e-3, 0.5, 0.9, 0.999]), st.floats(0, 1, exclude_max=True),
                       st.floats(allow_nan=True, allow_infinity=True))
small_ints = st.one_of(st.integers(1, 40), st.integers(1, 40), ints)
# lr, beta1, beta2, eps, weight_decay, grad_scale
good_hyper = st.tuples(st.floats(0, 1), st.floats(0, 0.999), st.floats(0, 0.999), st.floats(0, 1e-3),
                       st.floats(0, 1), st.floats(-4, 4))
hypers = st.one_of(good_hyper, good_hyper, st.tuples(*[float_args] * 6))

PUBLIC = (ValueError, TypeError, MemoryError, IndexError)
NATIVE = (ValueError, TypeError, MemoryError, IndexError, RuntimeError, OverflowError)


def _name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _public(fn, *args, **kwargs):
    try:
        out = fn(*args, **kwargs)
    except PUBLIC as e:
        assert "\n" not in str(e), f"{type(e).__name__} over several lines: {e}"
        event(f"{_name(fn)}: {type(e).__name__}")  # --hypothesis-show-statistics: what was reached
        return None
    event(f"{_name(fn)}: ran")
    return out


def _native(fn, *args, **kwargs):
    try:
        out = fn(*args, **kwargs)
    except NATIVE as e:
        event(f"{_name(fn)}: {type(e).__name__}")
        return None
    event(f"{_name(fn)}: ran")
    return out


# ------------------------------------------------------------ public API --

@FUZZ
@given(shape=st.one_of(sizes, st.lists(st.one_of(st.integers(0, 64), st.integers(1 << 40, 1 << 63),
                                                 st.integers(-4, -1)), max_size=3)),
       dtype=dtypes, node=st.one_of(st.none(), node_ids, st.lists(node_ids, max_size=3)),
       policy=st.sampled_from(["bind", "preferred", "interleave", "local", ""]))
def test_empty(shape, dtype, node, policy):
    t = _public(memory.empty, shape, dtype, node=node, policy=policy)
    if t is not None:
        assert t.dtype == dtype and t.is_contiguous()
        if t.numel():
            assert memory.nodes_of(t).get(-1, 0) == 0  # every page faulted in
            _public(memory.zero_, t, node if isinstance(node, int) else None)


@FUZZ
@given(obj=st.one_of(st.none(), st.integers(), st.lists(st.integers(), max_size=3),
                     st.builds(torch.ones, st.integers(0, 64)),
                     st.builds(lambda n: torch.ones(n, 3).t(), st.integers(2, 8))),
       node=st.one_of(st.none(), node_ids, st.floats()))
def test_zero_(obj, node):
    out = _public(memory.zero_, obj, node)
    if out is not None:
        assert not out.any()


@FUZZ
@given(n=st.integers(0, 300), dtypes=st.one_of(st.tuples(valid_dtypes, valid_dtypes, st.just(torch.float32),
                                                         st.just(torch.float32)),
                                               st.tuples(dtypes, dtypes, dtypes, dtypes)),
       step=st.one_of(st.integers(1, 10**6), ints), hyper=hypers, master=st.booleans(),
       mismatch=st.sampled_from([False, False, True]))
def test_fused_adamw(n, dtypes, step, hyper, master, mismatch):
    lr, beta1, beta2, eps, wd, scale = hyper
    p, g, m, v = (torch.ones(n, dtype=d) for d in dtypes)
    if mismatch:
        g = torch.ones(n + 1, dtype=dtypes[1])
    mw = torch.ones(n) if master else None
    _public(fused_adamw_, p, g, m, v, step=step, lr=lr, betas=(beta1, beta2), eps=eps,
            weight_decay=wd, grad_scale=scale, master=mw)


@FUZZ
@given(e=small_ints, h=small_ints, i=small_ints, dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       nodes=st.one_of(st.just("auto"), node_ids, st.lists(node_ids, max_size=3), st.just("everywhere")),
       placement=st.sampled_from(["split", "replicate", "by-expert", "nowhere"]))
def test_experts_constructor(e, h, i, dtype, nodes, placement):
    small = all(isinstance(v, int) and 0 < v <= 40 for v in (e, h, i))
    layer = _public(NumaExperts, e, h, i, dtype=dtype, nodes=nodes, placement=placement, init=small)
    if layer is not None:
        ids, w = NumaExperts.route(torch.randn(3, layer.num_experts), min(2, layer.num_experts))
        assert layer(torch.randn(3, layer.hidden).to(dtype), ids, w).shape == (3, layer.hidden)
        bw = {n: 10.0 for n in layer.nodes}
        assert _public(layer.report, bandwidth_gbps=bw) is not None


@FUZZ
@given(bw=st.one_of(st.none(), st.dictionaries(st.one_of(st.just(NODE), st.integers(-2, 3)), float_args,
                                                max_size=3), st.lists(st.floats(), max_size=2)),
       top_k=st.one_of(st.none(), ints))
def test_experts_report(bw, top_k):
    layer = NumaExperts(4, 32, 32, dtype=torch.float32, nodes=[NODE], init=False)
    rep = _public(layer.report, top_k, measure_bandwidth=False, bandwidth_gbps=bw)
    if rep is not None and rep.decode_roofline_ms is not None:
        assert math.isfinite(rep.decode_roofline_ms) and rep.decode_roofline_ms > 0


# ------------------------------------------------------------ the _C boundary --

@FUZZ
@given(slots=st.lists(st.tuples(st.one_of(st.sampled_from(sorted(os.sched_getaffinity(0))), st.integers(-2, 8),
                                          st.integers(4000, 5000), st.just(2**40)),
                                st.one_of(st.integers(0, 3), st.integers(-2, 3), st.just(2**40))), max_size=3),
       spin=st.one_of(st.integers(0, 100), st.integers(-5, 100), st.just(2**40)))
def test_native_pool(slots, spin):
    pool = _native(_C.Pool, slots, spin)
    if pool is not None:
        assert len(pool.chunk_owners(100, 16)) == 100
        pool.close()


@FUZZ
@given(nbytes=sizes, nodes=st.one_of(st.just([NODE]), st.lists(node_ids, max_size=3)),
       policy=st.sampled_from(["bind", "preferred", "interleave", "bind", "x"]), populate=st.booleans())
def test_native_alloc(nbytes, nodes, policy, populate):
    out = _native(_C.alloc, runtime.pool(), nbytes, nodes, policy, False, populate)
    if out is not None:
        t = torch.from_dlpack(out[0])
        assert t.numel() == nbytes
        t.fill_(1)


@FUZZ
@given(kernel=st.sampled_from(["read", "copy", "triad", "adamw", "", "READ"]),
       elements=st.one_of(st.integers(1024, 5000), st.integers(-10, 5000), st.integers(1 << 50, 1 << 63)),
       cpu=node_ids, mem=node_ids, passes=st.integers(-1, 3))
def test_native_bandwidth(kernel, elements, cpu, mem, passes):
    r = _native(_C.bandwidth, runtime.pool(), kernel, elements, cpu, mem, passes)
    if r is not None:
        assert len(r["seconds"]) == passes and r["bytes_per_pass"] > 0


def _tensor(draw_dtype, n):
    return torch.ones(n, dtype=draw_dtype)


@FUZZ
@given(n=st.integers(0, 200), lens=st.one_of(st.none(), st.tuples(*[st.integers(0, 200)] * 4)),
       dtypes=st.one_of(st.tuples(valid_dtypes, valid_dtypes, st.just(torch.float32), st.just(torch.float32)),
                        st.tuples(dtypes, dtypes, dtypes, dtypes)),
       master=st.one_of(st.none(), st.just(-1), st.integers(0, 200)), node=node_ids,
       step=st.one_of(st.integers(1, 100), st.integers(-3, 2**63 - 1)),
       hyper=hypers, maximize=st.booleans())
def test_native_adamw_step(n, lens, dtypes, master, node, step, hyper, maximize):
    if not -(2**31) <= node < 2**31:
        node = -1
    lens = lens or (n,) * 4  # mostly matching sizes, sometimes not
    p, g, m, v = (_tensor(d, k) for d, k in zip(dtypes, lens, strict=True))
    mw = None if master is None else torch.ones(n if master < 0 else master)
    lr, b1, b2, eps, wd, scale = hyper
    _native(_C.adamw_step, runtime.pool(), [(node, p, g, m, v, mw, lr, b1, b2, eps, wd, step, scale, maximize)])


@FUZZ
@given(experts=st.integers(1, 6), hidden=st.integers(1, 70), inter=st.integers(1, 70),
       dtype=st.sampled_from(["float32", "bfloat16", "float16"]), slices=st.integers(1, 3),
       rows=st.sampled_from([32, 64, 96, 2**31, 2**62]), row1=st.sampled_from([32, 64, 96]),
       tokens=st.integers(0, 5), k=st.integers(0, 3), bad_weights=st.booleans(), hi=st.integers(0, 8))
def test_native_experts(experts, hidden, inter, dtype, slices, rows, row1, tokens, k, bad_weights, hi):
    local = [list(range(experts))] * slices
    layer = _native(_C.Experts, experts, hidden, inter, dtype, [NODE] * slices, local, [rows] * slices,
                    [0] * slices, [row1] * slices)
    if layer is None:
        return
    tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    w13 = [torch.zeros(layer.w13_elements(p) + (1 if bad_weights else 0), dtype=tdt) for p in range(slices)]
    w2 = [torch.zeros(layer.w2_elements(p), dtype=tdt) for p in range(slices)]
    x = torch.randn(tokens, hidden).to(tdt)
    ids = torch.randint(0, hi + 1, (tokens, k))
    w = torch.rand(tokens, k)
    out = torch.empty(tokens, hidden, dtype=tdt)
    save_g = [torch.empty(tokens * k * row1) for _ in range(slices)]
    save_u = [torch.empty(tokens * k * row1) for _ in range(slices)]
    pool = runtime.pool()
    if _native(layer.forward, pool, x, ids, w, out, w13, w2, save_g, save_u) is None and tokens * k:
        return
    dx, dw = torch.empty_like(x), torch.empty(tokens, k)
    g13 = [torch.empty_like(t) for t in w13]
    g2 = [torch.empty_like(t) for t in w2]
    _native(layer.backward, pool, torch.randn(tokens, hidden).to(tdt), x, ids, w, w13, w2, save_g, save_u,
            g13, g2, dx, dw)


@FUZZ
@given(offset=st.integers(0, 8192), nbytes=st.one_of(st.integers(0, 8192), st.integers(1 << 56, (1 << 64) - 1)))
def test_native_page_queries(offset, nbytes):
    t = torch.ones(4096)
    counts = _native(_C.pages_per_node, t.data_ptr() + offset, nbytes)
    if counts is not None:
        assert all(v >= 0 for v in counts.values())
    _native(_C.mempolicy_of, t.data_ptr() + offset)


@FUZZ
@given(x=st.floats(width=32, allow_nan=False))
def test_native_bf16_rounding_matches_torch(x):
    want = int(torch.tensor([x]).to(torch.bfloat16).view(torch.int16).item()) & 0xFFFF
    assert _C.float_to_bf16(x) == want
