"""NumaExperts against a typical PyTorch CPU MoE loop, and against the weight-streaming roofline.

The layer is DeepSeek-V2-Lite-like: hidden 2048, expert intermediate 1408,
64 routed experts, top-6, bf16 weights. For each token count T the benchmark
times, in one run and on the same routings:

* ``NumaExperts`` (placement ``split`` over this rank's nodes);
* the loop most CPU MoE code uses: for every active expert, gather its tokens
  and apply ``F.linear`` three times (``torch_moe_loop`` below);
* the roofline: the bytes of the expert weights the routing touches divided by
  the read bandwidth the extension's probe measures on this machine.

Every repeat draws a fresh random routing (so decode does not re-read experts
that are still in the last-level cache); both implementations run each routing,
alternating which goes first, and the table shows medians. Decode is T = 1, 8, 64; prefill is T = 512.
It also prints resident memory for ``split``: the process's RSS growth while the
layer is built, and the resident pages of its buffers, against the weights' size.

With ``--quant int8,int4`` (the default) the same routings also run frozen quantized layers
(``NumaExperts.from_dense(..., weight_dtype=...)``: int8 per row, int4 in groups of 128), with a
second table: quantized bytes touched, their roofline, time, ratio against bf16 NumaExperts and the
loop, and the error against the bf16 weights' output.

    python benchmarks/bench_moe.py                 # the default layer, about 2 minutes
    python benchmarks/bench_moe.py --repeats 5 --tokens 1,512
    python benchmarks/bench_moe.py --quant none    # bf16 only
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import psutil
import torch
import torch.nn.functional as F

from composer_numa.offload import runtime
from composer_numa.offload.experts import NumaExperts, _read_bandwidth_gbps
from composer_numa.offload.native import native


def torch_moe_loop(x, ids, weights, gate, up, down):
    """The usual eager CPU MoE: one gather and three F.linear per active expert."""
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        xe = x[tok]
        h = F.silu(F.linear(xe, gate[e])) * F.linear(xe, up[e])
        out.index_add_(0, tok, F.linear(h, down[e]) * weights[tok, slot, None].to(x.dtype))
    return out


def random_routing(tokens, experts, k, gen):
    logits = torch.randn(tokens, experts, generator=gen)
    return NumaExperts.route(logits, k)


def timed(fn, calls, pause):
    times = []
    for args in calls:
        # Idle first, as between the MoE layers of a real decode step: neither
        # torch's OpenMP threads nor our workers are still spinning from the
        # previous call, and both pay their wake-up (--pause-ms 0: back to back).
        time.sleep(pause)
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return times


def rss() -> int:
    return psutil.Process().memory_info().rss


def fmt_mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--tokens", default="1,8,64,512", help="comma-separated token counts")
    ap.add_argument("--repeats", type=int, default=11, help="timed calls per case (median reported)")
    ap.add_argument("--placement", default="split", choices=["split", "by-expert", "replicate"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pause-ms", type=float, default=20.0, help="idle time before each timed call")
    ap.add_argument("--quant", default="int8,int4", help="quantized layers to add: int8, int4 (groups of 128) "
                    "or none")
    args = ap.parse_args(argv)
    E, H, I, K = args.experts, args.hidden, args.intermediate, args.top_k  # noqa: E741
    dtype = torch.bfloat16
    c = native()
    gen = torch.Generator().manual_seed(args.seed)

    print(f"layer: {E} experts, hidden {H}, intermediate {I}, top-{K}, bf16")
    print(f"NumaExperts kernel: {c.experts_kernel('bfloat16')}, {runtime.pool().size} pinned workers; "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")

    # Dense weights for the PyTorch loop (generated expert by expert to bound the peak).
    gate = torch.empty(E, I, H, dtype=dtype)
    up = torch.empty(E, I, H, dtype=dtype)
    down = torch.empty(E, H, I, dtype=dtype)
    for e in range(E):
        gate[e] = torch.randn(I, H, generator=gen) * H**-0.5
        up[e] = torch.randn(I, H, generator=gen) * H**-0.5
        down[e] = torch.randn(H, I, generator=gen) * I**-0.5

    gc.collect()
    before = rss()
    layer = NumaExperts.from_dense(gate, up, down, placement=args.placement)
    gc.collect()
    grown = rss() - before
    nodes = sorted(set(layer.nodes))
    samples: dict[int, list[float]] = {n: [] for n in nodes}

    def sample_bandwidth() -> None:
        for n in nodes:
            samples[n].append(_read_bandwidth_gbps(n, elements=1 << 26, passes=3))

    quant_names = [] if args.quant == "none" else [q for q in args.quant.split(",") if q]
    for q in quant_names:
        if q not in ("int8", "int4"):
            print(f"--quant: unknown format {q!r} (int8, int4 or none)")
            return 2
    quant = {q: NumaExperts.from_dense(gate, up, down, placement=args.placement, weight_dtype=q,
                                       group_size=128 if q == "int4" else None) for q in quant_names}
    if quant:
        print("quantized kernel: " + c.quant_experts_kernel())
    sample_bandwidth()
    weight_bytes = layer.weight_bytes
    per_expert = 3 * H * I * 2
    header = (f"{'T':>5} {'active':>6} {'touched':>11} {'roofline':>9} {'NumaExperts':>11} {'of roofline':>11} "
              f"{'torch loop':>10} {'speed-up':>8}")

    measured = []
    quant_measured = []

    def loop_fn(x, ids, w):
        return torch_moe_loop(x, ids, w, gate, up, down)

    for T in [int(t) for t in args.tokens.split(",")]:
        calls = []
        for _ in range(args.repeats + 1):  # the first call of each is a warm-up
            ids, w = random_routing(T, E, K, gen)
            x = (torch.randn(T, H, generator=gen)).to(dtype)
            calls.append((x, ids, w))
        with torch.no_grad():
            got = layer(*calls[0])
            want = torch_moe_loop(*calls[0], gate, up, down)
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            if not err < 2e-2:
                print(f"T={T}: NumaExperts and the PyTorch loop disagree (relative error {err:.3g})")
                return 1
            qerr = {q: ((ql(*calls[0]).float() - want.float()).norm() / want.float().norm()).item()
                    for q, ql in quant.items()}
            # Rotate the order per repeat so that all see the same machine (it may be shared).
            t_loop, t_numa = [], []
            t_quant: dict[str, list[float]] = {q: [] for q in quant}
            runs = [(t_loop, loop_fn), (t_numa, layer)] + [(t_quant[q], ql) for q, ql in quant.items()]
            for i, call in enumerate(calls[1:]):
                for j in range(len(runs)):
                    times, fn = runs[(i + j) % len(runs)]
                    times.extend(timed(fn, [call], args.pause_ms / 1e3))
        touched = [ids.unique().numel() * per_expert for _, ids, _ in calls[1:]]
        measured.append((T, touched, t_numa, t_loop))
        quant_measured.append((T, [ids.unique().numel() for _, ids, _ in calls[1:]], t_quant, qerr))
        sample_bandwidth()

    # The machine may be shared: the roofline uses the best bandwidth seen during
    # the run (sampled before and after every case), summed over the nodes that
    # hold slices (split: each node streams its own share).
    bw = {n: max(v) for n, v in samples.items()}
    gbps = sum(bw.values())
    rep = layer.report(top_k=K, bandwidth_gbps=bw)
    resident = sum(rep.resident_bytes_per_node.values())
    print("read bandwidth (best of " + f"{len(samples[nodes[0]])} probes): "
          + ", ".join(f"node {n}: {v:.1f} GB/s (median {statistics.median(samples[n]):.1f})" for n, v in bw.items()))
    print()
    print(header)
    print("-" * len(header))
    rows = []
    for T, touched, t_numa, t_loop in measured:
        roof = [b / (gbps * 1e9) for b in touched]
        numa, loop = statistics.median(t_numa), statistics.median(t_loop)
        frac = statistics.median(r / t for r, t in zip(roof, t_numa, strict=True))
        active = statistics.median(b / per_expert for b in touched)
        rows.append((T, numa, loop, frac))
        print(f"{T:>5} {active:>6.0f} {fmt_mb(statistics.median(touched)):>11} "
              f"{statistics.median(roof) * 1e3:>7.2f}ms {numa * 1e3:>9.2f}ms {frac * 100:>10.0f}% "
              f"{loop * 1e3:>8.2f}ms {loop / numa:>7.2f}x")

    if quant:
        print()
        qheader = (f"{'T':>5} {'format':>8} {'touched':>11} {'roofline':>9} {'time':>9} {'of roofline':>11} "
                   f"{'vs bf16':>8} {'vs loop':>8} {'err vs bf16 weights':>19}")
        print(qheader)
        print("-" * len(qheader))
        for (T, active, t_quant, qerr), (_, numa, loop, _) in zip(quant_measured, rows, strict=True):
            for q, ql in quant.items():
                qexpert = ql.weight_bytes // E
                qt = statistics.median(t_quant[q])
                qroof = [a * qexpert / (gbps * 1e9) for a in active]
                frac = statistics.median(r / t for r, t in zip(qroof, t_quant[q], strict=True))
                print(f"{T:>5} {q:>8} {fmt_mb(statistics.median(active) * qexpert):>11} "
                      f"{statistics.median(qroof) * 1e3:>7.2f}ms {qt * 1e3:>7.2f}ms {frac * 100:>10.0f}% "
                      f"{numa / qt:>7.2f}x {loop / qt:>7.2f}x {qerr[q]:>19.4f}")
        for q, ql in quant.items():
            r = ql.report(top_k=K, bandwidth_gbps=bw)
            res = sum(r.resident_bytes_per_node.values())
            print(f"memory {q} ({args.placement}): weights + scales {fmt_mb(ql.weight_bytes)}; buffers "
                  f"{fmt_mb(res)} resident ({res / ql.weight_bytes:.3f}x)")

    print()
    print(f"memory ({args.placement}): weights {fmt_mb(weight_bytes)}; RSS grew {fmt_mb(grown)} "
          f"({grown / weight_bytes:.3f}x) building the layer; its buffers have {fmt_mb(resident)} "
          f"resident ({resident / weight_bytes:.3f}x)"
          + "".join(f"; node {n}: {fmt_mb(b)}" for n, b in sorted(rep.resident_bytes_per_node.items())))
    for slices in ([nodes[0]] * 2, [nodes[0]] * 4):
        probe = NumaExperts(E, H, I, dtype=dtype, nodes=slices, placement="split", init=False)
        r = probe.report(measure_bandwidth=False)
        print(f"  split into {len(probe._slices)} slices: "
              f"{sum(r.resident_bytes_per_node.values()) / probe.weight_bytes:.3f}x the weights resident")
        del probe
    print()
    print("targets: decode (T < 512) >= 80% of the roofline and >= 2x the loop; prefill >= 1.0x the loop; "
          "split memory within 5% of the weights")
    ok = all((f >= 0.8 and lp / n >= 2.0) if T < 512 else lp / n >= 1.0 for T, n, lp, f in rows)
    ok = ok and abs(resident / weight_bytes - 1) <= 0.05
    print("all targets met" if ok else "some targets missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
