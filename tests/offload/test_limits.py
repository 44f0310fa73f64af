"""Absurd sizes and wrong arguments at every entry point, public and ``_C``: a MemoryError or a
ValueError/TypeError at once, in one line naming the argument; never an overflow, a crash, or
work that grows with the absurd number."""

from __future__ import annotations

import math
import time

import pytest

_C = pytest.importorskip("composer_numa._C", reason="the C++ extension is not built")
torch = pytest.importorskip("torch")

from composer_numa import NumaExperts  # noqa: E402
from composer_numa.offload import memory, runtime  # noqa: E402
from composer_numa.offload.optim import fused_adamw_  # noqa: E402

NODE = memory.default_node()


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


# ------------------------------------------------------------ the _C boundary --

def test_native_experts_with_rows_near_2_to_62_is_refused_before_any_arithmetic():
    with pytest.raises(ValueError) as e:
        _C.Experts(1, 32, 32, "float32", [0], [[0]], [2**62], [0], [32])
    assert "rows" in _one_line(e)
    with pytest.raises(ValueError) as e:
        _C.Experts(2**40, 32, 32, "float32", [0], [[0]], [32], [0], [32])
    assert "at most 2^31 - 1 experts" in _one_line(e)
    with pytest.raises(ValueError) as e:  # a local map of the wrong size
        _C.Experts(5, 32, 32, "float32", [0], [[0]], [32], [0], [32])
    assert "every expert id" in _one_line(e)
    with pytest.raises(ValueError) as e:
        _C.Experts(1, 2**40, 32, "float32", [0], [[0]], [32], [0], [32])
    assert "hidden" in _one_line(e)


def test_native_experts_whose_weights_overflow_64_bits_are_a_memory_error():
    # every count below 2^31, their product above 2^63
    big = 2**31 - 32
    with pytest.raises(MemoryError) as e:
        _C.Experts(2, 2**31 - 1, 32, "float32", [0], [[0, 1]], [big], [0], [big])
    assert "overflows" in _one_line(e)


def test_native_alloc_and_bandwidth_with_sizes_that_would_wrap():
    pool = runtime.pool()
    with pytest.raises(MemoryError) as e:
        _C.alloc(pool, 2**64 - 4096, [NODE], "bind")
    assert "physical memory" in _one_line(e)
    with pytest.raises(MemoryError) as e:
        _C.bandwidth(pool, "read", 2**63 - 1, NODE, NODE, 1)
    assert "bandwidth probe" in _one_line(e)
    with pytest.raises(MemoryError):
        _C.bandwidth(pool, "adamw", 2**62, NODE, NODE, 1)
    with pytest.raises(ValueError, match="unknown bandwidth kernel"):
        _C.bandwidth(pool, "x" * 10_000, 4096, NODE, NODE, 1)


def test_native_page_queries_refuse_ranges_outside_the_address_space():
    t = torch.ones(1024)
    with pytest.raises(ValueError, match="address space"):
        _C.pages_per_node(t.data_ptr(), 2**64 - 1)
    with pytest.raises(ValueError, match="larger than this machine's memory"):  # not a walk over 2^44 pages
        _C.pages_per_node(t.data_ptr(), 2**56)
    assert sum(_C.pages_per_node(t.data_ptr(), 4096).values()) >= 1


def test_native_adamw_step_validates_every_job():
    pool = runtime.pool()
    job = [-1, torch.ones(5), torch.ones(5), torch.zeros(5), torch.zeros(5), None,
           1e-3, 0.9, 0.999, 1e-8, 0.0, 1, 1.0, False]
    for k, v, text in [(6, math.nan, "lr"), (9, -1.0, "eps"), (7, 1.0, "betas"), (11, 0, "step")]:
        bad = list(job)
        bad[k] = v
        with pytest.raises(ValueError, match=text):
            _C.adamw_step(pool, [tuple(bad)])
    with pytest.raises(TypeError):  # 2**63 does not fit the step's int64: nanobind refuses it
        _C.adamw_step(pool, [tuple(job[:11] + [2**63] + job[12:])])


# ------------------------------------------------------------ the public API --

def test_numa_experts_with_an_intermediate_of_2_to_62_is_a_memory_error_at_once():
    t0 = time.perf_counter()
    with pytest.raises(MemoryError) as e:
        NumaExperts(1, 32, 2**62)
    assert "NumaExperts: the expert weights need" in _one_line(e)
    assert time.perf_counter() - t0 < 2


def test_ten_million_experts_is_a_memory_error_quickly():
    t0 = time.perf_counter()
    with pytest.raises(MemoryError):
        NumaExperts(10**7, 32, 32)
    assert time.perf_counter() - t0 < 2


def _best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@pytest.mark.parametrize("init", [False, True])
def test_building_experts_grows_linearly_with_their_number(init):
    small, large = 1024, 4096
    NumaExperts(8, 32, 32, init=init)  # warm
    t_small = _best_of(3, lambda: NumaExperts(small, 32, 32, init=init))
    t_large = _best_of(2, lambda: NumaExperts(large, 32, 32, init=init))
    # 4x the experts: ~4x the time when linear, 16x when quadratic
    assert t_large < 8 * t_small + 0.05, (t_small, t_large)


def test_public_calls_with_absurd_arguments_fail_in_one_line():
    with pytest.raises(ValueError) as e:
        memory.empty(16, node=2**31)
    assert "NUMA node 2147483648 is out of range" in _one_line(e)
    with pytest.raises(TypeError) as e:
        memory.zero_([1, 2, 3])
    assert "zero_ needs a torch.Tensor" in _one_line(e)
    with pytest.raises(ValueError) as e:
        fused_adamw_(torch.ones(5), torch.ones(5), torch.zeros(5), torch.zeros(5), step=2**63)
    assert "step must be an int from 1 to 2**63 - 1" in _one_line(e)


@pytest.mark.parametrize("given,exc,text", [
    ({0: 0.0}, ValueError, "bandwidth_gbps\\[0\\] must be a positive number"),
    ({0: math.nan}, ValueError, "positive number"),
    ({0: math.inf}, ValueError, "positive number"),
    ({0: "fast"}, ValueError, "positive number"),
    ({7: 10.0}, ValueError, "no figure for node"),
    ([10.0], TypeError, "must be a dict"),
])
def test_report_checks_the_bandwidths_it_is_given(given, exc, text):
    layer = NumaExperts(4, 32, 32, dtype=torch.float32, nodes=[NODE], init=False)
    with pytest.raises(exc, match=text) as e:
        layer.report(bandwidth_gbps=given)
    _one_line(e)
    assert layer.report(bandwidth_gbps={NODE: 10.0}).decode_roofline_ms > 0
    with pytest.raises(ValueError, match="top_k"):
        layer.report(top_k=0, measure_bandwidth=False)
