"""NumaExperts in place of the experts of ``transformers`` MoE blocks (Mixtral, Qwen2-MoE,
Qwen3-MoE, DeepSeek-V3; tiny random configs, nothing downloaded): the swapped block gives the
original's outputs and gradients, as accurately as the original's own float32 run against
float64, and weights go back with ``to_hf``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from composer_numa.offload import hf  # noqa: E402
from composer_numa.offload.experts import NumaExperts  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps


def _blocks():
    from transformers import DeepseekV3Config, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    return {
        "mixtral": lambda: MixtralSparseMoeBlock(MixtralConfig(
            hidden_size=64, intermediate_size=96, num_local_experts=6, num_experts_per_tok=2)),
        "qwen2-moe": lambda: Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(
            hidden_size=64, moe_intermediate_size=96, num_experts=6, num_experts_per_tok=2,
            shared_expert_intermediate_size=64)),
        "qwen3-moe": lambda: Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(
            hidden_size=64, moe_intermediate_size=96, num_experts=6, num_experts_per_tok=3, norm_topk_prob=True)),
        "deepseek-v3": lambda: DeepseekV3MoE(DeepseekV3Config(
            hidden_size=64, moe_intermediate_size=96, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
            topk_group=1, n_shared_experts=1)),
    }


def _random_block(name, seed=0):
    torch.manual_seed(seed)
    block = _blocks()[name]()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.15)
    return block


def _run(block, x, grad_out):
    x = x.clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    out = block(x)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), x.grad


def _assert_as_accurate(ours, theirs, ref, what):
    """Our float32 result is as close to float64 as transformers' own float32 block is: at most
    twice its error, plus a few ulps of the largest value (different summation orders)."""
    ref = ref.double()
    ours_err = float((ours.double() - ref).abs().max())
    their_err = float((theirs.double() - ref).abs().max())
    tol = 2 * their_err + 4 * EPS32 * float(ref.abs().max())
    assert ours_err <= tol, f"{what}: error {ours_err:.3g} vs float64, transformers' own {their_err:.3g}"


def _expert_grads(block):
    if isinstance(block.experts, NumaExperts):
        gate, up, down = block.experts.dense_grads()
        return torch.cat((gate, up), dim=1), down
    return block.experts.gate_up_proj.grad, block.experts.down_proj.grad


@pytest.mark.parametrize("nodes", [[0], [0, 0]], ids=["one-slice", "two-slices"])
@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v3"])
def test_swapped_block_matches_outputs_and_gradients(name, nodes):
    original = _random_block(name)
    swapped = copy.deepcopy(original)
    swapped.experts = NumaExperts.from_hf(original.experts, nodes=nodes)
    assert swapped.experts.dtype == torch.float32
    reference = copy.deepcopy(original).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 64, generator=g)
    grad_out = torch.randn(3, 7, 64, generator=g)

    out_t, dx_t = _run(original, x, grad_out)
    out_n, dx_n = _run(swapped, x, grad_out)
    out_r, dx_r = _run(reference, x.double(), grad_out.double())
    _assert_as_accurate(out_n, out_t, out_r, "output")
    _assert_as_accurate(dx_n, dx_t, dx_r, "input gradient")
    # every other parameter (router, shared experts) gets the same gradient as in the original
    for (pname, p_n), p_t, p_r in zip(
            ((n, p) for n, p in swapped.named_parameters() if not n.startswith("experts.")),
            (p for n, p in original.named_parameters() if not n.startswith("experts.")),
            (p for n, p in reference.named_parameters() if not n.startswith("experts.")), strict=True):
        _assert_as_accurate(p_n.grad, p_t.grad, p_r.grad, f"gradient of {pname}")
    for what, a, b, c in zip(("gate_up_proj", "down_proj"), _expert_grads(swapped), _expert_grads(original),
                             _expert_grads(reference), strict=True):
        _assert_as_accurate(a, b, c, f"gradient of experts.{what}")


@pytest.mark.parametrize("name", ["mixtral", "deepseek-v3"])
def test_to_hf_writes_the_weights_back(name):
    block = _random_block(name, seed=2)
    layer = NumaExperts.from_hf(block.experts, nodes=[0, 0])
    with torch.no_grad():
        gate, up, down = layer.to_dense()
        layer.load_dense(gate * 2, up - 1, down + 0.5)  # as if trained
    target = _random_block(name, seed=3).experts
    assert layer.to_hf(target) is target
    assert torch.equal(target.gate_up_proj, torch.cat((gate * 2, up - 1), dim=1))
    assert torch.equal(target.down_proj, down + 0.5)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("nodes", [[0], [0, 0]], ids=["one-slice", "two-slices"])
def test_int8_from_hf_matches_its_dequantized_weights(nodes):
    """``weight_dtype="int8"`` goes through the quantizer: the swapped block's output and gradients
    (x, router) match a float64 block holding ``dequantize()``'s weights."""
    from composer_numa.offload.experts import QuantizedNumaExperts

    original = _random_block("mixtral")
    swapped = copy.deepcopy(original)
    swapped.experts = NumaExperts.from_hf(original.experts, weight_dtype="int8", nodes=nodes)
    layer = swapped.experts
    assert isinstance(layer, QuantizedNumaExperts) and not list(layer.parameters())
    assert (layer.weight_dtype, layer.group_size, layer.dtype) == ("int8", None, torch.float32)
    gate, up, down = layer.dequantize()
    # the weights were quantized (per output row, fp16 scale max|row| / 127): off by about half a step
    orig_gu, orig_down = original.experts.gate_up_proj.detach(), original.experts.down_proj.detach()
    for deq, orig in ((torch.cat((gate, up), dim=1), orig_gu), (down, orig_down)):
        step = orig.abs().amax(-1, keepdim=True) / 127
        assert not torch.equal(deq, orig)
        assert bool(((deq - orig).abs() <= 0.51 * step).all())
    reference = copy.deepcopy(original).double()
    assert reference.experts.is_concatenated and not reference.experts.is_transposed
    with torch.no_grad():
        reference.experts.gate_up_proj.copy_(torch.cat((gate, up), dim=1))
        reference.experts.down_proj.copy_(down)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 64, generator=g)
    grad_out = torch.randn(3, 7, 64, generator=g)
    out_n, dx_n = _run(swapped, x, grad_out)
    out_r, dx_r = _run(reference, x.double(), grad_out.double())
    # tests/offload/test_experts_quant.py's float32 bound: activations in int16 per block of <= 128
    # (sqrt(128) * 2^-16 = 1.7e-4 a block), two quantized stages, fp32 sums, x3 for the matrices' gain
    tol = 1e-3
    errs = {"output": _rel(out_n, out_r), "input gradient": _rel(dx_n, dx_r),
            "router gradient": _rel(swapped.gate.weight.grad, reference.gate.weight.grad)}
    assert all(v <= tol for v in errs.values()), errs


