"""The GPU side of the offload layer: NumaAdamW's offload pipeline (pinned node-local host
buffers, bucketed copies on side streams) under what a Composer run does to it, and a
GPT-2-sized Composer run with the parameters on the GPU.

Every test here but the CPU run of the same harness is marked ``cuda`` and skips without a GPU;
``pytest -m cuda`` (or ``tests/cuda_checks.sh``, which also prints the GPU order) runs them.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("composer_numa._C", reason="the C++ extension is not built")

from composer_numa import NumaAdamW  # noqa: E402
from tests.offload.test_optim import HYPER, assert_same_trajectory  # noqa: E402


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))


def _train(models_opts, steps, device, microbatches=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        xs = [torch.randn(16, 64, generator=g).to(device) for _ in range(microbatches)]
        for model, opt in models_opts:
            opt.zero_grad()
            for x in xs:
                model(x).square().mean().backward()
            opt.step()


@pytest.mark.cuda
def test_optimizer_built_on_the_cpu_follows_the_model_to_the_gpu():
    """Composer's order: model and optimizer built on the CPU, then the Trainer moves the model."""
    a, b = _mlp(), _mlp()
    oa, ob = NumaAdamW(a.parameters(), **HYPER), torch.optim.AdamW(b.parameters(), **HYPER)
    _train([(a, oa), (b, ob)], 2, "cpu")
    assert not oa._offload
    a.cuda(), b.cuda()
    for opt in (oa, ob):  # what the Trainer's optimizer_to_device does (NumaAdamW copies into its buffers)
        for st in opt.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                st[k] = st[k].cuda()
    _train([(a, oa), (b, ob)], 3, "cuda")
    assert oa._offload and all(buf.exp_avg.is_pinned() and buf.param.is_pinned() for buf in oa._buffers)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert p.is_cuda and float(oa.state[p]["step"]) == 5.0
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # GPU matmuls: not bit-reproducible
        torch.testing.assert_close(oa.state[p]["exp_avg"], ob.state[q]["exp_avg"].cpu(), rtol=1e-5, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.parametrize("during_backward", [False, True])
def test_cuda_gradient_accumulation_with_bucketed_copies(during_backward):
    a = _mlp().cuda()
    b = copy.deepcopy(a)
    oa = NumaAdamW(a.parameters(), bucket_bytes=16 << 10, copy_during_backward=during_backward, **HYPER)
    ob = torch.optim.AdamW(b.parameters(), **HYPER)
    assert len(oa._units) > 2  # several buckets in flight
    _train([(a, oa), (b, ob)], 4, "cuda", microbatches=3)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_cuda_data_replacement_is_readopted():
    a = _mlp().cuda()
    b = copy.deepcopy(a)
    oa, ob = NumaAdamW(a.parameters(), **HYPER), torch.optim.AdamW(b.parameters(), **HYPER)
    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(p.shape, generator=g).cuda() for p in a.parameters()] for _ in range(6)]
    for step in range(6):
        if step == 3:
            new = torch.randn(a[2].weight.shape, generator=g).cuda()
            a[2].weight.data = new.clone()
            b[2].weight.data = new.clone()
        for p, q, grad in zip(a.parameters(), b.parameters(), grads[step], strict=True):
            p.grad, q.grad = grad.clone(), grad.clone()
        oa.step(), ob.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert_same_trajectory(p.cpu(), q.cpu(), steps=6)


@pytest.mark.cuda
def test_cuda_offload_buffers_sit_on_the_gpus_node():
    from composer_numa.machine.sysfs import discover

    model = _mlp().cuda()
    opt = NumaAdamW(model.parameters())
    gpus = discover().gpus
    index = torch.cuda.current_device()
    node = gpus[index].numa_node if index < len(gpus) else None
    for info in opt.placement():
        if node is not None and node >= 0:
            assert info["node"] == node
        assert set(info["pages_per_node"]) == {info["node"]}


# ------------------------------------------------------- GPT-2 in Composer --

def _lm_run(device, config, kind, steps=4, seed=0):
    """Train a GPT-2 (random init) with Composer for ``steps`` batches; returns the losses and
    the optimizer. The optimizer is built while the model is on the CPU, as usual."""
    from composer import Callback, Trainer
    from composer.models import ComposerModel
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import GPT2LMHeadModel

    class LM(ComposerModel):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, batch):
            return self.net(input_ids=batch[0]).logits

        def loss(self, outputs, batch):
            ids = batch[0]
            return torch.nn.functional.cross_entropy(outputs[:, :-1].reshape(-1, outputs.shape[-1]).float(),
                                                     ids[:, 1:].reshape(-1))

    losses = []

    class Record(Callback):
        def batch_end(self, state, logger):
            losses.append(float(state.loss))

    torch.manual_seed(seed)
    model = LM(GPT2LMHeadModel(config))
    if kind == "numa":
        opt = NumaAdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    ids = torch.randint(0, config.vocab_size, (steps * 4, 64), generator=torch.Generator().manual_seed(1))
    trainer = Trainer(model=model, train_dataloader=DataLoader(TensorDataset(ids), batch_size=4),
                      max_duration=f"{steps}ba", device=device, optimizers=opt, callbacks=[Record()],
                      precision="fp32", seed=seed, progress_bar=False, log_to_console=False, loggers=[])
    trainer.fit()
    return losses, opt, model


def _compare_runs(device, config, steps=4):
    numa_losses, opt, model = _lm_run(device, config, "numa", steps)
    torch_losses, _, _ = _lm_run(device, config, "torch", steps)
    assert len(numa_losses) == steps and numa_losses[0] == pytest.approx(torch_losses[0], rel=1e-6)
    # later steps start from parameters that differ by ulps (correctly rounded sqrt vs torch's)
    assert numa_losses == pytest.approx(torch_losses, rel=1e-4)
    assert all(float(st["step"]) == steps for st in opt.state.values())
    return opt, model


@pytest.mark.slow
def test_language_model_harness_on_the_cpu():
    """The GPT-2 harness below, at toy size on the CPU, so it is known to work before a GPU runs it."""
    from transformers import GPT2Config

    pytest.importorskip("transformers")
    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    opt, _ = _compare_runs("cpu", config)
    assert not opt._offload


@pytest.mark.cuda
@pytest.mark.slow
def test_gpt2_sized_composer_run_with_parameters_on_the_gpu():
    """GPT-2 small (124M parameters, 148 tensors) on the GPU, NumaAdamW stepping it from pinned
    host buffers, against torch's AdamW on the GPU."""
    pytest.importorskip("transformers")
    from transformers import GPT2Config

    config = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # the 124M model, random init
    opt, model = _compare_runs("gpu", config)
    params = list(model.parameters())
    assert len(params) == 148 and sum(p.numel() for p in params) > 120e6
    assert all(p.is_cuda for p in params) and opt._offload
    assert all(buf.exp_avg.is_pinned() for buf in opt._buffers)
