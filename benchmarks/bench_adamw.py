"""NumaAdamW against torch's AdamW (fused, foreach) and DeepSpeed's CPUAdam.

Measures, in one run, the median step time of each optimizer on:

* one 64M-element fp32 tensor,
* GPT-2-124M's 148 parameter shapes in fp32, and with bf16 parameters
  (NumaAdamW keeps fp32 master weights and fp32 moments; torch keeps bf16 ones),
* 4096 tensors of 4096 elements,

prints ratios against NumaAdamW, and compares the achieved bandwidth
(28 bytes per fp32 parameter: read grad, m, v, param; write param, m, v) with
the extension's STREAM-style probe of the same traffic on the same node.

Run: ``python benchmarks/bench_adamw.py [--repeats 7] [--rounds 3]``. The
machine may be shared: every figure is a median over rounds x repeats, with
the optimizers interleaved round by round.
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
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return lambda ps: DeepSpeedCPUAdam(ps, lr=1e-3, weight_decay=0.01, adamw_mode=True)


def peers(dtype: torch.dtype) -> dict[str, Callable]:
    out: dict[str, Callable] = {
        "NumaAdamW": lambda ps: NumaAdamW(ps, lr=1e-3, weight_decay=0.01),
        "torch fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True),
        "torch foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01,
                                                      foreach=True),
    }
    ds = deepspeed_cpu_adam()
    if ds is not None:
        out["DeepSpeed CPUAdam"] = ds
    return out


def bytes_per_param(label: str, dtype: torch.dtype) -> int:
    """Minimum memory traffic of one step, per parameter."""
    if dtype == torch.float32:
        return 28
    if label == "NumaAdamW":  # bf16 grad in, bf16 param out, fp32 master, m, v in and out
        return 2 + 2 + 3 * 8
    return 14  # bf16 param, grad, m, v in; param, m, v out


def time_steps(opt: torch.optim.Optimizer, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step()
        out.append(time.perf_counter() - t0)
    return out


def run_case(name: str, shapes: list[tuple[int, ...]], dtype: torch.dtype, rounds: int,
             repeats: int, probe: Callable[[], dict[str, float]] | None = None
             ) -> tuple[dict[str, float], dict[str, float]]:
    """Median step time per optimizer; with ``probe``, also the median probe bandwidth,
    measured between the optimizers in every round (the machine may be shared)."""
    makers = peers(dtype)
    opts = {}
    for label, make in makers.items():
        opts[label] = make(make_params(shapes, dtype))
        opts[label].step()  # first step allocates state (torch) / adopts gradients (ours)
        opts[label].step()
    samples: dict[str, list[float]] = {k: [] for k in opts}
    probes: dict[str, list[float]] = {}
    for _ in range(rounds):
        for label, opt in opts.items():
            samples[label] += time_steps(opt, repeats)
        if probe is not None:
            for k, v in probe().items():
                probes.setdefault(k, []).append(v)
    del opts
    gc.collect()
    return ({k: statistics.median(v) for k, v in samples.items()},
            {k: statistics.median(v) for k, v in probes.items()})


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
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--big", type=int, default=64 << 20, help="elements of the big tensor")
    args = ap.parse_args()

    c = native()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads; "
          f"NumaAdamW: {runtime.pool().size} pinned workers on nodes {runtime.pool().nodes()}, "
          f"SIMD {c.simd_level()}")
    if deepspeed_cpu_adam() is None:
        print("DeepSpeed CPUAdam: not installed (skipped)")

    cases = [
        ("64M fp32, 1 tensor", [(args.big,)], torch.float32),
        ("GPT-2 124M fp32, 148 tensors", gpt2_shapes(), torch.float32),
        ("GPT-2 124M bf16 params, 148 tensors", gpt2_shapes(), torch.bfloat16),
        ("4096 x 4096 fp32, 4096 tensors", [(4096,)] * 4096, torch.float32),
    ]
    results = {}
    probe_gbs: dict[str, float] = {}
    for i, (name, shapes, dtype) in enumerate(cases):
        probe = bandwidth_probe(args.big, 3) if i == 0 else None
        times, probed = run_case(name, shapes, dtype, args.rounds, args.repeats, probe)
        results[name] = (times, sum(torch.Size(s).numel() for s in shapes))
        probe_gbs.update(probed)

    print()
    print(f"{'case':38} {'optimizer':18} {'median ms':>10} {'B/param':>8} {'GB/s':>6} "
          f"{'NumaAdamW speed-up':>19}")
    for (name, _, dtype), (times, n) in zip(cases, results.values(), strict=True):
        ours = times["NumaAdamW"]
        for label, t in times.items():
            b = bytes_per_param(label, dtype)
            ratio = "" if label == "NumaAdamW" else f"{t / ours:.2f}x"
            print(f"{name:38} {label:18} {t * 1e3:10.1f} {b:8d} {b * n / t / 1e9:6.1f} "
                  f"{ratio:>19}")
    print("B/param: bytes each optimizer must move per parameter and step (fp32: grad, m, v, "
          "param in; param, m, v out). With bf16 parameters NumaAdamW keeps fp32 master weights "
          "and moments (28 B), torch keeps bf16 moments (14 B).")

    big_t, big_n = results[cases[0][0]][0]["NumaAdamW"], results[cases[0][0]][1]
    achieved = 28 * big_n / big_t / 1e9
    print()
    print(f"bandwidth probe (same node, {runtime.pool().size} workers, median over rounds): in-place "
          f"4-read/3-write {probe_gbs['adamw']:.1f} GB/s, STREAM triad {probe_gbs['triad']:.1f} GB/s")
    print(f"NumaAdamW on the big tensor: {achieved:.1f} GB/s = "
          f"{100 * achieved / probe_gbs['adamw']:.0f}% of the 4R/3W probe, "
          f"{100 * achieved / probe_gbs['triad']:.0f}% of triad")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