def test_whole_model_swap_keeps_state_dict_names_and_logits():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    original = MixtralForCausalLM(config).eval()
    swapped = copy.deepcopy(original)
    names = hf.replace_experts(NumaExperts, swapped)
    assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert hf.replace_experts(NumaExperts, swapped) == []  # already swapped
    assert list(swapped.state_dict()) == list(original.state_dict())  # a transformers checkpoint loads as is
    fresh = copy.deepcopy(original)
    hf.replace_experts(NumaExperts, fresh, nodes=[0, 0])
    for m in fresh.modules():
        if isinstance(m, NumaExperts):
            m.load_dense(*(torch.zeros_like(t) for t in m.to_dense()))
    fresh.load_state_dict(original.state_dict())
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = copy.deepcopy(original).double()
        ref = reference(ids).logits
        theirs = original(ids).logits
        for model in (swapped, fresh):
            _assert_as_accurate(model(ids).logits, theirs, ref, "logits")


class _FusedExperts(nn.Module):
    """A fused experts module in the other layouts transformers' decorator describes."""

    def __init__(self, e, h, i, *, concatenated=True, transposed=False, act=None):
        super().__init__()
        self.is_concatenated, self.is_transposed = concatenated, transposed
        self.has_gate, self.has_bias = True, False
        shape_gu, shape_d = ((e, h, 2 * i), (e, i, h)) if transposed else ((e, 2 * i, h), (e, h, i))
        g = torch.Generator().manual_seed(5)
        self.gate_up_proj = nn.Parameter(torch.randn(shape_gu, generator=g))
        self.down_proj = nn.Parameter(torch.randn(shape_d, generator=g))
        self.act_fn = act if act is not None else nn.SiLU()

    def dense(self):
        gu, d = self.gate_up_proj.detach(), self.down_proj.detach()
        if self.is_transposed:
            gu, d = gu.transpose(1, 2), d.transpose(1, 2)
        i = gu.shape[1] // 2
        return (gu[:, :i], gu[:, i:], d) if self.is_concatenated else (gu[:, 0::2], gu[:, 1::2], d)


