"""A small Composer training run that reports each rank's NUMA binding.

A two-layer classifier learns a synthetic task for a few batches, on the GPU
when there is one (NCCL) and on the CPU otherwise (gloo). Each rank then prints
one ``composer-numa-example`` line with its local rank, CPU affinity, memory
policy and thread count (and, with ``--report-dir``, writes it as JSON), so the
binding from ``composer-numa launch`` / ``exec`` can be seen and tested.

Run it alone, under Composer's launcher, or bound::

    python examples/train.py
    composer -n 2 examples/train.py
    composer-numa launch -n 2 --numa-mode exclusive examples/train.py
    torchrun --nproc-per-node 2 --no-python composer-numa exec -- python examples/train.py

``--no-callback`` leaves out the ``NumaAffinity`` callback (in-process binding),
for comparing binding at birth with binding in the Trainer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="training batches (default: 8)")
    p.add_argument("--batch-size", type=int, default=32, help="per-rank batch size")
    p.add_argument("--hidden", type=int, default=64, help="hidden width of the model")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--callback", action=argparse.BooleanOptionalAction, default=True,
                   help="add composer_numa's NumaAffinity callback (default: on when available)")
    p.add_argument("--report-dir", default=None,
                   help="also write each rank's report to DIR/rank<global rank>.json")
    p.add_argument("--numa-mode", default="node",
                   help="the callback's CPU placement: node, socket, exclusive, core-complex, none")
    p.add_argument("--numa-memory", default="preferred",
                   help="the callback's memory policy: preferred, bind, interleave, local, none")
    p.add_argument("--worker-cores", type=int, default=0,
                   help="physical cores the callback reserves for DataLoader workers")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--optimizer", choices=["adamw", "numa-adamw"], default="adamw",
                   help="torch.optim.AdamW or composer_numa's NumaAdamW (node-local, fused)")
    return p.parse_args(argv)


def binding_report() -> dict:
    """This rank's binding as the kernel reports it (the main thread's)."""
    from composer_numa.binding import linux

    report: dict = {
        "pid": os.getpid(),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "affinity": sorted(os.sched_getaffinity(0)),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    try:
        mode, nodes = linux.get_mempolicy()
        report["memory_policy"] = linux.POLICY_NAMES.get(mode, str(mode))
        report["memory_nodes"] = list(nodes)
    except OSError as e:
        report["memory_policy"] = None
        report["memory_nodes"] = []
        report["memory_policy_error"] = str(e)
    raw = os.environ.get("COMPOSER_NUMA_BINDING")
    report["bound_at"] = json.loads(raw).get("bound_at") if raw else None
    return report


def numa_callbacks(enabled: bool, args: argparse.Namespace | None = None) -> list:
    """The NumaAffinity callback, when asked for and available in this version.

    Under ``composer-numa launch`` / ``exec`` it verifies the binding made at
    birth instead of binding again (``COMPOSER_NUMA_BINDING`` tells it).
    """
    if not enabled:
        return []
    try:
        from composer_numa.composer.callback import NumaAffinity
    except ModuleNotFoundError as e:
        if e.name != "composer_numa.composer.callback":
            raise
        print("composer-numa-example: NumaAffinity is not available; training without it",
              file=sys.stderr)
        return []
    if args is None:
        return [NumaAffinity()]
    return [NumaAffinity(mode=args.numa_mode, memory=args.numa_memory, worker_cores=args.worker_cores)]


def make_optimizer(name: str, model):
    """torch.optim.AdamW, or NumaAdamW (node-local buffers, fused step; offloads on GPU)."""
    import torch

    if name == "numa-adamw":
        from composer_numa import NumaAdamW

        return NumaAdamW(model.parameters(), lr=1e-2)
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # composer-numa's INFO lines (rank 0's table of every rank's binding) on stderr
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("composer_numa").setLevel(logging.INFO)
    import torch
    from composer import Trainer
    from composer.loggers import InMemoryLogger
    from composer.models import ComposerClassifier
    from composer.utils import dist
    from torch.utils.data import DataLoader, TensorDataset

    device = args.device
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"

    # Bind before the model and the data exist, so their memory is allocated on the rank's node.
    callbacks = numa_callbacks(args.callback, args)
    for callback in callbacks:
        callback.bind()
    torch.manual_seed(args.seed)
    features, classes = 16, 4
    x = torch.randn(args.batch_size * args.steps * 4, features)
    teacher = torch.randn(features, classes)
    y = (x @ teacher).argmax(dim=1)
    dataset = TensorDataset(x, y)
    loader = DataLoader(dataset, batch_size=args.batch_size,
                        sampler=dist.get_sampler(dataset, shuffle=True), drop_last=True,
                        num_workers=args.num_workers, persistent_workers=args.num_workers > 0)
    net = torch.nn.Sequential(
        torch.nn.Linear(features, args.hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(args.hidden, classes),
    )
    model = ComposerClassifier(net, num_classes=classes)
    numa_log = InMemoryLogger()  # the callback's numa/* hyperparameters and metrics go in the report
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        optimizers=make_optimizer(args.optimizer, model),
        max_duration=f"{args.steps}ba",
        device=device,
        callbacks=callbacks,
        loggers=[numa_log],
        progress_bar=False,
        log_to_console=False,
        seed=args.seed,
    )
    trainer.fit()

    report = binding_report()
    report.update(
        rank=dist.get_global_rank(),
        world_size=dist.get_world_size(),
        local_world_size=dist.get_local_world_size(),
        torch_num_threads=torch.get_num_threads(),
        device=device,
        batches=int(trainer.state.timestamp.batch),
        loss=float(trainer.state.loss) if trainer.state.loss is not None else None,
        numa={k: v for k, v in numa_log.hyperparameters.items() if k.startswith("numa/")},
        numa_metrics={k: v for k, v in numa_log.most_recent_values.items() if k.startswith("numa/")},
    )
    bindings = next((c.bindings for c in callbacks if getattr(c, "bindings", None) is not None), None)
    if bindings is not None:  # rank 0 of a job of several ranks: every rank's binding
        from composer_numa.report import merge

        report["numa_table"] = merge.to_json(bindings)
    line = json.dumps(report, sort_keys=True)
    print(f"composer-numa-example {line}", flush=True)
    if args.report_dir:
        os.makedirs(args.report_dir, exist_ok=True)
        path = os.path.join(args.report_dir, f"rank{report['rank']}.json")
        with open(path, "w") as f:
            f.write(line + "\n")
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
