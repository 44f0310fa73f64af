"""NumaExperts checkpoints that do not depend on the node layout (dense ``gate_up_proj`` /
``down_proj`` in the state dict, packed again on load), through ``torch.save``, torch's
distributed-checkpoint helpers (what Composer uses) and DDP's key prefixes; and slice plans
that share the rows evenly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from composer_numa.offload.experts import _ALIGN, NumaExperts, _plan
from tests.offload.test_experts import dense_weights, reference, rel_err, routing

E, H, I = 6, 40, 70  # noqa: E741 - hidden padded to 64, intermediate to 96: padding in every slice plan
LAYOUTS = [([0], "split"), ([0, 0], "split"), ([0, 0, 0], "split"), ([0, 0], "replicate"), ([0, 0], "by-expert")]


def _tol(dtype):
    return 2e-2 if dtype == torch.bfloat16 else 2e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_dict_holds_dense_weights_under_transformers_names(dtype):
    dense = dense_weights(dtype, seed=4, e=E, h=H, i=I)
    layer = NumaExperts.from_dense(*dense, nodes=[0, 0])
    sd = layer.state_dict()
    assert list(sd) == ["gate_up_proj", "down_proj"]
    assert sd["gate_up_proj"].shape == (E, 2 * I, H) and sd["down_proj"].shape == (E, H, I)
    assert torch.equal(sd["gate_up_proj"], torch.cat(dense[:2], dim=1)) and torch.equal(sd["down_proj"], dense[2])
    assert torch.equal(layer.gate_up_proj, sd["gate_up_proj"]) and torch.equal(layer.down_proj, sd["down_proj"])
    assert [n for n, _ in layer.named_parameters()] == ["w13_0", "w2_0", "w13_1", "w2_1"]  # what optimizers see


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("saved", LAYOUTS, ids=lambda x: f"{x[1]}-{len(x[0])}")
@pytest.mark.parametrize("loaded", LAYOUTS, ids=lambda x: f"{x[1]}-{len(x[0])}")
def test_checkpoint_from_one_layout_loads_on_another(tmp_path, dtype, saved, loaded):
    dense = dense_weights(dtype, seed=5, e=E, h=H, i=I)
    src = NumaExperts.from_dense(*dense, nodes=saved[0], placement=saved[1])
    torch.save(src.state_dict(), tmp_path / "experts.pt")
    dst = NumaExperts(E, H, I, dtype=dtype, nodes=loaded[0], placement=loaded[1], init=False)
    assert dst.load_state_dict(torch.load(tmp_path / "experts.pt")) is not None  # strict: no missing or unexpected
    assert all(torch.equal(a, b) for a, b in zip(dst.to_dense(), dense, strict=True))
    ids, w = routing(33, 2, e=E, seed=7)
    x = torch.randn(33, H, generator=torch.Generator().manual_seed(8)).to(dtype)
    same_layout = NumaExperts.from_dense(*dense, nodes=loaded[0], placement=loaded[1])
    assert torch.equal(dst(x, ids, w), same_layout(x, ids, w))  # exactly what that layout computes
    ref = reference(x, ids, w, *dense)
    assert rel_err(dst(x, ids, w), ref) <= _tol(dtype) and rel_err(src(x, ids, w), ref) <= _tol(dtype)


def test_two_slices_then_one_slice_gives_the_same_training_state():
    """The issue's case: written by a layer with two slices, read by one with a single slice."""
    dense = dense_weights(torch.bfloat16, seed=6, e=8, h=64, i=96)
    two = NumaExperts.from_dense(*dense, nodes=[0, 0])
    assert len(two.w13) == 2
    one = NumaExperts(8, 64, 96, dtype=torch.bfloat16, nodes=[0])
    one.load_state_dict(two.state_dict())
    ids, w = routing(16, 2, e=8)
    x = torch.randn(16, 64).bfloat16()
    torch.testing.assert_close(one(x, ids, w).float(), two(x, ids, w).float(), rtol=2**-7, atol=1e-3)
    for a, b in zip(one.to_dense(), two.to_dense(), strict=True):
        assert torch.equal(a, b)


