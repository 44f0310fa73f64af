"""Node-local tensors: placement read back from the kernel (move_pages,
get_mempolicy), ownership (no leaks), and every refusal."""

from __future__ import annotations

import gc
import os
import re
import warnings

import pytest

torch = pytest.importorskip("torch")
_C = pytest.importorskip("composer_numa._C", reason="the C++ extension is not built")

from composer_numa.machine import capacity  # noqa: E402
from composer_numa.offload import memory, runtime  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
NODE = memory.default_node()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                   torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool])
def test_empty_is_a_contiguous_tensor_of_the_asked_dtype(dtype):
    t = memory.empty((3, 5, 7), dtype, node=NODE)
    assert t.shape == (3, 5, 7) and t.dtype == dtype and t.is_contiguous()
    assert t.device.type == "cpu"
    t.fill_(1)
    assert int(t.to(torch.int64).sum()) == 105


def test_pages_are_resident_on_the_node_with_the_policy_applied():
    t = memory.empty((4 << 20) // 4, torch.float32, node=NODE)  # 4 MiB
    assert memory.nodes_of(t) == {NODE: (4 << 20) // PAGE}  # every page faulted in, on NODE
    assert memory.policy_of(t) == ("bind", [NODE])
    with open("/proc/self/numa_maps") as f:
        line = next(x for x in f if int(x.split()[0], 16) == t.data_ptr())
    assert f"bind:{NODE}" in line


def test_preferred_and_interleave_policies():
    p = memory.empty(1 << 16, torch.float32, node=NODE, policy="preferred")
    assert memory.policy_of(p) == ("preferred", [NODE])
    i = memory.empty(1 << 16, torch.float32, policy="interleave")
    mode, nodes = memory.policy_of(i)
    assert mode == "interleave" and nodes == memory.memory_nodes()
    assert sum(memory.nodes_of(i).values()) == (1 << 18) // PAGE


def test_zero_sized_tensors():
    assert memory.empty((0, 4)).shape == (0, 4)
    assert memory.empty(0, torch.bfloat16).numel() == 0
    assert memory.nodes_of(memory.empty((2, 0))) == {}


def test_fresh_buffers_are_zero_and_zero_refills():
    t = memory.zeros(10_000, torch.float32)
    assert not t.any()
    t.fill_(3)
    memory.zero_(t, NODE)
    assert not t.any()


def test_views_keep_the_mapping_alive():
    t = memory.empty(1 << 20, torch.float32)
    t.copy_(torch.arange(1 << 20, dtype=torch.float32))
    v = t[100:200]
    del t
    gc.collect()
    assert v[0].item() == 100.0 and v[-1].item() == 199.0


def test_allocation_loop_does_not_leak():
    gc.collect()
    memory.empty(64 << 18, torch.float32)  # warm the pool and allocator
    base = _rss()
    for _ in range(40):
        t = memory.empty(64 << 18, torch.float32)  # 64 MiB, faulted in
        assert t.numel() == 64 << 18
        v = t[1:]
        del t, v
    gc.collect()
    assert _rss() - base < 64 << 20  # 40 x 64 MiB were mapped; at most one may linger


def test_request_larger_than_the_node_is_a_memory_error_naming_node_size_and_figures():
    with pytest.raises(MemoryError) as e:
        memory.empty(1 << 48, torch.uint8, node=NODE)
    msg = str(e.value)
    assert f"node {NODE}" in msg and "256.0 TiB" in msg and "\n" not in msg
    assert re.search(r"the node has \d+\.\d [KMGT]iB available \(\d+\.\d [KMGT]iB free, "
                     r"\d+\.\d [KMGT]iB total\)", msg), msg
    with pytest.raises(MemoryError):
        memory.empty((1 << 40, 1 << 40), torch.float32, node=NODE)
    with pytest.raises(MemoryError):  # more bytes than 64 bits count: still one clear MemoryError
        memory.empty((1 << 62, 1 << 62), torch.float64, node=NODE)


def test_capacity_is_asked_of_the_machine_model_under_its_reservation(monkeypatch):
    # memory.empty asks composer_numa.machine.capacity, holding capacity.reserve while it
    # checks and while the extension faults the pages in.
    events = []
    real_reserve, real_read = capacity.reserve, capacity.read_nodes

    def reserve(nodes, **kw):
        events.append(("reserve", tuple(nodes)))
        return real_reserve(nodes, **kw)

    def read_nodes(ids, *a, **kw):
        events.append(("read", tuple(ids)))
        out = real_read(ids, *a, **kw)
        return {n: capacity.NodeMemory(n, m.total, m.free, 1 << 20) for n, m in out.items()}  # 1 MiB left

    monkeypatch.setattr(capacity, "reserve", reserve)
    monkeypatch.setattr(capacity, "read_nodes", read_nodes)
    t = memory.empty(1 << 18, torch.uint8, node=NODE)  # 256 KiB fits
    assert memory.nodes_of(t) == {NODE: (1 << 18) // PAGE}
    assert events == [("reserve", (NODE,)), ("read", (NODE,))]
    with pytest.raises(MemoryError, match=f"cannot allocate 2.0 MiB on NUMA node {NODE}.*1.0 MiB available"):
        memory.empty(2 << 20, torch.uint8, node=NODE)


def test_the_native_allocator_checks_only_what_no_machine_can_hold():
    # _C.alloc maps; capacity is composer_numa.machine.capacity's question. A size no mapping or
    # machine can hold is still refused at once, without wrapping around.
    pool = runtime.pool()
    for nbytes in (2**64 - 4096, 2**63, os.sysconf("SC_PHYS_PAGES") * PAGE * 2):
        with pytest.raises(MemoryError, match="physical memory"):
            _C.alloc(pool, nbytes, [NODE], "bind")


def test_meminfo_of_the_node():
    info = memory.node_meminfo(NODE)
    assert info["node"] == NODE
    assert info["total_bytes"] >= info["free_bytes"] > 0
    assert info["available_bytes"] >= 0
    assert NODE in memory.memory_nodes()
    with pytest.raises(ValueError, match="NUMA node 1000 does not exist"):
        memory.node_meminfo(1000)


@pytest.mark.parametrize("kwargs,exc,text", [
    (dict(node=1000), ValueError, "does not exist"),
    (dict(node=5000), ValueError, "out of range"),
    (dict(node=-1), ValueError, "out of range"),
    (dict(node=2**31), ValueError, "out of range"),
    (dict(node=1.5), TypeError, "ints"),
    (dict(policy="local"), ValueError, "unknown memory policy"),
    (dict(node=[NODE, NODE], policy="bind"), ValueError, "one node"),
    (dict(node=[NODE, NODE], policy="interleave"), ValueError, "listed twice"),
])
def test_bad_nodes_and_policies(kwargs, exc, text):
    with pytest.raises(exc, match=text):
        memory.empty(16, torch.float32, **kwargs)


@pytest.mark.parametrize("shape,exc", [((2, -1), ValueError), (-3, ValueError), ("abc", ValueError),
                                       (2.5, TypeError), ((True, 2), ValueError)])
def test_bad_shapes(shape, exc):
    with pytest.raises(exc):
        memory.empty(shape)


@pytest.mark.parametrize("bad,exc,text", [
    ([1, 2, 3], TypeError, "zero_ needs a torch.Tensor, got list"),
    (torch.ones(4, 4).t(), ValueError, "contiguous"),
    (torch.ones(4, device="meta"), ValueError, "dense CPU tensor"),
])
def test_zero_refuses_what_it_cannot_zero_in_one_line(bad, exc, text):
    with pytest.raises(exc, match=text) as e:
        memory.zero_(bad)
    assert "\n" not in str(e.value)


def test_unsupported_dtype():
    with pytest.raises(TypeError, match="complex64"):
        memory.empty(4, torch.complex64)


def test_pin_without_cuda_warns_and_returns_a_usable_tensor(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: pinning is exercised by the GPU tests")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = memory.empty(1024, torch.float32, pin=True)
    t.fill_(2)
    assert float(t.sum()) == 2048.0 and not t.is_pinned()
    assert any(memory.PIN_NOT_APPLIED in str(w.message) for w in caught)


def test_native_pin_failure_is_reported_not_raised():
    # Whether or not a CUDA runtime is loaded, pinning must fail softly here.
    capsule, pinned, why = _C.alloc(runtime.pool(), 1 << 20, [NODE], "bind", True)
    t = torch.from_dlpack(capsule)
    if not torch.cuda.is_available():
        assert not pinned and why
    t.fill_(1)
    assert int(t.sum()) == 1 << 20


@pytest.mark.cuda
def test_pin_with_cuda_page_locks():
    t = memory.empty(1 << 20, torch.float32, pin=True)
    assert t.is_pinned()
    d = torch.ones(1 << 20, device="cuda")
    t.copy_(d, non_blocking=True)
    torch.cuda.synchronize()
    assert float(t.sum()) == float(1 << 20)


def test_nodes_of_ordinary_tensors_and_unfaulted_pages():
    t = torch.ones(1 << 20)
    counts = memory.nodes_of(t)
    assert sum(v for k, v in counts.items() if k >= 0) >= (4 << 20) // PAGE - 1
    # fresh, untouched anonymous memory: counted under -1
    capsule, _, _ = _C.alloc(runtime.pool(), 8 << 20, [NODE], "bind", False, False)
    raw = torch.from_dlpack(capsule)
    assert memory.nodes_of(raw).get(-1, 0) == (8 << 20) // PAGE
    raw[::PAGE].fill_(1)
    assert memory.nodes_of(raw) == {NODE: (8 << 20) // PAGE}


def test_nodes_of_rejects_non_cpu_and_non_tensors():
    with pytest.raises(TypeError):
        memory.nodes_of([1, 2, 3])
    with pytest.raises(ValueError):
        memory.nodes_of(torch.empty(4, device="meta"))
