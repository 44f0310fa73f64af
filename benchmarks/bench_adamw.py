"""NumaAdamW against torch's AdamW (fused, foreach) and DeepSpeed's CPUAdam.

Measures, in one run, the median step time of each optimizer on:

* one 64M-element fp32 tensor,
* GPT-2-124M's 148 parameter shapes in fp32,
* GPT-2-124M with bf16 parameters in three NumaAdamW layouts, each against the peer
  that keeps the same bytes: fp32 master + fp32 moments (28 B/param, ours only; the
  peers' own layouts are shown for reference), bf16 moments without master
  (``state_dtype=torch.bfloat16, master_weights=False``, 14 B, torch fused's layout)
  and fp32 moments without master (``master_weights=False``, 22 B, DeepSpeed's),
* 4096 tensors of 4096 elements,

prints ratios against NumaAdamW, and compares the bandwidth NumaAdamW reaches on the
big tensor with the extension's in-place 4-read/3-write probe (the optimizer's traffic:
read grad, m, v, param; write param, m, v) run by the same pinned workers on the same
node, interleaved with the optimizers in the same process.

Run: ``python benchmarks/bench_adamw.py [--repeats 5] [--rounds 5] [--no-foreach]``
(``pip install -e ".[bench]"`` brings DeepSpeed and ninja; CPUAdam JIT-builds on first
use). The machine may be shared: optimizers are interleaved round by round, times are
medians, and each ratio is the median over rounds of same-round ratios.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch

from composer_numa import NumaAdamW
from composer_numa.offload import memory, runtime
from composer_numa.offload.native import native

GPT2_LAYERS = 12
D, V, CTX = 768, 50257, 1024


def gpt2_shapes() -> list[tuple[int, ...]]:
    """The 148 parameter shapes of GPT-2-124M (Hugging Face layout)."""
    shapes: list[tuple[int, ...]] = [(V, D), (CTX, D)]
    for _ in range(GPT2_LAYERS):
        shapes += [(D,), (D,), (D, 3 * D), (3 * D,), (D, D), (D,), (D,), (D,),
                   (D, 4 * D), (4 * D,), (4 * D, D), (D,)]
    shapes += [(D,), (D,)]
    return shapes


def make_params(shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g).to(dtype))
        p.grad = (torch.randn(s, generator=g) * 1e-2).to(dtype)
        params.append(p)
    return params


def deepspeed_cpu_adam() -> Callable | None:
    """DeepSpeed's CPUAdam (fp32 moments, no master copy: bf16 parameters are updated in place);
    its first use JIT-builds the op (about a minute)."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return lambda ps: DeepSpeedCPUAdam(ps, lr=1e-3, weight_decay=0.01, adamw_mode=True)


# Bytes each layout must move per parameter and step: (reads, writes).
#   fp32:          grad, p, m, v in (16); p, m, v out (12)                               = 28
#   bf16 master:   grad 2, fp32 master, m, v in (14); master, m, v, bf16 p out (14)      = 28
#   bf16 no master, fp32 moments (DeepSpeed): grad 2, p 2, m, v in (12); p, m, v out (10) = 22
#   bf16 params and moments (torch fused with bf16 params): 8 in, 6 out                    = 14
LAYOUTS = {"fp32": 28, "bf16+master": 28, "bf16 p, fp32 m/v": 22, "bf16 p, bf16 m/v": 14}


def numa(**kw) -> Callable:
    return lambda ps: NumaAdamW(ps, lr=1e-3, weight_decay=0.01, **kw)


def torch_adamw(**kw) -> Callable:
    return lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, **kw)


def contenders(dtype: torch.dtype, layout: str, foreach: bool) -> list[tuple[str, Callable, str]]:
    """(label, maker, layout) per optimizer of one case; NumaAdamW first, in ``layout``.

    Each peer keeps its own layout; the like-with-like cases pick the NumaAdamW layout
    that moves the same bytes as the peer they are meant for."""
    ds = deepspeed_cpu_adam()
    ours = {"fp32": numa(), "bf16+master": numa(),
            "bf16 p, fp32 m/v": numa(master_weights=False),
            "bf16 p, bf16 m/v": numa(master_weights=False, state_dtype=torch.bfloat16)}[layout]
    out = [("NumaAdamW", ours, layout)]
    torch_layout = "fp32" if dtype == torch.float32 else "bf16 p, bf16 m/v"
    ds_layout = "fp32" if dtype == torch.float32 else "bf16 p, fp32 m/v"
    if layout in ("fp32", "bf16+master", torch_layout):
        out.append(("torch fused", torch_adamw(fused=True), torch_layout))
        if foreach:
            out.append(("torch foreach", torch_adamw(foreach=True), torch_layout))
    if ds is not None and layout in ("fp32", "bf16+master", ds_layout):
        out.append(("DeepSpeed CPUAdam", ds, ds_layout))
    return out