def test_torch_distributed_checkpoint_helpers_round_trip():
    """Composer saves and loads models through torch.distributed.checkpoint.state_dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    dense = dense_weights(torch.float32, seed=9, e=E, h=H, i=I)
    model = nn.Sequential(nn.Linear(H, H), NumaExperts.from_dense(*dense, nodes=[0, 0]))
    sd = get_model_state_dict(model)
    assert set(sd) == {"0.weight", "0.bias", "1.gate_up_proj", "1.down_proj"}
    other = nn.Sequential(nn.Linear(H, H), NumaExperts(E, H, I, dtype=torch.float32, nodes=[0], init=False))
    set_model_state_dict(other, sd, options=StateDictOptions(strict=True))
    assert all(torch.equal(a, b) for a, b in zip(other[1].to_dense(), dense, strict=True))


def test_ddp_checkpoint_written_with_two_slices_loads_with_one(tmp_path):
    """Under DDP torch's helpers save keys without ``module.`` and put it back on load only for
    parameters and buffers: the layer's empty buffers under the dense names make that happen."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP

    dense = dense_weights(torch.float32, seed=11, e=E, h=H, i=I)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        src = DDP(nn.Sequential(nn.Linear(H, H), NumaExperts.from_dense(*dense, nodes=[0, 0])))
        sd = get_model_state_dict(src)
        assert set(sd) == {"0.weight", "0.bias", "1.gate_up_proj", "1.down_proj"}
        dst = DDP(nn.Sequential(nn.Linear(H, H), NumaExperts(E, H, I, dtype=torch.float32, nodes=[0], init=False)))
        set_model_state_dict(dst, sd, options=StateDictOptions(strict=False))
        assert all(torch.equal(a, b) for a, b in zip(dst.module[1].to_dense(), dense, strict=True))
    finally:
        dist.destroy_process_group()


def test_earlier_packed_checkpoints_load_on_their_layout_and_fail_clearly_elsewhere():
    dense = dense_weights(torch.float32, seed=12, e=E, h=H, i=I)
    src = NumaExperts.from_dense(*dense, nodes=[0, 0])
    packed = {n: p.detach().clone() for n, p in src.named_parameters()}  # w13_0, w2_0, w13_1, w2_1
    same = NumaExperts(E, H, I, dtype=torch.float32, nodes=[0, 0], init=False)
    same.load_state_dict(packed)
    assert all(torch.equal(a, b) for a, b in zip(same.to_dense(), dense, strict=True))
    one = NumaExperts(E, H, I, dtype=torch.float32, nodes=[0], init=False)
    with pytest.raises(RuntimeError, match="from another node layout"):
        one.load_state_dict({k: v for k, v in packed.items() if k.endswith("_0")})


def test_wrong_sizes_missing_and_unexpected_keys_are_reported():
    layer = NumaExperts(E, H, I, dtype=torch.float32, init=False)
    sd = NumaExperts(E, H, I + 32, dtype=torch.float32).state_dict()
    with pytest.raises(RuntimeError, match=r"size mismatch for gate_up_proj.*\(6, 140, 40\)"):
        layer.load_state_dict(sd)
    result = layer.load_state_dict({"down_proj": torch.zeros(E, H, I), "extra": torch.zeros(1)}, strict=False)
    assert result.missing_keys == ["gate_up_proj"] and result.unexpected_keys == ["extra"]
    with pytest.raises(RuntimeError, match='Unexpected key.*"extra"'):
        layer.load_state_dict({**layer.state_dict(), "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"down must be \[6, 40, 70\]"):
        layer.load_dense(torch.zeros(E, I, H), torch.zeros(E, I, H), torch.zeros(E, I, H))


# ------------------------------------------------------------ slice plans --

def test_split_shares_differ_by_at_most_one_alignment_unit():
    """Rows per slice are multiples of the kernel's 32-row alignment (an AMX k-tile of the down
    projection), so I=96 over two slices is 32 + 64: as even as 32-row units allow."""
    assert [s.rows for s in _plan(8, 96, [0, 0], "split")] == [32, 64]
    for inter in (1, 31, 32, 33, 96, 100, 1408, 14336):
        for n in range(1, 10):
            padded = -(-inter // _ALIGN) * _ALIGN
            split = _plan(8, inter, list(range(n)), "split")
            rows = [s.rows for s in split]
            assert sum(rows) == padded and max(rows) - min(rows) <= _ALIGN, (inter, n, rows)
            assert len(split) == min(n, padded // _ALIGN)
            computed = [s.row1 - s.row0 for s in _plan(8, inter, list(range(n)), "replicate")]
            assert sum(computed) == padded and max(computed) - min(computed) <= _ALIGN, (inter, n, computed)
    for experts in (1, 5, 8, 64, 160):
        for n in range(1, 10):
            counts = [len(s.experts) for s in _plan(experts, 96, list(range(n)), "by-expert")]
            assert sum(counts) == experts and max(counts) - min(counts) <= 1
