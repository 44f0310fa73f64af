"""How far each AdamW state layout drifts from AdamW in float64, on the same gradients.

Runs NumaAdamW in each of its layouts, and torch's fused AdamW and DeepSpeed's CPUAdam
(when installed) in theirs, for ``--steps`` steps on the parameter shapes of a small
transformer block, feeding every optimizer the same gradient sequence, and prints the
error of the final parameters against ``torch.optim.AdamW`` in float64 from the same
start: the largest absolute error, and the RMS error divided by the RMS of the update
the float64 run made (``p_N - p_0``), i.e. how much of the training signal is lost.

Run: ``python benchmarks/adamw_layout_accuracy.py [--steps 200] [--lr 1e-3]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from composer_numa import NumaAdamW

D = 256
SHAPES = [(3 * D, D), (3 * D,), (D, D), (D,), (4 * D, D), (4 * D,), (D, 4 * D), (D,), (D,), (D,)]


def grads(step: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    # a slowly varying mean under noise, like real gradients, scaled per tensor
    return [((torch.randn(s, generator=g) + 0.5 * torch.sin(torch.tensor(step / 20.0))) * 1e-2).to(dtype)
            for s in SHAPES]


def start(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(s, generator=g) * 0.02).to(dtype) for s in SHAPES]


def run(make: Callable, dtype: torch.dtype, steps: int) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(p.clone()) for p in start(dtype)]
    opt = make(params)
    for step in range(steps):
        for p, g in zip(params, grads(step, dtype), strict=True):
            p.grad = g
        opt.step()
    return [p.detach().double() for p in params]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    hyper = dict(lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    f32, b16 = torch.float32, torch.bfloat16
    rows: list[tuple[str, str, int, torch.dtype, Callable]] = [
        ("NumaAdamW", "fp32 p, m, v", 12, f32, lambda ps: NumaAdamW(ps, **hyper)),
        ("NumaAdamW", "fp32 p, bf16 m/v", 4 + 4, f32, lambda ps: NumaAdamW(ps, **hyper, state_dtype=b16)),
        ("NumaAdamW", "bf16 p + fp32 master, m, v", 2 + 12, b16, lambda ps: NumaAdamW(ps, **hyper)),
        ("NumaAdamW", "bf16 p, fp32 m/v", 2 + 8, b16,
         lambda ps: NumaAdamW(ps, **hyper, master_weights=False)),
        ("NumaAdamW", "bf16 p, bf16 m/v", 2 + 4, b16,
         lambda ps: NumaAdamW(ps, **hyper, master_weights=False, state_dtype=b16)),
        ("torch fused", "fp32 p, m, v", 12, f32, lambda ps: torch.optim.AdamW(ps, **hyper, fused=True)),
        ("torch fused", "bf16 p, bf16 m/v", 6, b16, lambda ps: torch.optim.AdamW(ps, **hyper, fused=True)),
    ]
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # type: ignore[import-not-found]

        rows.append(("DeepSpeed CPUAdam", "bf16 p, fp32 m/v", 2 + 8, b16,
                     lambda ps: DeepSpeedCPUAdam(ps, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                                 weight_decay=0.01, adamw_mode=True)))
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        print("DeepSpeed CPUAdam: not installed (skipped)")

    refs = {}
    for dtype in (f32, b16):  # float64 AdamW from the same (bf16-rounded) start, same gradients
        ps = [torch.nn.Parameter(p.double()) for p in start(dtype)]
        opt = torch.optim.AdamW(ps, **hyper)
        for step in range(args.steps):
            for p, g in zip(ps, grads(step, dtype), strict=True):
                p.grad = g.double()
            opt.step()
        refs[dtype] = ([p.detach() for p in ps], [p.double() for p in start(dtype)])

    print(f"{args.steps} steps, lr {args.lr}, {sum(torch.Size(s).numel() for s in SHAPES)} parameters; "
          "error of the final parameters vs AdamW in float64 on the same gradients")
    print(f"{'optimizer':18} {'layout':27} {'B/param kept':>12} {'max |err|':>10} {'rms err / rms update':>21}")
    for label, layout, kept, dtype, make in rows:
        got = run(make, dtype, args.steps)
        ref, p0 = refs[dtype]
        err = torch.cat([(a - b).flatten() for a, b in zip(got, ref, strict=True)])
        upd = torch.cat([(a - b).flatten() for a, b in zip(ref, p0, strict=True)])
        rel = float(err.square().mean().sqrt() / upd.square().mean().sqrt())
        print(f"{label:18} {layout:27} {kept:12d} {float(err.abs().max()):10.2e} {rel:21.2e}")
    print("B/param kept: parameter + optimizer state bytes per parameter (gradients not counted).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
