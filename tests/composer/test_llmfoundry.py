"""LLM Foundry: ``NumaAffinity`` and ``NumaAdamW`` are registered under its entry-point groups, so
its YAML names them (``callbacks: {numa_affinity: ...}``, ``optimizer: {name: numa_adamw}``).

The entry points are read from the installed metadata (``pip install -e .`` writes it). The
end-to-end test builds both from YAML through LLM Foundry's own builders and trains a tiny
model; it runs where ``llmfoundry`` imports: this interpreter, or the one named by
``COMPOSER_NUMA_LLMFOUNDRY_PYTHON`` (e.g. a venv made with ``--system-site-packages`` holding
``llm-foundry``, so that the project's torch and Composer stay as they are).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys

import pytest

from tests.composer.test_callback import ROOT, clean_env

GROUPS = {"llmfoundry_callbacks": ("numa_affinity", "NumaAffinity"),
          "llmfoundry_optimizers": ("numa_adamw", "NumaAdamW")}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_entry_points_resolve_and_load(group):
    try:
        dist = md.distribution("composer-numa")
    except md.PackageNotFoundError:
        pytest.skip("composer-numa is not installed (no metadata to read entry points from): pip install -e .")
    name, cls = GROUPS[group]
    found = {ep.name: ep for ep in md.entry_points(group=group) if ep.dist is None or ep.dist.name == dist.name}
    assert name in found, (f"no {name!r} in entry-point group {group!r}: the installed metadata is older than "
                           "pyproject.toml (run pip install -e . again)")
    import composer_numa

    assert found[name].load() is getattr(composer_numa, cls)


YAML = """
callbacks:
  numa_affinity:
    mode: exclusive
    memory: preferred
optimizer:
  name: numa_adamw
  lr: 0.01
  weight_decay: 0.0
"""

_SCRIPT = """
import json, sys
import torch
from omegaconf import OmegaConf
from composer import Trainer
from composer.loggers import InMemoryLogger
from composer.models import ComposerClassifier
from torch.utils.data import DataLoader, TensorDataset
from llmfoundry.utils.builders import build_callback, build_optimizer

cfg = OmegaConf.to_container(OmegaConf.create(sys.argv[1]), resolve=True)
callbacks = [build_callback(name, kwargs, cfg) for name, kwargs in cfg["callbacks"].items()]
torch.manual_seed(0)
x = torch.randn(96, 8)
y = (x.sum(1) > 0).long()
net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
model = ComposerClassifier(net, num_classes=2)
opt_cfg = dict(cfg["optimizer"])
optimizer = build_optimizer(model, opt_cfg.pop("name"), opt_cfg)
before = [p.detach().clone() for p in model.parameters()]
log = InMemoryLogger()
trainer = Trainer(model=model, train_dataloader=DataLoader(TensorDataset(x, y), batch_size=32),
                  max_duration="3ba", device="cpu", optimizers=optimizer, callbacks=callbacks, loggers=[log],
                  progress_bar=False, log_to_console=False)
trainer.fit()
print("RESULT " + json.dumps({
    "callbacks": [type(c).__module__ + "." + type(c).__name__ for c in callbacks],
    "mode": callbacks[0].options.mode.value,
    "optimizer": type(optimizer).__module__ + "." + type(optimizer).__name__,
    "lr": optimizer.param_groups[0]["lr"],
    "batches": int(trainer.state.timestamp.batch),
    "moved": all(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters())),
    "hparams": {k: v for k, v in log.hyperparameters.items() if k.startswith("numa/")},
}))
"""


def _foundry_python() -> str:
    return os.environ.get("COMPOSER_NUMA_LLMFOUNDRY_PYTHON") or sys.executable


@pytest.mark.slow
def test_llmfoundry_builds_both_from_yaml_and_trains():
    python = _foundry_python()
    probe = subprocess.run([python, "-c", "import llmfoundry, composer; print(llmfoundry.__version__, "
                            "composer.__version__)"], capture_output=True, text=True, env=clean_env(), cwd=ROOT,
                           timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"llm-foundry is not installed for {python} (set COMPOSER_NUMA_LLMFOUNDRY_PYTHON to a Python "
                    "that has it); see README, 'LLM Foundry'")
    proc = subprocess.run([python, "-c", _SCRIPT, YAML], capture_output=True, text=True, env=clean_env(), cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    assert r["callbacks"] == ["composer_numa.composer.callback.NumaAffinity"] and r["mode"] == "exclusive"
    assert r["optimizer"] == "composer_numa.offload.optim.NumaAdamW" and r["lr"] == 0.01
    assert r["batches"] == 3 and r["moved"]
    assert r["hparams"]["numa/bound_at"] == "callback" and r["hparams"]["numa/cpus"]