@pytest.mark.parametrize("concatenated,transposed", [(True, False), (False, False), (True, True), (False, True)])
def test_interleaved_and_transposed_layouts_round_trip(concatenated, transposed):
    src = _FusedExperts(3, 40, 24, concatenated=concatenated, transposed=transposed)
    layer = NumaExperts.from_hf(src)
    assert all(torch.equal(a, b) for a, b in zip(layer.to_dense(), src.dense(), strict=True))
    dst = _FusedExperts(3, 40, 24, concatenated=concatenated, transposed=transposed)
    with torch.no_grad():
        dst.gate_up_proj.zero_(), dst.down_proj.zero_()
    layer.to_hf(dst)
    assert torch.equal(dst.gate_up_proj, src.gate_up_proj) and torch.equal(dst.down_proj, src.down_proj)


def test_module_list_experts_of_older_transformers():
    class MLP(nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.gate_proj, self.up_proj = nn.Linear(40, 24, bias=False), nn.Linear(40, 24, bias=False)
            self.down_proj = nn.Linear(24, 40, bias=False)
            self.act_fn = nn.SiLU()

    experts = nn.ModuleList(MLP(s) for s in range(4))
    layer = NumaExperts.from_hf(experts, dtype=torch.float32)
    gate, up, down = layer.to_dense()
    for e, m in enumerate(experts):
        assert torch.equal(gate[e], m.gate_proj.weight) and torch.equal(down[e], m.down_proj.weight)
    back = nn.ModuleList(MLP(s + 10) for s in range(4))
    layer.to_hf(back)
    assert all(torch.equal(a.up_proj.weight, b.up_proj.weight) for a, b in zip(back, experts, strict=True))


def test_what_does_not_convert_is_refused_clearly():
    with pytest.raises(ValueError, match="uses GELU"):
        NumaExperts.from_hf(_FusedExperts(2, 32, 32, act=nn.GELU()))
    biased = _FusedExperts(2, 32, 32)
    biased.has_bias = True
    with pytest.raises(ValueError, match="has biases"):
        NumaExperts.from_hf(biased)
    with pytest.raises(ValueError, match="neither a transformers experts module"):
        NumaExperts.from_hf(nn.Linear(4, 4))
    layer = NumaExperts.from_hf(_FusedExperts(2, 32, 32))
    with pytest.raises(ValueError, match=r"gate_up_proj is \(2, 64, 40\) in the module but \(2, 64, 32\) here"):
        layer.to_hf(_FusedExperts(2, 40, 32))


@pytest.mark.cuda
def test_swapped_block_on_the_gpu_keeps_its_experts_on_the_cpu():
    cpu_block = _random_block("qwen2-moe", seed=6)
    gpu_block = copy.deepcopy(cpu_block)
    gpu_block.experts = NumaExperts.from_hf(cpu_block.experts)
    gpu_block.cuda()  # the router and the shared expert move; the experts stay in node-local memory
    assert gpu_block.experts.w13[0].device.type == "cpu"
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 64, generator=g)
    grad_out = torch.randn(2, 5, 64, generator=g)
    out_c, dx_c = _run(cpu_block, x, grad_out)
    out_g, dx_g = _run(gpu_block, x.cuda(), grad_out.cuda())
    assert out_g.is_cuda and dx_g.is_cuda
    reference = copy.deepcopy(cpu_block).double()
    out_r, dx_r = _run(reference, x.double(), grad_out.double())
    _assert_as_accurate(out_g.cpu(), out_c, out_r, "output")
    _assert_as_accurate(dx_g.cpu(), dx_c, dx_r, "input gradient")
