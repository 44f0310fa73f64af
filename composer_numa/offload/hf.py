"""The expert modules of Hugging Face ``transformers`` MoE models, to and from ``NumaExperts``.

Two forms are recognised:

* fused experts (``transformers`` 5: ``MixtralExperts``, ``Qwen2MoeExperts``,
  ``Qwen3MoeExperts``, ``DeepseekV3Experts``, ...): parameters ``gate_up_proj``
  ``[E, 2 * intermediate, hidden]`` (gate rows, then up rows; ``is_concatenated=False`` interleaves
  them, ``is_transposed=True`` stores ``[E, hidden, 2 * intermediate]``) and ``down_proj``
  ``[E, hidden, intermediate]``, called as ``experts(hidden_states, top_k_index, top_k_weights)``
  exactly like :meth:`NumaExperts.forward`, so the layer replaces the module in its block;
* a ``ModuleList`` of per-expert MLPs (``transformers`` 4: ``gate_proj``/``up_proj``/``down_proj``
  or Mixtral's ``w1``/``w3``/``w2`` linear layers). The blocks of those versions index the list,
  so the layer is built from it but cannot take its place.

Only SwiGLU experts convert: SiLU activation, a gate, no biases, no custom gating (GPT-OSS clamps
its gate and is refused). Routing stays in the model's block. This module never imports
``transformers``: it reads the modules' attributes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["from_hf", "to_hf", "replace_experts", "is_fused_experts"]


def _is_silu(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def is_fused_experts(module: Any) -> bool:
    """Whether ``module`` is a ``transformers`` fused experts module (3-D ``gate_up_proj`` and ``down_proj``)."""
    params = getattr(module, "_parameters", None) if isinstance(module, nn.Module) else None
    return params is not None and all(isinstance(params.get(a), torch.Tensor) and params[a].dim() == 3
                                      for a in ("gate_up_proj", "down_proj"))


def _check_fused(module: nn.Module) -> None:
    what = type(module).__name__
    if not getattr(module, "has_gate", True):
        raise ValueError(f"NumaExperts.from_hf: {what} has no gate projection; only SwiGLU experts convert")
    if getattr(module, "has_bias", False) or getattr(module, "gate_up_proj_bias", None) is not None:
        raise ValueError(f"NumaExperts.from_hf: {what} has biases; NumaExperts has none")
    if getattr(module, "has_post_expert_norm", False):
        raise ValueError(f"NumaExperts.from_hf: {what} normalises each expert's output; NumaExperts does not")
    act = getattr(module, "act_fn", None)
    if act is not None and not _is_silu(act):
        raise ValueError(f"NumaExperts.from_hf: {what} uses {type(act).__name__}; NumaExperts computes "
                         "down(silu(gate(x)) * up(x))")
    gate_fn = getattr(type(module), "_apply_gate", None)
    if gate_fn is not None and getattr(gate_fn, "__name__", "") != "_default_apply_gate":
        raise ValueError(f"NumaExperts.from_hf: {what} has its own gating (_apply_gate); only silu(gate) * up converts")


def _fused_dense(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gu, down = module.gate_up_proj.detach(), module.down_proj.detach()
    if getattr(module, "is_transposed", False):
        gu, down = gu.transpose(1, 2), down.transpose(1, 2)
    E, two_i, H = gu.shape
    if two_i % 2 or tuple(down.shape) != (E, H, two_i // 2):
        raise ValueError(f"NumaExperts.from_hf: gate_up_proj {tuple(gu.shape)} and down_proj {tuple(down.shape)} "
                         "are not [E, 2I, H] and [E, H, I]")
    inter = two_i // 2
    if getattr(module, "is_concatenated", True):
        return gu[:, :inter], gu[:, inter:], down
    return gu[:, 0::2], gu[:, 1::2], down


def from_hf(cls: type, module: nn.Module, **options: Any) -> Any:
    """Build ``cls`` (:class:`NumaExperts`) from a ``transformers`` experts module (see the module docs).

    ``options`` go to the constructor; ``dtype`` defaults to the module's (float32 or bfloat16).
    """
    if isinstance(module, nn.ModuleList):
        for m in module:
            act = getattr(m, "act_fn", None)
            if act is not None and not _is_silu(act):
                raise ValueError(f"NumaExperts.from_hf: the experts use {type(act).__name__}; NumaExperts computes "
                                 "down(silu(gate(x)) * up(x))")
        return cls.from_modules(list(module), **options)
    if not is_fused_experts(module):
        raise ValueError(f"NumaExperts.from_hf: {type(module).__name__} is neither a transformers experts module "
                         "(3-D gate_up_proj and down_proj) nor a ModuleList of expert MLPs")
    _check_fused(module)
    return cls.from_dense(*_fused_dense(module), **options)


@torch.no_grad()
def to_hf(layer: Any, module: nn.Module) -> nn.Module:
    """Write ``layer``'s weights into ``module`` (the form :func:`from_hf` reads), in place, in the
    module's dtype and device. Returns ``module``."""
    gate, up, down = layer.to_dense()
    if isinstance(module, nn.ModuleList):
        if len(module) != layer.num_experts:
            raise ValueError(f"NumaExperts.to_hf: {len(module)} expert modules for {layer.num_experts} experts")
        for e, m in enumerate(module):
            for names in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"), ("gate", "up", "down")):
                if all(isinstance(getattr(m, a, None), nn.Linear) for a in names):
                    break
            else:
                raise ValueError("NumaExperts.to_hf: expert modules need gate/up/down nn.Linear layers")
            for a, w in zip(names, (gate[e], up[e], down[e]), strict=True):
                _copy(getattr(m, a).weight, w, f"{a} of expert {e}")
        return module
    if not is_fused_experts(module):
        raise ValueError(f"NumaExperts.to_hf: {type(module).__name__} is not a transformers experts module")
    _check_fused(module)
    inter = layer.intermediate
    if getattr(module, "is_concatenated", True):
        gu = torch.cat((gate, up), dim=1)
    else:
        gu = torch.stack((gate, up), dim=2).reshape(layer.num_experts, 2 * inter, layer.hidden)
    if getattr(module, "is_transposed", False):
        gu, down = gu.transpose(1, 2), down.transpose(1, 2)
    _copy(module.gate_up_proj, gu, "gate_up_proj")
    _copy(module.down_proj, down, "down_proj")
    return module


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"NumaExperts.to_hf: {name} is {tuple(dst.shape)} in the module but {tuple(src.shape)} here")
    dst.copy_(src)


def replace_experts(cls: type, model: nn.Module, **options: Any) -> list[str]:
    """Replace every fused ``transformers`` experts module in ``model`` by ``cls.from_hf(...)``;
    returns the names of the replaced modules."""
    targets = [(name, m) for name, m in model.named_modules()
               if name and is_fused_experts(m) and not isinstance(m, cls)]
    for _, m in targets:  # refuse before changing anything
        _check_fused(m)
    done = []
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, from_hf(cls, m, **options))
        done.append(name)
    return done
