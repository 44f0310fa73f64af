"""Frozen int8 / int4 mixture-of-experts weights in node-local memory (the weights of
:class:`composer_numa.offload.experts.QuantizedNumaExperts`).

Built with ``NumaExperts.from_dense(gate, up, down, weight_dtype="int8" | "int4", group_size=g)`` or
``NumaExperts.from_gguf(path, layer)``. The weights are frozen buffers (no gradients); the layer
passes gradients to ``x`` and the routing weights, so it trains inside a model whose other parts train.

Weights (symmetric, ``w = scale * q``):

- ``int8``: ``q`` in [-127, 127] (GGUF Q8_0 codes load as they are, -128 included), one scale per
  output row (``group_size=None``) or per ``group_size`` (32, 64, 128) input elements of a row.
- ``int4``: ``q = n - 8`` with ``n`` the stored nibble 0..15, a scale per group (default 128). The
  fixed offset 8 (GGUF Q4_0's) instead of a stored zero point keeps one scale per group, the dot
  product one integer sum, and Q4_0 blocks load bit for bit. The quantizer, like Q4_0's, maps
  the element of largest magnitude of a group to -8 (the scale takes its sign), with the scale
  shrunk by the factor in 0.6 .. 1 (9 steps) of least squared error.
- Scales are float16 (default) or bfloat16 (``scale_dtype``), rounded before the codes are chosen.

Activations: the kernels quantize each token (and each SwiGLU activation row) to int16 per block
of the reduction (the group, or 256/128/64/32 elements with per-row scales):
``scale = max|v| / 32767`` and ``q = round_half_even(v * (32767 / max|v|))``, both in fp32,
then form exact integer sums per block, scaled and accumulated in fp32. The relative step is
2^-15 of the block's largest magnitude (int8 activations would cost ~1e-2). Every SIMD path and
thread count gives the same bits. :meth:`QuantizedNumaExperts.dequantize` returns exactly the
float32 weights the kernels multiply by. The backward multiplies by those weights transposed in
fp32; the routing weights' gradient uses the unquantized SwiGLU activations.

Layout-free state dict (independent of nodes and placement):

- ``gate_up_proj_q``: ``[E, 2 * intermediate, hidden]`` int8 codes (gate rows, then up rows); for
  int4 ``[E, 2 * intermediate, hidden / 2]`` uint8, two nibbles ``n = q + 8`` per byte, the low
  one holding the even input index.
- ``gate_up_proj_scale``: ``[E, 2 * intermediate, hidden / group_size]`` (``[..., 1]`` per row).
- ``down_proj_q``, ``down_proj_scale``: the same for ``down`` ``[E, hidden, intermediate]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from composer_numa.offload import memory, runtime
from composer_numa.offload.expert_layout import (
    _ALIGN,
    _DTYPES,
    _check_options,
    _check_size,
    _check_sizes,
    _dense_shape,
    _local_index,
    _plan,
    _round_up,
    _saved_preactivations,
    _Slice,
)
from composer_numa.offload.native import native

__all__ = ["QuantizedWeights", "WEIGHT_DTYPES", "quantize_weight"]

#: Weight formats of :class:`QuantizedNumaExperts`.
WEIGHT_DTYPES = ("int8", "int4")
_GROUPS = (32, 64, 128)
_SCALE_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _bits(weight_dtype: str) -> int:
    return 8 if weight_dtype == "int8" else 4


def quantize_weight(w: torch.Tensor, weight_dtype: str, group_size: int | None,
                    scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes ``[..., N, K]`` int8 and scales ``[..., N, K / group or 1]`` of ``w``.

    The scale (int8: ``max|w| / 127`` over a row or group; int4: see the module docstring) is
    rounded to ``scale_dtype`` first and the codes are ``round(w / scale)`` clamped to the
    format's range, so ``codes * scales`` is the weight the kernels use.
    """
    if w.dim() > 2:  # a matrix at a time: the fp32 temporaries stay a few times one expert's size
        *lead, n, k = w.shape
        parts = [quantize_weight(m, weight_dtype, group_size, scale_dtype) for m in w.reshape(-1, n, k)]
        q = torch.stack([p[0] for p in parts]).reshape(*lead, n, k)
        return q, torch.stack([p[1] for p in parts]).reshape(*lead, n, -1)
    w = w.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize: the weights contain NaN or infinity")
    *lead, n, k = w.shape
    g = group_size or k
    blocks = w.reshape(*lead, n, k // g, g)
    if weight_dtype == "int8":
        q, scale = _codes(blocks, blocks.abs().amax(-1) / 127, -127, 127, scale_dtype)
    else:
        # As GGUF's Q4_0: the element of largest magnitude maps to -8 (the scale takes its sign),
        # here with the scale shrunk by the factor of least squared error in 0.6 .. 1.
        idx = blocks.abs().argmax(-1, keepdim=True)
        top = blocks.gather(-1, idx).squeeze(-1) / -8
        q = scale = err = None
        for f in torch.linspace(0.6, 1.0, 9).tolist():
            qf, sf = _codes(blocks, top * f, -8, 7, scale_dtype)
            ef = (qf.float() * sf.float().unsqueeze(-1) - blocks).square().sum(-1)
            if err is None:
                q, scale, err = qf, sf, ef
            else:
                better = ef < err
                q = torch.where(better.unsqueeze(-1), qf, q)
                scale = torch.where(better, sf, scale)
                err = torch.minimum(ef, err)
    return q.reshape(*lead, n, k), scale


def _codes(blocks: torch.Tensor, scale: torch.Tensor, lo: int, hi: int,
           scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of ``blocks`` for a scale per block, rounded to ``scale_dtype`` first."""
    scale = scale.to(scale_dtype)
    sf = scale.float()
    if not bool(torch.isfinite(sf).all()):
        raise ValueError(f"quantize: a weight scale overflows {scale_dtype}; use scale_dtype=torch.bfloat16")
    nz = sf != 0
    q = torch.where(nz.unsqueeze(-1), blocks / torch.where(nz, sf, 1.0).unsqueeze(-1), 0.0)
    return torch.round(q).clamp_(lo, hi).to(torch.int8), scale


def _to_bytes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[..., N, K]`` -> the kernel's bytes per row ``[..., N, K * bits / 8]``: int8 as is;
    int4 per 4 k, bytes j = 0, 1 holding nibbles k + j (low) and k + 2 + j (high)."""
    if bits == 8:
        return q.view(torch.uint8)
    *lead, n, k = q.shape
    nib = (q.to(torch.int16) + 8).to(torch.uint8).reshape(*lead, n, k // 4, 2, 2)
    return (nib[..., 0, :] | (nib[..., 1, :] << 4)).reshape(*lead, n, k // 2)


def _from_bytes(b: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_to_bytes`."""
    if bits == 8:
        return b.view(torch.int8)
    *lead, n, kb = b.shape
    b = b.reshape(*lead, n, kb // 2, 1, 2)
    nib = torch.cat([b & 15, b >> 4], dim=-2).reshape(*lead, n, kb * 2)
    return (nib.to(torch.int16) - 8).to(torch.int8)


def _to_state(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes -> the state dict's form: int8, or int4 as uint8 pairs (low nibble: even index)."""
    if bits == 8:
        return q.clone()
    n = (q.to(torch.int16) + 8).to(torch.uint8)
    return n[..., 0::2] | (n[..., 1::2] << 4)


def _from_state(t: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return t.to(torch.int8)
    n = torch.stack([t & 15, t >> 4], dim=-1).reshape(*t.shape[:-1], t.shape[-1] * 2)
    return (n.to(torch.int16) - 8).to(torch.int8)


class QuantizedWeights:
    """The int8 / int4 half of :class:`composer_numa.offload.experts.QuantizedNumaExperts`: its
    constructor, frozen buffers, packing, state dict and kernel calls, mixed in before
    :class:`~composer_numa.offload.experts.NumaExperts` (which brings routing, ``forward``,
    ``report`` and the placements). Kept here so this module never imports the layer back."""

    STATE_KEYS = ("gate_up_proj_q", "gate_up_proj_scale", "down_proj_q", "down_proj_scale")

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        intermediate: int,
        *,
        weight_dtype: str = "int8",
        group_size: int | None = None,
        scale_dtype: torch.dtype = torch.float16,
        dtype: torch.dtype = torch.bfloat16,
        nodes: str | int | Sequence[int] = "auto",
        placement: str = "split",
        fallback: str | None = None,
    ) -> None:
        nn.Module.__init__(self)
        _check_sizes(num_experts, hidden, intermediate)
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"NumaExperts: weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, "
                             f"got {weight_dtype!r}")
        if weight_dtype == "int4" and group_size is None:
            group_size = 128
        if group_size is not None:
            if isinstance(group_size, bool) or group_size not in _GROUPS:
                raise ValueError(f"NumaExperts: group_size must be one of {_GROUPS} or None (int8 per row), "
                                 f"got {group_size!r}")
            for name, v in (("hidden", hidden), ("intermediate", intermediate)):
                if v % group_size:
                    raise ValueError(f"NumaExperts: group_size {group_size} does not divide {name} {v}")
        if scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"NumaExperts: scale_dtype must be torch.float16 or torch.bfloat16, got {scale_dtype}")
        _check_options(dtype, placement, fallback)
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.dtype = dtype
        self.weight_dtype, self.group_size, self.scale_dtype = weight_dtype, group_size, scale_dtype
        self._bits = _bits(weight_dtype)
        align = max(_ALIGN, group_size or 0)
        self.hidden_padded = _round_up(hidden, _ALIGN)
        self.intermediate_padded = _round_up(intermediate, align)
        self._kp = 0  # no float packing
        node_list = self._resolve_nodes(nodes)
        _check_size(self._copy_bytes() * (len(node_list) if placement == "replicate" else 1), node_list)
        if placement == "replicate":
            placement = self._check_replicate(node_list, fallback)
        self.placement, self.nodes = placement, node_list
        self._slices = _plan(num_experts, intermediate, node_list, placement, align)
        self._local = [_local_index(s.experts, num_experts) for s in self._slices]
        self._impl = native().QuantExperts(
            num_experts, hidden, intermediate, _DTYPES[dtype], self._bits, group_size or 0,
            _SCALE_DTYPES[scale_dtype], [s.node for s in self._slices], self._local,
            [s.rows for s in self._slices], [s.row0 for s in self._slices], [s.row1 for s in self._slices],
        )
        # One node-local buffer per slice: w13 and w2 bytes, then the scales; non-persistent buffers
        # (frozen, not parameters; state_dict writes the layout-free form instead).
        self._replicas = []
        self._num_param_slices = 0
        self._views: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for p, s in enumerate(self._slices):
            n13, n2 = self._impl.w13_bytes(p), self._impl.w2_bytes(p)
            m13, m2 = self._impl.s13_elements(p), self._impl.s2_elements(p)
            buf = memory.empty(n13 + n2 + 2 * (m13 + m2), torch.uint8, node=s.node, policy="bind")
            q13 = buf[:n13].view(self._q13_shape(s))
            q2 = buf[n13:n13 + n2].view(self._q2_shape(s))
            sc = buf[n13 + n2:].view(scale_dtype)
            s13 = sc[:m13].view(self._s13_shape(s))
            s2 = sc[m13:].view(self._s2_shape(s))
            for name, t in (("q13", q13), ("q2", q2), ("s13", s13), ("s2", s2)):
                self.register_buffer(f"{name}_{p}", t, persistent=False)
            self._views.append((q13, q2, s13, s2))
        for name in self.STATE_KEYS:
            self._buffers[name] = torch.empty(0, dtype=torch.int8)
        self._synced = None
        self._stale = False

    # ------------------------------------------------------------ layout --

    def _ng(self, k: int) -> int:
        return k // self.group_size if self.group_size else 1

    def _q13_shape(self, s: _Slice) -> tuple[int, ...]:
        kb = self.hidden_padded * self._bits // 8
        return (len(s.experts), s.rows // 16, kb // 2, 2, 16, 2)

    def _q2_shape(self, s: _Slice) -> tuple[int, ...]:
        kb = s.rows * self._bits // 8
        return (len(s.experts), self.hidden_padded // 32, kb // 2, 2, 16, 2)

    def _s13_shape(self, s: _Slice) -> tuple[int, ...]:
        return (len(s.experts), s.rows // 16, self._ng(self.hidden_padded), 2, 16)

    def _s2_shape(self, s: _Slice) -> tuple[int, ...]:
        return (len(s.experts), self.hidden_padded // 32, self._ng(s.rows), 2, 16)

    def _copy_bytes(self) -> int:
        E, Ip, Hp = self.num_experts, self.intermediate_padded, self.hidden_padded
        weights = 3 * E * Ip * Hp * self._bits // 8
        scales = 2 * E * (2 * Ip * self._ng(Hp) + Hp * self._ng(Ip))
        return weights + scales

    def _slice_tensors(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._views[p][0], self._views[p][1]

    def _slice_bytes(self, p: int) -> int:
        return sum(t.numel() * t.element_size() for t in self._views[p])

    def _dtype_name(self) -> str:
        return self.weight_dtype + (f"/g{self.group_size}" if self.group_size else "/row")

    def _kernel_name(self) -> str:
        return native().quant_experts_kernel()

    @property
    def w13(self) -> list[torch.Tensor]:
        """No trainable weights: the quantized weights are buffers."""
        return []

    @property
    def w2(self) -> list[torch.Tensor]:
        return []

    # ------------------------------------------------------------ loading --

    @classmethod
    def quantize(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, *, weight_dtype: str = "int8",
                 group_size: int | None = None, scale_dtype: torch.dtype = torch.float16,
                 **options: Any) -> QuantizedWeights:
        """Quantize dense ``gate``, ``up`` ``[E, I, H]`` and ``down`` ``[E, H, I]`` (see the module docstring)."""
        E, inter, H = _dense_shape(gate, up, down)
        options.setdefault("dtype", gate.dtype if gate.dtype in _DTYPES else torch.bfloat16)
        layer = cls(E, H, inter, weight_dtype=weight_dtype, group_size=group_size, scale_dtype=scale_dtype,
                    **options)
        g = layer.group_size
        gq, gs = quantize_weight(gate, weight_dtype, g, scale_dtype)
        uq, us = quantize_weight(up, weight_dtype, g, scale_dtype)
        dq, ds = quantize_weight(down, weight_dtype, g, scale_dtype)
        layer.load_codes(gq, gs, uq, us, dq, ds)
        return layer

    @classmethod
    def from_codes(cls, gate_q: torch.Tensor, gate_s: torch.Tensor, up_q: torch.Tensor, up_s: torch.Tensor,
                   down_q: torch.Tensor, down_s: torch.Tensor, *, weight_dtype: str,
                   group_size: int | None, **options: Any) -> QuantizedWeights:
        """A layer holding given codes (int8 ``[E, I, H]`` / ``[E, H, I]``, int4 as values in
        [-8, 7]) and scales (float16 or bfloat16, ``[..., K / group_size or 1]``), as they are."""
        E, inter, H = gate_q.shape
        options.setdefault("scale_dtype", gate_s.dtype)
        layer = cls(E, H, inter, weight_dtype=weight_dtype, group_size=group_size, **options)
        layer.load_codes(gate_q, gate_s, up_q, up_s, down_q, down_s)
        return layer

    @torch.no_grad()
    def load_codes(self, gate_q: torch.Tensor, gate_s: torch.Tensor, up_q: torch.Tensor, up_s: torch.Tensor,
                   down_q: torch.Tensor, down_s: torch.Tensor) -> None:
        """Pack codes and scales (see :meth:`from_codes`) into this layer's slices."""
        E, H, inter, g = self.num_experts, self.hidden, self.intermediate, self.group_size
        ngh, ngi = self._ng(H), self._ng(inter)
        lo_q = -128 if self.weight_dtype == "int8" else -8
        hi_q = 127 if self.weight_dtype == "int8" else 7
        for name, t, shape in (("gate codes", gate_q, (E, inter, H)), ("up codes", up_q, (E, inter, H)),
                               ("down codes", down_q, (E, H, inter)), ("gate scales", gate_s, (E, inter, ngh)),
                               ("up scales", up_s, (E, inter, ngh)), ("down scales", down_s, (E, H, ngi))):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"NumaExperts: {name} must have shape {list(shape)}, got {got}")
            if name.endswith("codes"):
                if t.dtype != torch.int8:
                    raise ValueError(f"NumaExperts: {name} must be int8, got {t.dtype}")
                if t.numel() and (int(t.min()) < lo_q or int(t.max()) > hi_q):
                    raise ValueError(f"NumaExperts: {name} must lie in [{lo_q}, {hi_q}] for {self.weight_dtype}")
            elif t.dtype != self.scale_dtype:
                raise ValueError(f"NumaExperts: {name} must be {self.scale_dtype}, got {t.dtype}")
        Hp, bits = self.hidden_padded, self._bits
        for p, s in enumerate(self._slices):
            q13, q2, s13, s2 = self._views[p]
            ids = list(s.experts)
            n = max(0, min(inter, s.lo + s.rows) - s.lo)  # logical rows in this slice
            ne = len(ids)
            for j, (cq, cs) in enumerate(((gate_q, gate_s), (up_q, up_s))):
                q = torch.zeros(ne, s.rows, Hp, dtype=torch.int8)
                q[:, :n, :H] = cq[ids, s.lo:s.lo + n]
                sc = torch.zeros(ne, s.rows, self._ng(Hp), dtype=self.scale_dtype)
                sc[:, :n] = cs[ids, s.lo:s.lo + n]
                b = _to_bytes(q, bits)
                q13[:, :, :, j].copy_(b.reshape(ne, s.rows // 16, 16, -1, 2).permute(0, 1, 3, 2, 4))
                s13[:, :, :, j].copy_(sc.reshape(ne, s.rows // 16, 16, -1).permute(0, 1, 3, 2))
            q = torch.zeros(ne, Hp, s.rows, dtype=torch.int8)
            q[:, :H, :n] = down_q[ids, :, s.lo:s.lo + n]
            b = _to_bytes(q, bits)
            q2.copy_(b.reshape(ne, Hp // 32, 2, 16, -1, 2).permute(0, 1, 4, 2, 3, 5))
            sc = torch.zeros(ne, Hp, self._ng(s.rows), dtype=self.scale_dtype)
            if g:
                sc[:, :H, :n // g] = down_s[ids, :, s.lo // g:(s.lo + n) // g]
            else:
                sc[:, :H] = down_s[ids]
            s2.copy_(sc.reshape(ne, Hp // 32, 2, 16, -1).permute(0, 1, 4, 2, 3))

    @torch.no_grad()
    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(gate_q, gate_s, up_q, up_s, down_q, down_s)`` as :meth:`from_codes` takes them, each
        slice contributing the rows it computes."""
        E, H, inter, g, bits = self.num_experts, self.hidden, self.intermediate, self.group_size, self._bits
        ngh, ngi = self._ng(H), self._ng(inter)
        gq = torch.zeros(2, E, inter, H, dtype=torch.int8)
        gs = torch.zeros(2, E, inter, ngh, dtype=self.scale_dtype)
        dq = torch.zeros(E, H, inter, dtype=torch.int8)
        ds = torch.zeros(E, H, ngi, dtype=self.scale_dtype)
        for p, s in enumerate(self._slices):
            q13, q2, s13, s2 = self._views[p]
            a = s.lo + s.row0  # first row this slice computes
            n = min(s.lo + s.row1, inter) - a
            if n <= 0:
                continue
            ids, ne, r = list(s.experts), len(s.experts), slice(s.row0, s.row0 + n)
            for j in range(2):
                b = q13[:, :, :, j].permute(0, 1, 3, 2, 4).reshape(ne, s.rows, -1)
                gq[j, ids, a:a + n] = _from_bytes(b, bits)[:, r, :H]
                sc = s13[:, :, :, j].permute(0, 1, 3, 2).reshape(ne, s.rows, -1)
                gs[j, ids, a:a + n] = sc[:, r, :ngh]
            b = q2.permute(0, 1, 3, 4, 2, 5).reshape(ne, self.hidden_padded, -1)
            dq[ids, :, a:a + n] = _from_bytes(b, bits)[:, :H, r]
            sc = s2.permute(0, 1, 3, 4, 2).reshape(ne, self.hidden_padded, -1)
            if g:
                ds[ids, :, a // g:(a + n) // g] = sc[:, :H, s.row0 // g:(s.row0 + n) // g]
            else:
                ds[ids] = sc[:, :H]
        return gq[0], gs[0], gq[1], gs[1], dq, ds

    @torch.no_grad()
    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float32 ``gate``, ``up`` ``[E, I, H]`` and ``down`` ``[E, H, I]``: exactly the values the
        kernels multiply by (``code * scale``)."""
        gq, gs, uq, us, dq, ds = self.codes()
        out = []
        for q, s in ((gq, gs), (uq, us), (dq, ds)):
            *lead, n, k = q.shape
            ng = s.shape[-1]
            w = q.float().reshape(*lead, n, ng, k // ng) * s.float().unsqueeze(-1)
            out.append(w.reshape(*lead, n, k))
        return out[0], out[1], out[2]

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`dequantize`, in the layer's dtype."""
        return tuple(t.to(self.dtype) for t in self.dequantize())  # type: ignore[return-value]

    @property
    def gate_up_proj(self) -> torch.Tensor:
        g, u, _ = self.to_dense()
        return torch.cat([g, u], dim=1)

    @property
    def down_proj(self) -> torch.Tensor:
        return self.to_dense()[2]

    def reset_parameters(self) -> None:
        raise TypeError("NumaExperts: quantized experts are frozen; build a new layer with from_dense")

    def load_dense(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """Quantize ``gate``, ``up``, ``down`` into this layer (its format, groups and scales)."""
        g, wd, sd = self.group_size, self.weight_dtype, self.scale_dtype
        self.load_codes(*quantize_weight(gate, wd, g, sd), *quantize_weight(up, wd, g, sd),
                        *quantize_weight(down, wd, g, sd))

    def dense_grads(self) -> None:
        """Frozen weights have no gradients."""
        return None

    def sync_replicas(self) -> None:
        """Each replica was packed from the same codes: nothing to copy."""

    # ---------------------------------------------------------- state dict --

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        gq, gs, uq, us, dq, ds = self.codes()
        destination[prefix + "gate_up_proj_q"] = _to_state(torch.cat([gq, uq], dim=1), self._bits)
        destination[prefix + "gate_up_proj_scale"] = torch.cat([gs, us], dim=1)
        destination[prefix + "down_proj_q"] = _to_state(dq, self._bits)
        destination[prefix + "down_proj_scale"] = ds

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        missing = [prefix + k for k in self.STATE_KEYS if prefix + k not in state_dict]
        if missing:
            missing_keys.extend(missing)
        else:
            E, H, inter, bits = self.num_experts, self.hidden, self.intermediate, self._bits
            ngh, ngi = self._ng(H), self._ng(inter)
            want = {"gate_up_proj_q": (E, 2 * inter, H * bits // 8), "gate_up_proj_scale": (E, 2 * inter, ngh),
                    "down_proj_q": (E, H, inter * bits // 8), "down_proj_scale": (E, H, ngi)}
            t = {k: state_dict[prefix + k] for k in self.STATE_KEYS}
            bad = [f"size mismatch for {prefix}{k}: copying a buffer with shape {tuple(v.shape)} from checkpoint, "
                   f"the shape in current model is {want[k]} ({self.weight_dtype}, group_size={self.group_size})"
                   for k, v in t.items() if not isinstance(v, torch.Tensor) or tuple(v.shape) != want[k]]
            if bad:
                error_msgs.extend(bad)
            else:
                gu = _from_state(t["gate_up_proj_q"], bits)
                dn = _from_state(t["down_proj_q"], bits)
                gus = t["gate_up_proj_scale"].to(self.scale_dtype)
                self.load_codes(gu[:, :inter].contiguous(), gus[:, :inter].contiguous(), gu[:, inter:].contiguous(),
                                gus[:, inter:].contiguous(), dn, t["down_proj_scale"].to(self.scale_dtype))
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]
                                   and k[len(prefix):] not in self.STATE_KEYS)

    # ------------------------------------------------------------ forward --

    def _run(self, pin: bool, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad):
            return _QuantFunction.apply(self, pin, x, ids, weights)
        return self._launch(pin, x, ids, weights, None, None)  # inference: no graph to build

    def _launch(self, pin: bool, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                save_g: list[torch.Tensor] | None, save_u: list[torch.Tensor] | None) -> torch.Tensor:
        """One forward call of the kernels; ``save_*`` receive the pre-activations for backward."""
        self._last_k = ids.shape[1]
        q13, q2, s13, s2 = self._packed()
        out = torch.empty(ids.shape[0], self.hidden, dtype=x.dtype, pin_memory=pin)
        self._impl.forward(runtime.pool(), x.detach(), ids, weights.detach(), out, q13, q2, s13, s2, save_g, save_u)
        return out

    def _packed(self) -> tuple[list[torch.Tensor], ...]:
        return tuple([v[i] for v in self._views] for i in range(4))  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden}, intermediate={self.intermediate}, "
                f"weight_dtype={self.weight_dtype}, group_size={self.group_size}, scale_dtype={self.scale_dtype}, "
                f"dtype={self.dtype}, placement={self.placement}, nodes={self.nodes}")

    # ------------------------------------------------------------ GGUF --

    @classmethod
    def from_gguf(cls, path_or_reader: Any, layer: int, **options: Any) -> QuantizedWeights:
        """Load ``blk.<layer>.ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps`` stored as GGUF
        Q8_0 or Q4_0 (blocks of 32 with a float16 scale), codes and scales as they are.

        Args:
            path_or_reader: a GGUF file's path or a ``gguf.GGUFReader``.
            layer: the block index.
            **options: constructor options (``dtype``, ``nodes``, ``placement``, ``fallback``).

        Raises:
            ValueError: a missing tensor, another format (K-quants, float types...), formats that
                differ between the three tensors, or shapes that do not fit together.
        """
        from composer_numa.offload import gguf_io

        weight_dtype, gq, gs, uq, us, dq, ds = gguf_io.read_experts(path_or_reader, layer)
        return cls.from_codes(gq, gs, uq, us, dq, ds, weight_dtype=weight_dtype, group_size=32,
                              scale_dtype=torch.float16, **options)


class _QuantFunction(torch.autograd.Function):
    """The quantized kernels as an autograd node: gradients for x and the routing weights."""

    @staticmethod
    def forward(ctx: Any, layer: QuantizedWeights, pin: bool, x: torch.Tensor, ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        T, k = ids.shape
        save_g, save_u = _saved_preactivations(layer._slices, T, k)
        out = layer._launch(pin, x, ids, weights, save_g, save_u)
        ctx.layer = layer
        ctx.save_for_backward(ids, weights, *save_g, *save_u)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        layer: QuantizedWeights = ctx.layer
        P = len(layer._slices)
        ids, weights, *rest = ctx.saved_tensors
        q13, q2, s13, s2 = layer._packed()
        dout = grad_out.to("cpu", layer.dtype).contiguous()
        dx = torch.empty(dout.shape, dtype=layer.dtype)
        dw = torch.empty(weights.shape, dtype=torch.float32)
        layer._impl.backward(runtime.pool(), dout, ids, weights.detach(), q13, q2, s13, s2, list(rest[:P]),
                             list(rest[P:]), dx, dw)
        need = ctx.needs_input_grad
        return None, None, dx if need[2] else None, None, dw if need[4] else None
