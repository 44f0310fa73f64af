"""Quantized frozen NumaExperts (int8 per row / per group, int4 per group): dequantize() against the
kernels through a float64 reference, bit identity across SIMD paths and thread counts, gradients of
x and the routing weights, frozen buffers, layout-free state dicts, GGUF Q8_0 / Q4_0 and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from composer_numa.offload import runtime
from composer_numa.offload.experts import NumaExperts, QuantizedNumaExperts
from composer_numa.offload.native import native
from composer_numa.offload.quant import quantize_weight

E, H, I = 6, 128, 64  # noqa: E741 - small: the matrix of cases stays fast on two cores
FORMATS = [("int8", None), ("int8", 32), ("int4", 32), ("int4", 64)]
FORMAT_IDS = ["int8-row", "int8-g32", "int4-g32", "int4-g64"]
PLACEMENTS = [("split", "auto"), ("split", [0, 0]), ("by-expert", [0, 0]), ("replicate", [0, 0])]
PLACEMENT_IDS = ["split-1", "split-2", "by-expert-2", "replicate-2"]

# Activations are quantized to int16 per block of at most 128 elements: each code is off by at
# most half a step, 2^-16 of its block's largest magnitude, so a block's Frobenius relative error
# is at most sqrt(128) * 2^-16 = 1.7e-4. Two quantized stages (x before gate/up, the SwiGLU
# activations before down), fp32 accumulation (~K * 2^-24) and a factor 3 for the matrices'
# gain give 1e-3 for fp32 layers; bf16 inputs and outputs are rounded to 2^-8 on top.
TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _default_threads():
    yield
    runtime.reset()


def dense(seed=0, e=E, h=H, i=I):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(e, i, h, generator=g) / h**0.5
    up = torch.randn(e, i, h, generator=g) / h**0.5
    down = torch.randn(e, h, i, generator=g) / i**0.5
    return gate, up, down


def routing(t, k, seed, e=E):
    g = torch.Generator().manual_seed(seed)
    return NumaExperts.route(torch.randn(t, e, generator=g), k)


def reference(x, ids, w, gate, up, down):
    """The MoE in float64 from the given (dequantized) weights, differentiable in x and w."""
    x, w = x.double(), w.double()
    gate, up, down = gate.double(), up.double(), down.double()
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        t, j = (ids == e).nonzero(as_tuple=True)
        h = F.silu(x[t] @ gate[e].T) * (x[t] @ up[e].T)
        out = out.index_add(0, t, (h @ down[e].T) * w[t, j, None])
    return out


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run(layer, x, ids, w):
    """Output, grad x and grad routing weights of the layer for sum(out * g)."""
    xg = x.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    out = layer(xg, ids, wg)
    g = torch.Generator().manual_seed(99)
    out.backward(torch.randn(out.shape, generator=g).to(out.dtype))
    return out.detach(), xg.grad, wg.grad


def check_against_reference(layer, x, ids, w, tol):
    out, dx, dw = run(layer, x, ids, w)
    gate, up, down = layer.dequantize()
    xr = x.double().requires_grad_()
    wr = w.double().requires_grad_()
    ref = reference(xr, ids, wr, gate, up, down)
    g = torch.Generator().manual_seed(99)
    ref.backward(torch.randn(out.shape, generator=g).to(out.dtype).double())
    errs = {"out": rel(out, ref), "dx": rel(dx, xr.grad), "dw": rel(dw, wr.grad)}
    bad = {n: v for n, v in errs.items() if not v <= tol}
    assert not bad, f"{layer.weight_dtype}/{layer.group_size} T={x.shape[0]} k={ids.shape[1]}: {bad}"


def simd_paths():
    levels = ["scalar"]
    for lvl in ("avx2", "avx512"):
        if native().cpu_features().get(lvl if lvl == "avx2" else "avx512f"):
            levels.append(lvl)
    return levels


# ---------------------------------------------------------------- numerics --

@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("placement,nodes", PLACEMENTS, ids=PLACEMENT_IDS)
def test_matches_reference_from_dequantize(fmt, placement, nodes):
    wd, gs = fmt
    layer = NumaExperts.from_dense(*dense(), weight_dtype=wd, group_size=gs, dtype=torch.float32,
                                   nodes=nodes, placement=placement)
    assert isinstance(layer, QuantizedNumaExperts)
    for t, k in ((1, 1), (3, 2), (40, 4)):
        ids, w = routing(t, k, seed=t + k)
        x = torch.randn(t, H, generator=torch.Generator().manual_seed(t))
        check_against_reference(layer, x, ids, w, TOL[torch.float32])


@pytest.mark.parametrize("fmt", [("int8", None), ("int4", 32)], ids=["int8-row", "int4-g32"])
def test_bf16_activations(fmt):
    wd, gs = fmt
    layer = NumaExperts.from_dense(*dense(1), weight_dtype=wd, group_size=gs, dtype=torch.bfloat16,
                                   scale_dtype=torch.bfloat16)
    ids, w = routing(17, 2, seed=3)
    x = torch.randn(17, H).bfloat16()
    check_against_reference(layer, x, ids, w, TOL[torch.bfloat16])


def test_padded_hidden_and_intermediate():
    # per-row int8 pads hidden and intermediate to 32: the padding must stay out of every result
    layer = NumaExperts.from_dense(*dense(2, e=3, h=40, i=50), weight_dtype="int8", dtype=torch.float32,
                                   nodes=[0, 0])
    ids, w = routing(9, 2, seed=4, e=3)
    check_against_reference(layer, torch.randn(9, 40), ids, w, TOL[torch.float32])


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_dequantize_is_codes_times_scales(fmt):
    wd, gs = fmt
    gate, up, down = dense(3)
    layer = NumaExperts.from_dense(gate, up, down, weight_dtype=wd, group_size=gs, nodes=[0, 0])
    gq, gsc, uq, usc, dq, dsc = layer.codes()
    for q, s, orig, got in ((gq, gsc, gate, layer.dequantize()[0]), (dq, dsc, down, layer.dequantize()[2])):
        n, k = q.shape[-2:]
        want = (q.float().reshape(-1, n, s.shape[-1], k // s.shape[-1]) * s.float().unsqueeze(-1)).reshape(q.shape)
        assert torch.equal(got, want)
        # rounding to the nearest code: within half a step of the original wherever the code is
        # not clamped (the scale is rounded first, so the range ends move by 2^-11 relative)
        step = s.float().abs().repeat_interleave(k // s.shape[-1], dim=-1)
        inside = orig.abs() <= step * (126.5 if wd == "int8" else 6.5)
        assert bool(((got - orig).abs() <= step * 0.5 * (1 + 2**-20) + 1e-12)[inside].all())
        if wd == "int8":  # the largest magnitude sets the scale: nothing is clamped by more than rounding
            assert bool(((got - orig).abs() <= step * (0.5 + 127 * 2**-10) + 1e-12).all())
    # the quantizer itself gives the same codes
    q, s = quantize_weight(gate, wd, gs)
    assert torch.equal(q, gq) and torch.equal(s, gsc)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_every_simd_path_gives_the_same_bits(monkeypatch, fmt):
    wd, gs = fmt
    layer = NumaExperts.from_dense(*dense(4), weight_dtype=wd, group_size=gs, dtype=torch.float32, nodes=[0, 0])
    ids, w = routing(37, 3, seed=5)
    x = torch.randn(37, H)
    results = {}
    for level in simd_paths():
        monkeypatch.setenv("COMPOSER_NUMA_SIMD", level)
        assert native().quant_experts_kernel().startswith(level)
        results[level] = run(layer, x, ids, w)
    assert len(results) >= 2 or simd_paths() == ["scalar"]
    base = results["scalar"]
    for level, got in results.items():
        for a, b in zip(got, base, strict=True):
            assert torch.equal(a, b), level


@pytest.mark.parametrize("fmt", [("int8", None), ("int8", 32), ("int4", 32)], ids=["int8-row", "int8-g32", "int4-g32"])
def test_a_token_gets_the_same_bits_alone_and_in_a_batch(monkeypatch, fmt):
    # Alone, a token is decode: its experts' block pairs are read several side by side (groups of
    # 4 and 3 of the 7 down pairs, 2 and 4 gate/up blocks in the two slices); in a batch of 40 tokens
    # each expert has many (AMX where present). Every path must give each token the same bits.
    wd, gs = fmt
    layer = NumaExperts.from_dense(*dense(7, h=224, i=96), weight_dtype=wd, group_size=gs, dtype=torch.float32,
                                   nodes=[0, 0])
    ids, w = routing(40, 2, seed=8)
    x = torch.randn(40, 224)
    for level in simd_paths():
        monkeypatch.setenv("COMPOSER_NUMA_SIMD", level)
        with torch.no_grad():
            batch = layer(x, ids, w)
            for t in (0, 17, 39):
                alone = layer(x[t:t + 1], ids[t:t + 1], w[t:t + 1])
                assert torch.equal(alone[0], batch[t]), (level, t)


@pytest.mark.parametrize("fmt", [("int8", None), ("int4", 32)], ids=["int8-row", "int4-g32"])
def test_one_and_two_workers_give_identical_bits(fmt):
    wd, gs = fmt
    layer = NumaExperts.from_dense(*dense(5), weight_dtype=wd, group_size=gs, dtype=torch.float32, nodes=[0, 0])
    ids, w = routing(90, 4, seed=6)
    x = torch.randn(90, H)
    results = []
    for n in (1, 2):
        runtime.reset(threads=n)
        assert runtime.pool().size == n
        results.append(run(layer, x, ids, w))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_error_against_the_original_weights():
    gate, up, down = dense(6)
    ids, w = routing(30, 2, seed=7)
    x = torch.randn(30, H, generator=torch.Generator().manual_seed(7))
    ref = reference(x, ids, w, gate, up, down)
    errs = {}
    for wd, gs in FORMATS:
        layer = NumaExperts.from_dense(gate, up, down, weight_dtype=wd, group_size=gs, dtype=torch.float32)
        errs[(wd, gs)] = rel(layer(x, ids, w), ref)
        if wd == "int4":
            # the scale search does at least as well as the plain max|w| / 7 scale per group
            got = rel(layer.dequantize()[0], gate)
            blocks = gate.reshape(E, I, H // gs, gs)
            s7 = (blocks.abs().amax(-1, keepdim=True) / 7).half().float()
            plain = rel((torch.round(blocks / s7).clamp(-8, 7) * s7).reshape(gate.shape), gate)
            assert got <= plain, (gs, got, plain)
    assert errs[("int8", None)] <= 3e-2 and errs[("int8", 32)] <= 3e-2
    # 4 bits on Gaussian weights (no outliers): ~0.1 relative error per weight, which the three
    # matrices compound to ~0.14-0.17 at the output
    assert errs[("int4", 32)] <= 0.2 and errs[("int4", 64)] <= 0.2


# ---------------------------------------------------------------- module --

def test_weights_are_frozen_buffers():
    layer = NumaExperts.from_dense(*dense(), weight_dtype="int4", group_size=32, dtype=torch.float32, nodes=[0, 0])
    assert list(layer.parameters()) == []
    names = {n for n, _ in layer.named_buffers()}
    assert {"q13_0", "q2_0", "s13_0", "s2_0", "q13_1", "s2_1"} <= names
    assert all(not b.requires_grad for b in layer.buffers())
    # trains inside a model whose other parts train
    proj = torch.nn.Linear(H, H)
    ids, w = routing(8, 2, seed=8)
    out = layer(proj(torch.randn(8, H)), ids, w)
    out.square().sum().backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    # no gradient needed: no activations saved, same output
    with torch.no_grad():
        x = torch.randn(8, H)
        assert torch.equal(layer(x, ids, w), layer(x, ids, w.clone().requires_grad_()).detach())


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_state_dict_is_layout_free(fmt):
    wd, gs = fmt
    a = NumaExperts.from_dense(*dense(9), weight_dtype=wd, group_size=gs, nodes=[0, 0], placement="split")
    sd = a.state_dict()
    assert set(sd) == set(QuantizedNumaExperts.STATE_KEYS)
    bits = 8 if wd == "int8" else 4
    assert tuple(sd["gate_up_proj_q"].shape) == (E, 2 * I, H * bits // 8)
    assert sd["gate_up_proj_q"].dtype == (torch.int8 if wd == "int8" else torch.uint8)
    for placement, nodes in (("by-expert", [0, 0]), ("replicate", [0, 0]), ("split", [0])):
        b = QuantizedNumaExperts(E, H, I, weight_dtype=wd, group_size=gs, nodes=nodes, placement=placement)
        b.load_state_dict(sd)
        for x, y in zip(a.codes(), b.codes(), strict=True):
            assert torch.equal(x, y)
        for k, v in b.state_dict().items():
            assert torch.equal(v, sd[k]), k
    ids, w = routing(5, 2, seed=1)
    x = torch.randn(5, H)
    assert torch.equal(a(x, ids, w), NumaExperts.from_dense(*dense(9), weight_dtype=wd, group_size=gs,
                                                            nodes=[0, 0])(x, ids, w))


def test_state_dict_shape_mismatch_is_reported():
    a = NumaExperts.from_dense(*dense(), weight_dtype="int8", group_size=32)
    b = QuantizedNumaExperts(E, H, I, weight_dtype="int4", group_size=32)
    with pytest.raises(RuntimeError, match="size mismatch"):
        b.load_state_dict(a.state_dict())


def test_report_counts_quantized_bytes():
    layer = NumaExperts.from_dense(*dense(), weight_dtype="int4", group_size=32, nodes=[0, 0])
    rep = layer.report(top_k=2, bandwidth_gbps={0: 10.0})
    want = 3 * E * I * H // 2 + 2 * E * (2 * I * H // 32 + H * I // 32)
    assert rep.weight_bytes == want
    assert sum(rep.bytes_per_node.values()) == want  # split: 1x for any slice count
    assert rep.kernel == native().quant_experts_kernel()
    assert rep.dtype == "int4/g32"
    assert rep.resident_bytes_per_node[0] >= want


@pytest.mark.parametrize("fmt", [("int8", None), ("int4", 128)], ids=["int8-row", "int4-g128"])
def test_split_memory_is_one_copy_for_1_2_and_4_slices(fmt):
    """Resident memory within 5 % of the codes + scales for 1, 2 and 4 slices (all on node 0 here; the
    two-node guest of tests/offload/test_experts.py puts them on real nodes): the pages of the slices'
    buffers and the process's RSS growth, which also counts each buffer's huge-page tail."""
    def rss() -> int:  # resident pages of this process (/proc/self/statm's second field)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * native().page_size()

    wd, gs = fmt
    e, h, i = (80, 1024, 1024) if wd == "int8" else (128, 1024, 1024)  # ~200 MiB: a 2 MiB tail a slice is < 1 %
    ngh, ngi = (h // gs, i // gs) if gs else (1, 1)
    want = 3 * e * h * i * (8 if wd == "int8" else 4) // 8 + 2 * e * (2 * i * ngh + h * ngi)
    for nodes in ([0], [0, 0], [0, 0, 0, 0]):
        before = rss()
        layer = QuantizedNumaExperts(e, h, i, weight_dtype=wd, group_size=gs, nodes=nodes)
        grown = rss() - before
        rep = layer.report(measure_bandwidth=False)
        assert layer.weight_bytes == rep.weight_bytes == want
        # per-row scales of down's rows are kept by every slice: 2 * e * h bytes per extra slice
        assert sum(rep.bytes_per_node.values()) == want + (0 if gs else 2 * e * h * (len(nodes) - 1))
        resident = sum(rep.resident_bytes_per_node.values())
        assert want <= resident <= 1.05 * want, (nodes, resident / want)
        assert abs(grown / want - 1) <= 0.05, (nodes, grown / want)
        del layer


def test_no_tokens_and_no_choices():
    layer = NumaExperts.from_dense(*dense(), weight_dtype="int8", dtype=torch.float32, nodes=[0, 0])
    x = torch.randn(0, H, requires_grad=True)
    out = layer(x, torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2))
    assert out.shape == (0, H)
    x = torch.randn(4, H, requires_grad=True)
    w = torch.zeros(4, 0, requires_grad=True)
    out = layer(x, torch.zeros(4, 0, dtype=torch.int64), w)
    assert torch.equal(out, torch.zeros(4, H))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros(4, H))


def test_a_layer_too_large_is_a_memory_error():
    with pytest.raises(MemoryError):
        QuantizedNumaExperts(1 << 16, 1 << 14, 1 << 14, weight_dtype="int4", group_size=128)


# ---------------------------------------------------------------- GGUF --

def _write_gguf(path, tensors):
    gguf = pytest.importorskip("gguf")
    wr = gguf.GGUFWriter(str(path), "llama")
    for name, (data, qtype) in tensors.items():
        wr.add_tensor(name, data, raw_dtype=qtype)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def _to_gguf_bytes(q, s, qtype):
    """Codes and fp16 scales back to GGUF blocks: [..., n, k] -> [..., n, k / 32 * block bytes]."""
    *lead, n, k = q.shape
    d = s.contiguous().view(torch.uint8).reshape(*lead, n, k // 32, 2)
    qb = q.reshape(*lead, n, k // 32, 32)
    if qtype == "Q8_0":
        body = qb.view(torch.uint8)
    else:
        nib = (qb.to(torch.int16) + 8).to(torch.uint8)
        body = nib[..., :16] | (nib[..., 16:] << 4)
    return torch.cat([d, body], dim=-1).reshape(*lead, n, -1)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_round_trip_bit_for_bit(tmp_path, qtype):
    gguf = pytest.importorskip("gguf")
    Q = gguf.GGMLQuantizationType
    gate, up, down = (t.numpy() for t in dense(10))
    raw = {n: gguf.quants.quantize(t, Q[qtype]) for n, t in (("gate", gate), ("up", up), ("down", down))}
    path = tmp_path / "experts.gguf"
    _write_gguf(path, {
        "blk.0.attn_q.weight": (gguf.quants.quantize(gate[0], Q.Q8_0), Q.Q8_0),
        "blk.3.ffn_gate_exps.weight": (raw["gate"], Q[qtype]),
        "blk.3.ffn_up_exps.weight": (raw["up"], Q[qtype]),
        "blk.3.ffn_down_exps.weight": (raw["down"], Q[qtype]),
    })
    layer = NumaExperts.from_gguf(str(path), 3, dtype=torch.float32, nodes=[0, 0])
    assert layer.weight_dtype == ("int8" if qtype == "Q8_0" else "int4") and layer.group_size == 32
    gq, gs, uq, us, dq, ds = layer.codes()
    for name, q, s in (("gate", gq, gs), ("up", uq, us), ("down", dq, ds)):
        assert torch.equal(_to_gguf_bytes(q, s, qtype), torch.from_numpy(raw[name])), name
    # what the kernels multiply by is what gguf dequantizes to
    deq = layer.dequantize()
    for got, name in zip(deq, ("gate", "up", "down"), strict=True):
        assert torch.equal(got, torch.from_numpy(gguf.quants.dequantize(raw[name], Q[qtype]))), name
    # a reader works as well as a path, and the forward runs on the loaded codes
    again = NumaExperts.from_gguf(gguf.GGUFReader(str(path)), 3, dtype=torch.float32)
    ids, w = routing(4, 2, seed=2)
    check_against_reference(again, torch.randn(4, H), ids, w, TOL[torch.float32])


def test_gguf_bad_inputs(tmp_path):
    gguf = pytest.importorskip("gguf")
    Q = gguf.GGMLQuantizationType
    gate, up, down = (t.numpy() for t in dense(11, h=256, i=64))
    q4k = {"blk.0.ffn_gate_exps.weight": (gate.astype("float16"), Q.F16),
           "blk.0.ffn_up_exps.weight": (up.astype("float16"), Q.F16),
           "blk.0.ffn_down_exps.weight": (down.astype("float16"), Q.F16)}
    path = tmp_path / "f16.gguf"
    _write_gguf(path, q4k)
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_gate_exps\.weight is F16; only Q8_0 and Q4_0"):
        NumaExperts.from_gguf(str(path), 0)
    with pytest.raises(ValueError, match=r"no tensor blk\.1\.ffn_gate_exps\.weight"):
        NumaExperts.from_gguf(str(path), 1)
    # a K-quant: raw Q4_K blocks (256 elements in 144 bytes) are refused by name
    k_path = tmp_path / "q4k.gguf"
    blocks = {n: (torch.zeros(*shape[:-1], shape[-1] // 256 * 144, dtype=torch.uint8).numpy(), Q.Q4_K)
              for n, shape in (("blk.0.ffn_gate_exps.weight", (E, 64, 256)),
                               ("blk.0.ffn_up_exps.weight", (E, 64, 256)),
                               ("blk.0.ffn_down_exps.weight", (E, 64, 256)))}
    _write_gguf(k_path, blocks)
    with pytest.raises(ValueError, match="is Q4_K; only Q8_0 and Q4_0"):
        NumaExperts.from_gguf(str(k_path), 0)
    # down with the wrong shape
    bad = tmp_path / "shape.gguf"
    _write_gguf(bad, {"blk.0.ffn_gate_exps.weight": (gguf.quants.quantize(gate, Q.Q8_0), Q.Q8_0),
                      "blk.0.ffn_up_exps.weight": (gguf.quants.quantize(up, Q.Q8_0), Q.Q8_0),
                      "blk.0.ffn_down_exps.weight": (gguf.quants.quantize(gate, Q.Q8_0), Q.Q8_0)})
    with pytest.raises(ValueError, match=r"ffn_down_exps\.weight has ggml shape"):
        NumaExperts.from_gguf(str(bad), 0)


# ---------------------------------------------------------------- bad input --

@pytest.mark.parametrize("kwargs,match", [
    ({"weight_dtype": "int2"}, "weight_dtype must be one of int8, int4"),
    ({"weight_dtype": "int8", "group_size": 48}, "group_size must be one of"),
    ({"weight_dtype": "int4", "group_size": 0}, "group_size must be one of"),
    ({"weight_dtype": "int8", "group_size": 128, "_h": 96}, "group_size 128 does not divide hidden 96"),
    ({"weight_dtype": "int4", "_i": 96}, "group_size 128 does not divide"),
    ({"weight_dtype": "int4", "group_size": 64, "_i": 96}, "group_size 64 does not divide intermediate 96"),
    ({"weight_dtype": "int8", "scale_dtype": torch.float32}, "scale_dtype must be"),
])
def test_bad_formats_are_one_line_value_errors(kwargs, match):
    kwargs = dict(kwargs)
    h, i = kwargs.pop("_h", H), kwargs.pop("_i", I)
    with pytest.raises(ValueError, match=match) as info:
        NumaExperts.from_dense(*dense(e=2, h=h, i=i), **kwargs)
    assert "\n" not in str(info.value)


def test_bad_shapes_are_value_errors():
    gate, up, down = dense(e=2)
    with pytest.raises(ValueError, match="expected gate and up"):
        NumaExperts.from_dense(gate, up, down.transpose(1, 2), weight_dtype="int8")
    with pytest.raises(ValueError, match="3-D tensor"):
        NumaExperts.from_dense(gate[0], up, down, weight_dtype="int8")
    with pytest.raises(ValueError, match="NaN or infinity"):
        NumaExperts.from_dense(gate * float("nan"), up, down, weight_dtype="int8")
    layer = QuantizedNumaExperts(2, H, I, weight_dtype="int4", group_size=32)
    q, s = quantize_weight(gate, "int4", 32)
    with pytest.raises(ValueError, match=r"codes must lie in \[-8, 7\]"):
        layer.load_codes(q * 2, s, q, s, *quantize_weight(down, "int4", 32)[:1], quantize_weight(down, "int4", 32)[1])
    with pytest.raises(ValueError, match="must have shape"):
        layer.load_codes(q[:, :, :32], s, q, s, *quantize_weight(down, "int4", 32))
    with pytest.raises(TypeError, match="frozen"):
        layer.reset_parameters()
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(3, H + 1).bfloat16(), *routing(3, 1, seed=0, e=2))


# ---------------------------------------------------------------- training --

def test_composer_fine_tunes_around_frozen_int4_experts():
    from composer import Trainer
    from composer.models import ComposerClassifier
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    tokens = torch.randint(0, 32, (64,))
    labels = (tokens * 7 + 3) % 32

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, H)
            self.router = nn.Linear(H, E, bias=False)
            self.experts = NumaExperts.from_dense(*dense(12), weight_dtype="int4", group_size=32,
                                                  dtype=torch.float32)
            self.head = nn.Linear(H, 32)

        def forward(self, x):
            h = self.embed(x)
            ids, w = NumaExperts.route(self.router(h), 2)
            return self.head(h + self.experts(h, ids, w))

    model = ComposerClassifier(Model(), num_classes=32)
    inner = model.module
    codes = inner.experts.codes()
    params = {n: p.detach().clone() for n, p in inner.named_parameters()}
    assert not any(n.startswith("experts.") for n in params)
    with torch.no_grad():
        start = F.cross_entropy(inner(tokens), labels).item()
    loader = DataLoader(TensorDataset(tokens, labels), batch_size=16)
    trainer = Trainer(model=model, train_dataloader=loader, max_duration="3ep", device="cpu",
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2),
                      progress_bar=False, log_to_console=False, save_folder=None)
    trainer.fit()
    for n, p in inner.named_parameters():
        assert not torch.equal(p.detach(), params[n]), n  # the router gets gradients through the experts too
    for a, b in zip(codes, inner.experts.codes(), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert F.cross_entropy(inner(tokens), labels).item() < start