def time_steps(opt: torch.optim.Optimizer, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step()
        out.append(time.perf_counter() - t0)
    return out


def run_case(makers: list[tuple[str, Callable, str]], shapes: list[tuple[int, ...]], dtype: torch.dtype,
             rounds: int, repeats: int, probe: Callable[[], dict[str, float]] | None = None
             ) -> tuple[dict[str, float], dict[str, float], dict[str, list[float]]]:
    """Median step time per optimizer, the median over rounds of each peer's time divided by
    NumaAdamW's in the same round (robust to load that drifts between rounds), and with
    ``probe``, the probe bandwidths measured between the optimizers in every round."""
    opts = {}
    for label, make, _ in makers:
        opts[label] = make(make_params(shapes, dtype))
        opts[label].step()  # first step allocates state (torch) / adopts gradients (ours)
        opts[label].step()
    samples: dict[str, list[float]] = {k: [] for k in opts}
    ratios: dict[str, list[float]] = {k: [] for k in opts}
    probes: dict[str, list[float]] = {}
    for _ in range(rounds):
        this_round = {}
        for label, opt in opts.items():
            t = time_steps(opt, repeats)
            samples[label] += t
            this_round[label] = statistics.median(t)
        for label, t in this_round.items():
            ratios[label].append(t / this_round["NumaAdamW"])
        if probe is not None:
            for k, v in probe().items():
                probes.setdefault(k, []).append(v)
    del opts
    gc.collect()
    return ({k: statistics.median(v) for k, v in samples.items()},
            {k: statistics.median(v) for k, v in ratios.items()}, probes)


def bandwidth_probe(elements: int, passes: int) -> Callable[[], dict[str, float]]:
    """The extension's STREAM-style probes on this rank's first node, as GB/s."""
    c = native()
    pool = runtime.pool()
    node = pool.nodes()[0]

    def probe() -> dict[str, float]:
        out = {}
        for kernel in ("adamw", "triad"):
            with memory.reserved(4 * 4 * elements, [node]):
                r = c.bandwidth(pool, kernel, elements, node, node, passes + 1)
            out[kernel] = r["bytes_per_pass"] / statistics.median(r["seconds"][1:]) / 1e9
        return out

    return probe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per round (default 5)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--big", type=int, default=64 << 20, help="elements of the big tensor")
    ap.add_argument("--no-foreach", action="store_true", help="leave out torch's (slow) foreach AdamW")
    args = ap.parse_args()

    c = native()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads; "
          f"NumaAdamW: {runtime.pool().size} pinned workers on nodes {runtime.pool().nodes()}, "
          f"SIMD {c.simd_level()}, software prefetch fp32 {'on' if c.adamw_prefetch() else 'off'}, "
          f"bf16 {'on' if c.adamw_prefetch(False) else 'off'} ({'AMD' if c.cpu_features().get('amd') else 'not AMD'})")
    if deepspeed_cpu_adam() is None:
        print("DeepSpeed CPUAdam: not installed (skipped; pip install -e '.[bench]')")

    gpt2 = gpt2_shapes()
    cases = [
        (f"{args.big / 2**20:g}M fp32, 1 tensor", [(args.big,)], torch.float32, "fp32"),
        ("GPT-2 124M fp32, 148 tensors", gpt2, torch.float32, "fp32"),
        ("GPT-2 bf16, fp32 master (ours)", gpt2, torch.bfloat16, "bf16+master"),
        ("GPT-2 bf16, bf16 m/v, like torch", gpt2, torch.bfloat16, "bf16 p, bf16 m/v"),
        ("GPT-2 bf16, fp32 m/v, like DeepSpeed", gpt2, torch.bfloat16, "bf16 p, fp32 m/v"),
        ("4096 x 4096 fp32, 4096 tensors", [(4096,)] * 4096, torch.float32, "fp32"),
    ]
    rows = []
    probes: dict[str, list[float]] = {}
    for i, (name, shapes, dtype, layout) in enumerate(cases):
        makers = contenders(dtype, layout, not args.no_foreach)
        probe = bandwidth_probe(args.big, 3) if i == 0 else None
        times, ratios, probed = run_case(makers, shapes, dtype, args.rounds, args.repeats, probe)
        n = sum(torch.Size(s).numel() for s in shapes)
        rows.append((name, n, [(label, lay, times[label], ratios[label]) for label, _, lay in makers]))
        probes.update(probed)

    print()
    print(f"{'case':37} {'optimizer':18} {'layout':17} {'median ms':>9} {'B/param':>7} {'GB/s':>6} "
          f"{'speed-up':>8}")
    misses = []
    for name, n, entries in rows:
        for label, lay, t, ratio in entries:
            b = LAYOUTS[lay]
            r = "" if label == "NumaAdamW" else f"{ratio:.2f}x"
            print(f"{name:37} {label:18} {lay:17} {t * 1e3:9.1f} {b:7d} {b * n / t / 1e9:6.1f} {r:>8}")
            if label in ("torch fused", "DeepSpeed CPUAdam") and lay == entries[0][1] and ratio < 1.0:
                misses.append(f"{name} vs {label} {ratio:.2f}x")
    print("speed-up: the peer's step time / NumaAdamW's, median over rounds of same-round ratios "
          "(> 1: NumaAdamW faster). B/param: bytes the layout must move per parameter and step. "
          "Targets (>= 1.0x) apply where the peer has NumaAdamW's layout.")

    name0, big_n, entries0 = rows[0]
    big_t = entries0[0][2]
    achieved = 28 * big_n / big_t / 1e9
    med = {k: statistics.median(v) for k, v in probes.items()}
    print()
    print(f"bandwidth probe (same node, same {runtime.pool().size} pinned workers, {args.big} elements, "
          f"interleaved with the optimizers, {args.rounds} rounds): in-place 4-read/3-write median "
          f"{med['adamw']:.1f} GB/s (best {max(probes['adamw']):.1f}), STREAM triad median "
          f"{med['triad']:.1f} GB/s (best {max(probes['triad']):.1f})")
    print(f"NumaAdamW on the big tensor: {achieved:.1f} GB/s = {100 * achieved / med['adamw']:.0f}% of the "
          f"4R/3W probe's median ({100 * achieved / max(probes['adamw']):.0f}% of its best)")
    if achieved < 0.9 * med["adamw"]:
        misses.append(f"big tensor at {100 * achieved / med['adamw']:.1f}% of the probe (< 90%)")
    print("targets: " + ("all met" if not misses else "missed: " + "; ".join(misses)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
