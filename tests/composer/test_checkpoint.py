"""Composer checkpoints that move between NumaAdamW and torch.optim.AdamW: renamed on load by
the NumaAffinity callback, or converted by ``composer-numa checkpoint convert``; moments and step
counts arrive intact, and what cannot be carried over is said once.

The NumaAffinity run binds its process, so it runs in a subprocess
(``python -m tests.composer.test_checkpoint affinity DIR OUT.json``); the other tests install the
same load hook with a callback that binds nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("composer")
pytest.importorskip("composer_numa._C", reason="the C++ extension is not built")

from composer import Callback, Trainer  # noqa: E402
from composer.models import ComposerClassifier  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from composer_numa import NumaAdamW  # noqa: E402
from composer_numa.cli import main as cli_main  # noqa: E402
from composer_numa.composer import checkpoint  # noqa: E402
from tests.composer.test_callback import clean_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NAMES = {"numa": "NumaAdamW", "torch": "AdamW"}
LOST = "is not in the state_dict"


class Interchange(Callback):
    """The load hook of NumaAffinity, without the binding."""

    def before_load(self, state, logger):
        checkpoint.install(state)

    def after_load(self, state, logger):
        checkpoint.uninstall(state)


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    return ComposerClassifier(net.to(dtype), num_classes=4)


def _loader(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=g).to(dtype)
    return DataLoader(TensorDataset(x, (x.float().sum(1) > 0).long() + 2 * (x[:, 0] > 0).long()), batch_size=8)


def _optimizer(kind, model):
    cls = NumaAdamW if kind == "numa" else torch.optim.AdamW
    return cls(model.parameters(), lr=1e-2, weight_decay=0.05)


def _fit(kind, folder, *, load=None, callbacks=(), dtype=torch.float32):
    """Train to 4 batches (saving at 2 and 4) or resume from ``load``; returns the trainer and the
    warnings raised while it was built and trained."""
    model = _model(dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(model=model, train_dataloader=_loader(dtype), max_duration="4ba", device="cpu",
                          optimizers=_optimizer(kind, model), save_folder=None if load else str(folder),
                          save_interval="2ba", save_filename="ba{batch}.pt", save_overwrite=True,
                          load_path=None if load is None else str(load), callbacks=list(callbacks),
                          progress_bar=False, log_to_console=False, loggers=[])
        loaded = _state_by_name(trainer)
        trainer.fit()
    return trainer, loaded, [str(w.message) for w in caught]


def _state_by_name(trainer):
    opt = trainer.state.optimizers[0]
    return {name: {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
            for name, p in trainer.state.model.named_parameters() if p in opt.state}


def _saved(path, kind):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt["state"]["optimizers"][NAMES[kind]]["state"]


def _assert_same_state(loaded, saved, *, dtypes=None):
    assert sorted(loaded) == sorted(saved) and loaded
    for name, st in saved.items():
        got = loaded[name]
        assert float(got["step"]) == float(st["step"]) == 2.0, name
        for key in ("exp_avg", "exp_avg_sq"):
            want = st[key] if dtypes is None else st[key].to(dtypes)
            assert torch.equal(got[key], want), f"{name}: {key} differs"


def _lost(said):
    """Composer's warnings that an optimizer's state was not restored (not those about callbacks)."""
    return [m for m in said if LOST in m and m.split()[0] in NAMES.values()]


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.state.model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("saved,resumed", [("numa", "torch"), ("torch", "numa")])
def test_resuming_with_the_other_optimizer_keeps_moments_and_step_counts(tmp_path, saved, resumed):
    straight, _, _ = _fit(saved, tmp_path)
    resumed_run, loaded, said = _fit(resumed, tmp_path, load=tmp_path / "ba2.pt", callbacks=[Interchange()])
    assert not _lost(said)
    assert isinstance(resumed_run.state.optimizers[0], NumaAdamW if resumed == "numa" else torch.optim.AdamW)
    _assert_same_state(loaded, _saved(tmp_path / "ba2.pt", saved))
    # and training goes on as if it had never stopped
    for name, p in _params(resumed_run).items():
        torch.testing.assert_close(p, _params(straight)[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_without_the_hook_composer_drops_the_state(tmp_path):
    _fit("numa", tmp_path)
    _, loaded, said = _fit("torch", tmp_path, load=tmp_path / "ba2.pt")
    assert _lost(said) == [f"AdamW {LOST}. Its state will not be restored."]
    assert not loaded  # torch's AdamW starts empty: this is what the hook and the command prevent


@pytest.mark.slow
def test_convert_command_then_a_plain_run_resumes(tmp_path, capsys):
    _fit("numa", tmp_path, dtype=torch.bfloat16)
    out = tmp_path / "for-torch.pt"
    assert cli_main(["checkpoint", "convert", str(tmp_path / "ba2.pt"), str(out), "--to", "torch"]) == 0
    printed = capsys.readouterr()
    assert "NumaAdamW -> AdamW: optimizer state of 4 parameter(s)" in printed.out
    assert printed.err.count("dropped the fp32 master weights of 4 bf16 parameter(s)") == 1
    saved = _saved(tmp_path / "ba2.pt", "numa")
    converted = _saved(out, "torch")
    assert all("master_param" in st for st in saved.values())
    assert not any("master_param" in st for st in converted.values())
    _, loaded, said = _fit("torch", tmp_path, load=out, dtype=torch.bfloat16)
    assert not _lost(said)
    _assert_same_state(loaded, saved, dtypes=torch.bfloat16)  # torch keeps moments in the parameter dtype

    back = tmp_path / "for-numa.pt"
    assert cli_main(["checkpoint", "convert", str(out), str(back), "--to", "numa"]) == 0
    _, loaded, said = _fit("numa", tmp_path, load=back, dtype=torch.bfloat16)
    assert not _lost(said)
    _assert_same_state(loaded, converted)


def test_convert_optimizers_renames_in_place_and_says_what_it_drops():
    t = torch.zeros(3)
    numa = {"NumaAdamW": {"state": {"w": {"step": t, "exp_avg": t, "exp_avg_sq": t, "master_param": t},
                                    "b": {"step": t, "exp_avg": t, "exp_avg_sq": t}},
                          "param_groups": [{"lr": 1.0, "params": ["w", "b"]}]}}
    with pytest.warns(UserWarning, match="master weights of 1 bf16"):
        assert checkpoint.convert_optimizers(numa, "torch") == "NumaAdamW"
    assert list(numa) == ["AdamW"] and "master_param" not in numa["AdamW"]["state"]["w"]
    assert checkpoint.convert_optimizers(numa, "torch") is None  # already there
    assert checkpoint.convert_optimizers(numa, "numa") == "AdamW" and list(numa) == ["NumaAdamW"]
    for bad, words in (({"DecoupledAdamW": {}}, "found: DecoupledAdamW"),
                       ({"AdamW": {}, "SGD": {}, "Adam": {}}, "not an optimizer state dict"),
                       ([("AdamW", {})], "not Composer's")):
        with pytest.raises(checkpoint.CheckpointError, match=words):
            checkpoint.convert_optimizers(bad, "numa")
    with pytest.raises(checkpoint.CheckpointError, match="'torch' or 'numa'"):
        checkpoint.convert_optimizers({}, "jax")


def test_remap_leaves_other_optimizers_to_composer():
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    state = {"optimizers": {"NumaAdamW": {"state": {}, "param_groups": []}}}
    checkpoint.remap_for([sgd], state)
    assert list(state["optimizers"]) == ["NumaAdamW"]  # Composer then warns that SGD's state is absent


def test_convert_command_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "not-composer.pt"
    torch.save({"model": {}}, bad)
    for args, words in (([str(tmp_path / "missing.pt")], "no such file"),
                        ([str(bad)], "not a Composer checkpoint"),
                        ([str(tmp_path)], "a directory")):
        assert cli_main(["checkpoint", "convert", *args, str(tmp_path / "out.pt"), "--to", "numa"]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1


# --------------------------------------------------------- NumaAffinity --

def _affinity_scenario(folder: str, out: str) -> None:
    from composer_numa import NumaAffinity

    folder = Path(folder)
    _fit("numa", folder)
    _, loaded, said = _fit("torch", folder, load=folder / "ba2.pt", callbacks=[NumaAffinity(log_locality=False)])
    saved = _saved(folder / "ba2.pt", "numa")
    same = all(torch.equal(loaded[n][k], saved[n][k]) for n in saved for k in ("exp_avg", "exp_avg_sq"))
    Path(out).write_text(json.dumps({"lost": _lost(said), "names": sorted(loaded),
                                     "saved": sorted(saved), "same": same,
                                     "steps": sorted({float(st["step"]) for st in loaded.values()})}))


@pytest.mark.slow
def test_numa_affinity_renames_the_state_on_load(tmp_path):
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "tests.composer.test_checkpoint", "affinity", str(tmp_path), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    assert got["lost"] == [] and got["names"] == got["saved"] and got["names"]
    assert got["same"] and got["steps"] == [2.0]


if __name__ == "__main__":
    if sys.argv[1] == "affinity":
        _affinity_scenario(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown scenario {sys.argv[1]!r}")
