"""CPU mixture-of-experts with expert weights in node-local memory (:class:`NumaExperts`).

Serving or fine-tuning a large MoE model on a GPU box with a big CPU means
running the experts on the CPU. On a multi-socket host their weights are read
once per token, so where the bytes sit decides the speed. Copying every expert
to every node (``replicate``) multiplies memory by the node count for a modest
gain and runs out of memory with Sub-NUMA Clustering. ``split`` (the default)
instead gives each node a slice of every expert's intermediate dimension; each
node's pinned workers compute a partial output from local memory and the
partials are summed in fp32, so every byte is read once, locally, and the
footprint stays 1x.

Packed layout: every weight is stored in blocks of 16 output rows so that one
64-byte load feeds AVX-512 BF16 dot products or an AMX tile directly. The
parameters are therefore packed tensors (one ``w13`` and one ``w2`` per slice);
use :meth:`NumaExperts.to_dense` / :meth:`NumaExperts.from_dense` to convert
from and to the ``nn.Linear`` layout.

Checkpoints do not depend on that layout: ``state_dict()`` holds the dense weights
under the names ``transformers``' MoE experts use, ``gate_up_proj``
``[E, 2 * intermediate, hidden]`` (gate rows, then up rows) and ``down_proj``
``[E, hidden, intermediate]``, and ``load_state_dict`` packs them for the current
machine's nodes and placement, so a checkpoint written on two nodes loads on one.
:meth:`NumaExperts.from_hf` / :meth:`NumaExperts.to_hf` convert the expert modules
of ``transformers`` models (Mixtral, Qwen2/3-MoE, DeepSeek-V3).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from composer_numa.diagnostics import NODE_MEMORY_INSUFFICIENT, Diagnostic, emit
from composer_numa.offload import hf, memory, runtime
from composer_numa.offload.expert_layout import (  # noqa: F401  (_plan, _Slice: tested here)
    _ALIGN,
    _BLOCK,
    _DTYPES,
    PLACEMENTS,
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
from composer_numa.offload.quant import WEIGHT_DTYPES, QuantizedWeights
from composer_numa.units import format_size

__all__ = ["NumaExperts", "QuantizedNumaExperts", "ExpertsReport", "PLACEMENTS", "WEIGHT_DTYPES"]

log = logging.getLogger(__name__)

def _pack(w: torch.Tensor, kp: int) -> torch.Tensor:
    """[N, K] -> [N/16, K/kp, 16, kp]: 16-row blocks, kp consecutive k per row."""
    n, k = w.shape
    return w.reshape(n // _BLOCK, _BLOCK, k // kp, kp).permute(0, 2, 1, 3)


def _unpack(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack`."""
    nb, kb, _, kp = p.shape
    return p.permute(0, 2, 1, 3).reshape(nb * _BLOCK, kb * kp)


def _pack_pairs(w: torch.Tensor, kp: int) -> torch.Tensor:
    """[N, K] -> [N/32, K/kp, 2, 16, kp]: neighbouring 16-row blocks interleaved per k-step."""
    nb, kb, _, _ = (p := _pack(w, kp)).shape
    return p.reshape(nb // 2, 2, kb, _BLOCK, kp).transpose(1, 2)


def _unpack_pairs(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_pairs`."""
    ns, kb, _, _, kp = p.shape
    return _unpack(p.transpose(1, 2).reshape(ns * 2, kb, _BLOCK, kp))


@dataclass
class ExpertsReport:
    """What :meth:`NumaExperts.report` found: placement, memory and the decode roofline.

    Attributes:
        placement: ``split``, ``replicate`` or ``by-expert``.
        dtype: weight dtype name.
        nodes: the NUMA node of each slice.
        kernel: the kernel path a forward uses now (e.g. ``avx512+bf16dot+amx``).
        weight_bytes: bytes of one copy of all experts (gate, up, down; padded).
        bytes_per_node: bytes the layer placed on each node.
        resident_bytes_per_node: resident pages per node of those buffers, in bytes.
        bandwidth_gbps: measured read bandwidth of each node's workers from its own memory.
        top_k: experts per token assumed for the roofline.
        decode_bytes_per_token: expert bytes one token streams (top_k experts).
        decode_roofline_ms: the time to stream them, each node reading its share
            at its bandwidth (the slowest node decides).
    """

    placement: str
    dtype: str
    nodes: list[int]
    kernel: str
    weight_bytes: int
    bytes_per_node: dict[int, int]
    resident_bytes_per_node: dict[int, int]
    bandwidth_gbps: dict[int, float] = field(default_factory=dict)
    top_k: int = 1
    decode_bytes_per_token: int = 0
    decode_roofline_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __str__(self) -> str:
        lines = [
            f"NumaExperts: placement={self.placement} dtype={self.dtype} kernel={self.kernel}",
            f"  weights: {format_size(self.weight_bytes)} per copy",
        ]
        for node, nbytes in sorted(self.bytes_per_node.items()):
            resident = self.resident_bytes_per_node.get(node, 0)
            bw = self.bandwidth_gbps.get(node)
            bw_text = f", read {bw:.1f} GB/s" if bw is not None else ""
            lines.append(f"  node {node}: {format_size(nbytes)} placed, {format_size(resident)} resident{bw_text}")
        if self.decode_roofline_ms is not None:
            lines.append(
                f"  decode roofline (top-{self.top_k}): {format_size(self.decode_bytes_per_token)} per token, "
                f"{self.decode_roofline_ms:.2f} ms/token ({1000.0 / self.decode_roofline_ms:.1f} tokens/s)"
            )
        return "\n".join(lines)


class NumaExperts(nn.Module):
    """SwiGLU mixture-of-experts whose weights live in node-local CPU memory.

    Each expert computes ``down(silu(gate(x)) * up(x))``; ``forward`` takes the
    routing decided by the model (``topk_ids``, ``topk_weights``) and returns
    ``sum_j topk_weights[t, j] * expert[topk_ids[t, j]](x[t])``. Tokens are
    grouped by expert; with few tokens each active expert's weights stream once
    (bandwidth-bound), with many a blocked kernel (AMX tiles where the CPU has
    them) keeps weights in cache. The layer is differentiable in ``x``,
    ``topk_weights`` and its weights, whose gradients land in node-local buffers.

    Example:
        >>> import torch
        >>> from composer_numa import NumaExperts
        >>> experts = NumaExperts(num_experts=8, hidden=64, intermediate=96, dtype=torch.float32)
        >>> x = torch.randn(5, 64)
        >>> topk_ids, topk_weights = NumaExperts.route(torch.randn(5, 8), k=2)
        >>> experts(x, topk_ids, topk_weights).shape
        torch.Size([5, 64])

    Args:
        num_experts: number of experts.
        hidden: model width (input and output of each expert).
        intermediate: each expert's intermediate width.
        dtype: ``torch.bfloat16`` (default) or ``torch.float32`` weights; ``x``
            must have the same dtype.
        nodes: ``'auto'`` (the NUMA nodes of this process's current CPU
            affinity), a node id or a list of node ids. A node listed twice gets
            two slices (useful to exercise multi-slice placements on one node).
        placement: ``'split'`` (every expert's intermediate dimension divided
            over the nodes; 1x memory), ``'replicate'`` (a full copy on every
            node, rows of the computation divided between the copies; N x
            memory) or ``'by-expert'`` (whole experts per node).
        fallback: ``'split'`` to fall back to ``split`` (with a
            ``node-memory-insufficient`` warning) when ``replicate`` does not
            fit on every node; by default that is a :class:`MemoryError`.
        init: initialise the weights like ``nn.Linear`` (uniform in
            ``+-1/sqrt(fan_in)``); ``False`` leaves zeros.

    Raises:
        ValueError: bad sizes, placement or nodes.
        TypeError: a dtype other than float32 / bfloat16.
        MemoryError: a node cannot hold its share (or its replica).
    """

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        intermediate: int,
        dtype: torch.dtype = torch.bfloat16,
        nodes: str | int | Sequence[int] = "auto",
        placement: str = "split",
        *,
        fallback: str | None = None,
        init: bool = True,
    ) -> None:
        super().__init__()
        _check_sizes(num_experts, hidden, intermediate)
        _check_options(dtype, placement, fallback)
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.dtype = dtype
        self.hidden_padded = _round_up(hidden, _ALIGN)
        self.intermediate_padded = _round_up(intermediate, _ALIGN)
        self._kp = 2 if dtype == torch.bfloat16 else 1
        node_list = self._resolve_nodes(nodes)
        _check_size(self._copy_bytes() * (len(node_list) if placement == "replicate" else 1), node_list)
        if placement == "replicate":
            placement = self._check_replicate(node_list, fallback)
        self.placement = placement
        self.nodes = node_list
        self._slices = _plan(num_experts, intermediate, node_list, placement)
        self._local = [_local_index(s.experts, num_experts) for s in self._slices]
        self._impl = native().Experts(
            num_experts, hidden, intermediate, _DTYPES[dtype],
            [s.node for s in self._slices], self._local,
            [s.rows for s in self._slices], [s.row0 for s in self._slices], [s.row1 for s in self._slices],
        )
        # One node-local buffer per slice holds its w13 and w2, registered as
        # parameters w13_<p>, w2_<p> in slice order (optimizers that spread
        # parameters over nodes in order then keep each slice together). With
        # replicate only the first copy is a parameter; the others follow it.
        self._replicas: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._num_param_slices = 0
        for p, s in enumerate(self._slices):
            n13, n2 = self._impl.w13_elements(p), self._impl.w2_elements(p)
            buf = memory.empty(n13 + n2, dtype, node=s.node, policy="bind")
            w13 = buf[:n13].view(self._w13_shape(s))
            w2 = buf[n13:].view(self._w2_shape(s))
            if placement == "replicate" and p > 0:
                self._replicas.append((w13, w2))
            else:
                self.register_parameter(f"w13_{p}", nn.Parameter(w13))
                self.register_parameter(f"w2_{p}", nn.Parameter(w2))
                self._num_param_slices += 1
        # Empty buffers under the state-dict names (see _save_to_state_dict): torch's distributed
        # checkpoint helpers, which Composer loads through, put DDP's "module." back on a saved key
        # only when it names a parameter or a buffer. (register_buffer would read the properties.)
        for name in self.STATE_KEYS:
            self._buffers[name] = torch.empty(0, dtype=dtype)
        self._synced: tuple | None = None
        self._stale = False
        if init:
            self.reset_parameters()
        self._mark_synced()
        log.debug("NumaExperts: %s over nodes %s, %s per copy", placement, node_list, format_size(self.weight_bytes))

    # ------------------------------------------------------------ layout --

    @property
    def w13(self) -> list[nn.Parameter]:
        """Each slice's packed gate and up weights ``[experts, rows/16, hidden/kp, 2, 16, kp]``."""
        return [getattr(self, f"w13_{p}") for p in range(self._num_param_slices)]

    @property
    def w2(self) -> list[nn.Parameter]:
        """Each slice's packed down weights ``[experts, hidden/32, rows/kp, 2, 16, kp]``."""
        return [getattr(self, f"w2_{p}") for p in range(self._num_param_slices)]

    @staticmethod
    def _resolve_nodes(nodes: str | int | Sequence[int]) -> list[int]:
        mem = memory.memory_nodes()
        if isinstance(nodes, str):
            if nodes != "auto":
                raise ValueError(f"NumaExperts: nodes must be 'auto', an int or a list of ints, got {nodes!r}")
            found = [n for n in runtime.pool().nodes() if n in mem]
            return found or [memory.default_node()]
        node_list = [nodes] if isinstance(nodes, int) else list(nodes)
        if not node_list:
            raise ValueError("NumaExperts: nodes must name at least one NUMA node")
        for n in node_list:
            if isinstance(n, bool) or not isinstance(n, int):
                raise ValueError(f"NumaExperts: NUMA node ids must be ints, got {nodes!r}")
            if n not in mem:
                raise ValueError(f"NumaExperts: node {n} is not a memory node this process may use ({mem})")
        return node_list

    def _w13_shape(self, s: _Slice) -> tuple[int, ...]:
        kp = self._kp
        return (len(s.experts), s.rows // _BLOCK, self.hidden_padded // kp, 2, _BLOCK, kp)

    def _w2_shape(self, s: _Slice) -> tuple[int, ...]:
        kp = self._kp
        return (len(s.experts), self.hidden_padded // (2 * _BLOCK), s.rows // kp, 2, _BLOCK, kp)

    def _copy_bytes(self) -> int:
        return 3 * self.num_experts * self.intermediate_padded * self.hidden_padded * (2 if self._kp == 2 else 4)

    @property
    def weight_bytes(self) -> int:
        """Bytes of one copy of every expert's gate, up and down weights (padded)."""
        return self._copy_bytes()

    def _check_replicate(self, nodes: list[int], fallback: str | None) -> str:
        need = self._copy_bytes()
        copies = {n: nodes.count(n) for n in nodes}
        avail = {n: memory.node_meminfo(n)["available_bytes"] for n in copies}
        short = [n for n in copies if need * copies[n] > avail[n]]
        if not short:
            return "replicate"
        have = ", ".join(f"node {n}: {format_size(avail[n])} available" for n in sorted(copies))
        msg = (f"placement='replicate' needs {format_size(need)} of expert weights on each of nodes "
               f"{sorted(copies)} ({have}); node(s) {short} cannot hold a copy")
        if fallback == "split":
            emit(Diagnostic(NODE_MEMORY_INSUFFICIENT, msg + "; falling back to placement='split' (1x memory)"))
            return "split"
        raise MemoryError(msg + "; use placement='split' (1x memory) or fallback='split'")

    def _slice_tensors(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.placement == "replicate" and p > 0:
            return self._replicas[p - 1]
        return self.w13[p], self.w2[p]

    # ------------------------------------------------------------ loading --

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise like ``nn.Linear``: uniform in ``+-1/sqrt(fan_in)``."""
        gen_g, gen_d = 1.0 / math.sqrt(self.hidden), 1.0 / math.sqrt(self.intermediate)
        shape_in = (self.intermediate, self.hidden)
        for e in range(self.num_experts):
            self._load_expert(
                e,
                torch.empty(shape_in).uniform_(-gen_g, gen_g),
                torch.empty(shape_in).uniform_(-gen_g, gen_g),
                torch.empty(self.hidden, self.intermediate).uniform_(-gen_d, gen_d),
            )

    @torch.no_grad()
    def _load_expert(self, e: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        H, Hp, inter, kp = self.hidden, self.hidden_padded, self.intermediate, self._kp
        for p, s in enumerate(self._slices):
            le = self._local[p][e]
            if le < 0:
                continue
            n = max(0, min(inter, s.lo + s.rows) - s.lo)  # logical rows in this slice
            g = torch.zeros(s.rows, Hp, dtype=self.dtype)
            u = torch.zeros(s.rows, Hp, dtype=self.dtype)
            d = torch.zeros(Hp, s.rows, dtype=self.dtype)
            g[:n, :H] = gate[s.lo:s.lo + n]
            u[:n, :H] = up[s.lo:s.lo + n]
            d[:H, :n] = down[:, s.lo:s.lo + n]
            w13, w2 = self._slice_tensors(p)
            w13[le, :, :, 0].copy_(_pack(g, kp))
            w13[le, :, :, 1].copy_(_pack(u, kp))
            w2[le].copy_(_pack_pairs(d, kp))

    @classmethod
    def from_dense(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, **options: Any) -> NumaExperts:
        """Build from stacked weights in ``nn.Linear`` layout.

        Args:
            gate: ``[E, intermediate, hidden]``.
            up: ``[E, intermediate, hidden]``.
            down: ``[E, hidden, intermediate]``.
            **options: constructor options (``dtype`` defaults to ``gate.dtype``
                when that is float32 or bfloat16, else bfloat16). With
                ``weight_dtype="int8"`` or ``"int4"`` (and ``group_size``, ``scale_dtype``)
                the weights are quantized into frozen buffers: see
                :class:`composer_numa.offload.experts.QuantizedNumaExperts` (``None``: float weights).
        """
        weight_dtype = options.pop("weight_dtype", None)
        if weight_dtype is not None:
            return QuantizedNumaExperts.quantize(gate, up, down, weight_dtype=weight_dtype, **options)
        E, inter, H = _dense_shape(gate, up, down)
        options.setdefault("dtype", gate.dtype if gate.dtype in _DTYPES else torch.bfloat16)
        layer = cls(E, H, inter, init=False, **options)
        with torch.no_grad():
            for e in range(E):
                layer._load_expert(e, gate[e].detach().cpu(), up[e].detach().cpu(), down[e].detach().cpu())
        layer._mark_synced()
        return layer

    @classmethod
    def from_gguf(cls, path_or_reader: Any, layer: int, **options: Any) -> NumaExperts:
        """Frozen quantized experts from a GGUF file's ``blk.<layer>.ffn_{gate,up,down}_exps``
        tensors in Q8_0 or Q4_0, loaded without requantizing (see
        :meth:`composer_numa.offload.experts.QuantizedNumaExperts.from_gguf`)."""
        return QuantizedNumaExperts.from_gguf(path_or_reader, layer, **options)

    @classmethod
    def from_modules(
        cls,
        experts: Sequence[nn.Module],
        names: tuple[str, str, str] | None = None,
        **options: Any,
    ) -> NumaExperts:
        """Build from a list of expert modules holding gate / up / down ``nn.Linear``.

        Args:
            experts: the expert modules, in expert-id order.
            names: attribute names of the gate, up and down projections. By
                default the first of ``(gate, up, down)``, ``(gate_proj,
                up_proj, down_proj)`` and ``(w1, w3, w2)`` that the modules have.
            **options: constructor options (see :meth:`from_dense`).
        """
        experts = list(experts)
        if not experts:
            raise ValueError("NumaExperts.from_modules: no expert modules given")
        candidates = [names] if names else [("gate", "up", "down"), ("gate_proj", "up_proj", "down_proj"),
                                            ("w1", "w3", "w2")]
        for trio in candidates:
            if all(all(isinstance(getattr(m, a, None), nn.Linear) for a in trio) for m in experts):
                break
        else:
            raise ValueError(f"NumaExperts.from_modules: every expert needs nn.Linear attributes named one of "
                             f"{candidates}")
        for m in experts:
            for a in trio:
                if getattr(m, a).bias is not None:
                    raise ValueError(f"NumaExperts.from_modules: {a} has a bias; SwiGLU experts here have none")
        gate, up, down = (torch.stack([getattr(m, a).weight.detach() for m in experts]) for a in trio)
        return cls.from_dense(gate, up, down, **options)

    @classmethod
    def from_hf(cls, module: nn.Module, **options: Any) -> NumaExperts:
        """Build from the experts of a ``transformers`` MoE block (Mixtral, Qwen2/3-MoE, DeepSeek-V3).

        ``module`` is the block's ``experts``: the fused module of ``transformers`` 5
        (``gate_up_proj``, ``down_proj``), whose place in the block the layer can take
        (``block.experts = NumaExperts.from_hf(block.experts)``: same call signature), or the
        ``ModuleList`` of expert MLPs of ``transformers`` 4. Only SwiGLU experts without biases
        convert. ``options`` go to the constructor (``dtype`` defaults to the module's).
        See :mod:`composer_numa.offload.hf`, whose ``replace_experts`` swaps every experts module
        of a model.
        """
        return hf.from_hf(cls, module, **options)

    def to_hf(self, module: nn.Module) -> nn.Module:
        """Write this layer's weights into a ``transformers`` experts module of the same sizes (the
        forms :meth:`from_hf` reads), in place and in that module's dtype; returns it."""
        return hf.to_hf(self, module)

    @torch.no_grad()
    def load_dense(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """Replace the weights with ``gate``, ``up`` ``[E, I, H]`` and ``down`` ``[E, H, I]``
        (``nn.Linear`` layout), packed for this layer's nodes and placement."""
        E, H, inter = self.num_experts, self.hidden, self.intermediate
        for name, t, shape in (("gate", gate, (E, inter, H)), ("up", up, (E, inter, H)), ("down", down, (E, H, inter))):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"NumaExperts.load_dense: {name} must be {list(shape)}, got {got}")
        for e in range(E):
            self._load_expert(e, gate[e].detach().cpu(), up[e].detach().cpu(), down[e].detach().cpu())
        self._mark_synced()

    # ---------------------------------------------------------- state dict --

    #: The names of the dense weights in :meth:`state_dict` (see :attr:`gate_up_proj`).
    STATE_KEYS = ("gate_up_proj", "down_proj")

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        # Dense, layout-free weights instead of the packed, node-sliced parameters.
        gate_up, down = self._dense(self._weight_pairs())
        destination[prefix + "gate_up_proj"] = gate_up
        destination[prefix + "down_proj"] = down

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        keys = {name: prefix + name if prefix + name in state_dict else None for name in self.STATE_KEYS}
        packed = [name for name, _ in self.named_parameters(recurse=False)]
        E, H, inter = self.num_experts, self.hidden, self.intermediate
        if all(keys.values()):
            gate_up, down = state_dict[keys["gate_up_proj"]], state_dict[keys["down_proj"]]
            want = (("gate_up_proj", gate_up, (E, 2 * inter, H)), ("down_proj", down, (E, H, inter)))
            bad = [f"size mismatch for {prefix}{name}: copying a param with shape {tuple(t.shape)} from checkpoint, "
                   f"the shape in current model is {shape}"
                   for name, t, shape in want if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape]
            if bad:
                error_msgs.extend(bad)
            else:
                self.load_dense(gate_up[:, :inter], gate_up[:, inter:], down)
        elif all(prefix + name in state_dict for name in packed):
            # the packed parameters an earlier version saved: loadable on the layout that wrote them only
            with torch.no_grad():
                for name, p in self.named_parameters(recurse=False):
                    t = state_dict[prefix + name]
                    if tuple(t.shape) != tuple(p.shape):
                        error_msgs.append(f"{prefix}{name}: packed weights {tuple(t.shape)} from another node layout "
                                          f"(here {tuple(p.shape)}); load them where they were saved and save again "
                                          "to get the layout-free gate_up_proj / down_proj")
                        return
                for name, p in self.named_parameters(recurse=False):
                    p.copy_(state_dict[prefix + name])
            self._stale = True
        else:
            missing_keys.extend(prefix + name for name, key in keys.items() if key is None)
        if strict:
            known = set(self.STATE_KEYS) | set(packed)
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]
                                   and k[len(prefix):] not in known)

    @torch.no_grad()
    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The weights in ``nn.Linear`` layout: gate, up ``[E, I, H]`` and down ``[E, H, I]``."""
        gate_up, down = self._dense(self._weight_pairs())
        inter = self.intermediate
        return gate_up[:, :inter].contiguous(), gate_up[:, inter:].contiguous(), down

    def _weight_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = [(w13.detach(), w2.detach()) for w13, w2 in zip(self.w13, self.w2, strict=True)]
        # replicate: the parameters (first copy) are authoritative; the other copies may lag
        return pairs * len(self._slices) if self.placement == "replicate" else pairs

    @property
    def gate_up_proj(self) -> torch.Tensor:
        """A dense copy of the gate and up weights, ``[E, 2 * intermediate, hidden]`` (gate rows
        first), as ``transformers`` stores them; the name this layer's ``state_dict`` uses.
        Changing the copy does not change the layer (use :meth:`load_dense`)."""
        return self._dense(self._weight_pairs(), down=False)[0]

    @property
    def down_proj(self) -> torch.Tensor:
        """A dense copy of the down weights, ``[E, hidden, intermediate]`` (see :attr:`gate_up_proj`)."""
        return self._dense(self._weight_pairs(), gate_up=False)[1]

    @torch.no_grad()
    def dense_grads(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The weight gradients in ``nn.Linear`` layout (``None`` before any backward)."""
        if any(p.grad is None for p in list(self.w13) + list(self.w2)):
            return None
        pairs = [(w13.grad, w2.grad) for w13, w2 in zip(self.w13, self.w2, strict=True)]
        gate_up, down = self._dense(pairs * len(self._slices) if self.placement == "replicate" else pairs)
        inter = self.intermediate
        return gate_up[:, :inter].contiguous(), gate_up[:, inter:].contiguous(), down

    def _dense(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], *, gate_up: bool = True,
               down: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Unpack ``(w13, w2)`` per slice into ``gate_up [E, 2I, H]`` and ``down [E, H, I]`` (either
        may be skipped), each slice writing the rows it computes, padding left out."""
        E, H, inter = self.num_experts, self.hidden, self.intermediate
        gu = torch.zeros(E, 2 * inter, H, dtype=self.dtype) if gate_up else None
        dn = torch.zeros(E, H, inter, dtype=self.dtype) if down else None
        for s, (w13, w2) in zip(self._slices, pairs, strict=True):
            a = s.lo + s.row0  # first row this slice computes
            n = min(s.lo + s.row1, inter) - a  # its rows that are not padding
            if n <= 0:
                continue
            r = slice(s.row0, s.row0 + n)
            for le, e in enumerate(s.experts):
                if gu is not None:
                    gu[e, a:a + n] = _unpack(w13[le, :, :, 0])[r, :H]
                    gu[e, inter + a:inter + a + n] = _unpack(w13[le, :, :, 1])[r, :H]
                if dn is not None:
                    dn[e, :, a:a + n] = _unpack_pairs(w2[le])[:H, r]
        return gu, dn

    # ------------------------------------------------------------ forward --

    @staticmethod
    def route(router_logits: torch.Tensor, k: int, *, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k softmax routing: ``(topk_ids int64, topk_weights fp32)`` from ``[T, E]`` logits.

        Args:
            router_logits: ``[tokens, num_experts]``.
            k: experts per token, ``0 <= k <= num_experts``.
            normalize: rescale each token's k weights to sum to 1.
        """
        if router_logits.dim() != 2:
            raise ValueError(f"route: router_logits must be [tokens, experts], got shape {tuple(router_logits.shape)}")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= router_logits.shape[1]:
            raise ValueError(f"route: k must be an int in [0, {router_logits.shape[1]}], got {k!r}")
        probs = torch.softmax(router_logits.float(), dim=-1)
        weights, ids = torch.topk(probs, k, dim=-1)
        if normalize and k > 0:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights

    def _check_inputs(self, x: Any, ids: Any, weights: Any) -> None:
        if not all(isinstance(t, torch.Tensor) for t in (x, ids, weights)):
            raise TypeError("NumaExperts: x, topk_ids and topk_weights must be tensors")
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"NumaExperts: x must be [tokens, {self.hidden}], got shape {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise TypeError(f"NumaExperts: x is {x.dtype} but the experts are {self.dtype}; cast x first")
        if x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"NumaExperts: x must be on the CPU or a CUDA device, got {x.device}")
        if ids.dim() != 2 or ids.shape[0] != x.shape[0]:
            raise ValueError(f"NumaExperts: topk_ids must be [tokens, k] with tokens = {x.shape[0]}, "
                             f"got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"NumaExperts: topk_ids must be an integer tensor, got {ids.dtype}")
        if tuple(weights.shape) != tuple(ids.shape):
            raise ValueError(f"NumaExperts: topk_weights must have the shape of topk_ids {tuple(ids.shape)}, "
                             f"got {tuple(weights.shape)}")
        if weights.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"NumaExperts: topk_weights must be float32 or {x.dtype}, got {weights.dtype}")
        for name, t in (("topk_ids", ids), ("topk_weights", weights)):
            if t.device.type != "cpu" and t.device != x.device:
                raise ValueError(f"NumaExperts: {name} is on {t.device} but x is on {x.device}")

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Mix the experts' outputs for each token.

        Args:
            x: ``[tokens, hidden]`` in the layer's dtype, on the CPU or a CUDA
                device (then copied through pinned memory and the result returned
                on that device).
            topk_ids: ``[tokens, k]`` integer expert ids.
            topk_weights: ``[tokens, k]`` routing weights, float32 or x's dtype.

        Returns:
            ``[tokens, hidden]`` in x's dtype, on x's device.
        """
        self._check_inputs(x, topk_ids, topk_weights)
        ids = topk_ids.to("cpu", torch.int64).contiguous()  # ids outside [0, E): IndexError from the kernel
        weights = topk_weights.to("cpu", torch.float32).contiguous()
        on_gpu = x.device.type == "cuda"
        if on_gpu:
            xc = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            xc.copy_(x, non_blocking=True)
            torch.cuda.current_stream(x.device).synchronize()
        else:
            xc = x.contiguous()
        self._sync_replicas()
        out = self._run(on_gpu, xc, ids, weights)
        return out.to(x.device, non_blocking=True) if on_gpu else out

    def _run(self, pin: bool, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The kernels on checked CPU inputs: an autograd node when a gradient is wanted."""
        params = (*self.w13, *self.w2)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, *params)):
            return _ExpertsFunction.apply(self, pin, x, ids, weights, *params)
        return self._launch(pin, x, ids, weights, None, None)  # inference: no graph to build

    def _launch(self, pin: bool, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                save_g: list[torch.Tensor] | None, save_u: list[torch.Tensor] | None) -> torch.Tensor:
        """One forward call of the kernels; ``save_*`` receive the pre-activations for backward."""
        self._last_k = ids.shape[1]
        P = len(self._slices)
        w13 = [self._slice_tensors(p)[0].detach() for p in range(P)]
        w2 = [self._slice_tensors(p)[1].detach() for p in range(P)]
        out = torch.empty(ids.shape[0], self.hidden, dtype=x.dtype, pin_memory=pin)
        self._impl.forward(runtime.pool(), x.detach(), ids, weights.detach(), out, w13, w2, save_g, save_u)
        return out

    def _apply(self, fn: Any, recurse: bool = True) -> NumaExperts:
        # The weights live in node-local CPU memory: moving or casting the
        # enclosing model (Composer moves it to the GPU) leaves them where they are.
        return self

    # ------------------------------------------------------------ replicas --

    def _sync_replicas(self) -> None:
        """Refresh the copies on other nodes after the parameters changed."""
        if not self._replicas:
            return
        w13, w2 = self.w13[0], self.w2[0]
        key = (w13.data_ptr(), w13._version, w2.data_ptr(), w2._version)
        if key == self._synced and not self._stale:
            return
        self.sync_replicas()

    @torch.no_grad()
    def sync_replicas(self) -> None:
        """Copy the first copy's weights to the other nodes' copies (``replicate``).

        Runs automatically before a forward that follows a backward (an optimizer
        may have stepped) or an in-place change through torch; call it after
        changing the weights any other way.
        """
        if not self._replicas:
            return
        w13, w2 = self.w13[0], self.w2[0]
        for r13, r2 in self._replicas:
            r13.copy_(w13.detach())
            r2.copy_(w2.detach())
        self._mark_synced()

    def _mark_synced(self) -> None:
        if self._replicas:
            w13, w2 = self.w13[0], self.w2[0]
            self._synced = (w13.data_ptr(), w13._version, w2.data_ptr(), w2._version)
        self._stale = False

    # ------------------------------------------------------------ report --

    def report(self, top_k: int | None = None, *, measure_bandwidth: bool = True,
               bandwidth_gbps: dict[int, float] | None = None) -> ExpertsReport:
        """Bytes per node, placement and the decode roofline for this machine.

        Args:
            top_k: experts per token for the roofline (default: the last
                forward's k, else 1).
            measure_bandwidth: run the extension's read-bandwidth probe on each
                node (a fraction of a second per node) when ``bandwidth_gbps``
                is not given.
            bandwidth_gbps: known read bandwidth per node, in GB/s.
        """
        placed: dict[int, int] = {}
        resident: dict[int, int] = {}
        page = native().page_size()
        buffers = []
        for p, s in enumerate(self._slices):
            w13, w2 = self._slice_tensors(p)
            placed[s.node] = placed.get(s.node, 0) + self._slice_bytes(p)
            buffers.append(w13)
        seen: set[int] = set()
        for t in buffers:  # w13 and w2 of a slice share one buffer
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                continue
            seen.add(ptr)
            for node, pages in memory.nodes_of(t).items():
                if node >= 0:
                    resident[node] = resident.get(node, 0) + pages * page
        k = top_k if top_k is not None else getattr(self, "_last_k", 1)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"NumaExperts.report: top_k must be a positive int, got {k!r}")
        bw = _check_bandwidths(bandwidth_gbps, {s.node for s in self._slices})
        if not bw and measure_bandwidth:
            for node in sorted({s.node for s in self._slices}):
                bw[node] = _read_bandwidth_gbps(node)
        per_expert = self._copy_bytes() // self.num_experts
        rep = ExpertsReport(
            placement=self.placement, dtype=self._dtype_name(), nodes=[s.node for s in self._slices],
            kernel=self._kernel_name(), weight_bytes=self.weight_bytes,
            bytes_per_node=placed, resident_bytes_per_node=resident, bandwidth_gbps=bw, top_k=k,
            decode_bytes_per_token=k * per_expert,
        )
        if bw:
            # Each node streams its share of the touched bytes; the slowest node decides.
            share: dict[int, float] = {}
            for s in self._slices:
                frac = (s.row1 - s.row0) / self.intermediate_padded * len(s.experts) / self.num_experts
                share[s.node] = share.get(s.node, 0.0) + frac
            rep.decode_roofline_ms = max(k * per_expert * f / (bw[n] * 1e9) for n, f in share.items()) * 1e3
        return rep

    def _slice_bytes(self, p: int) -> int:
        w13, w2 = self._slice_tensors(p)
        return (w13.numel() + w2.numel()) * (2 if self._kp == 2 else 4)

    def _dtype_name(self) -> str:
        return _DTYPES[self.dtype]

    def _kernel_name(self) -> str:
        return native().experts_kernel(_DTYPES[self.dtype])

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden}, intermediate={self.intermediate}, "
                f"dtype={self.dtype}, placement={self.placement}, nodes={self.nodes}")


def _check_bandwidths(given: Any, nodes: set[int]) -> dict[int, float]:
    """``bandwidth_gbps`` as a dict naming every slice node with a positive, finite GB/s, or {}."""
    if not given:
        return {}
    if not isinstance(given, dict):
        raise TypeError(f"NumaExperts.report: bandwidth_gbps must be a dict {{node: GB/s}}, got {type(given).__name__}")
    missing = sorted(nodes - set(given))
    if missing:
        raise ValueError(f"NumaExperts.report: bandwidth_gbps has no figure for node(s) {missing}")
    out = {}
    for node, gbps in given.items():
        if isinstance(gbps, bool) or not isinstance(gbps, (int, float)) or not 0 < gbps < math.inf:
            raise ValueError(f"NumaExperts.report: bandwidth_gbps[{node!r}] must be a positive number of GB/s, "
                             f"got {gbps!r}")
        out[node] = float(gbps)
    return out


def _read_bandwidth_gbps(node: int, elements: int = 1 << 25, passes: int = 3) -> float:
    """Read bandwidth of ``node``'s workers from ``node``'s memory (the extension's probe)."""
    with memory.reserved(elements * 4, [node]):
        r = native().bandwidth(runtime.pool(), "read", elements, node, node, passes)
    return r["bytes_per_pass"] / statistics.median(r["seconds"]) / 1e9


class _ExpertsFunction(torch.autograd.Function):
    """The kernels as an autograd node: gradients for x, the routing weights and the weights."""

    @staticmethod
    def forward(ctx: Any, layer: NumaExperts, pin: bool, x: torch.Tensor, ids: torch.Tensor,
                weights: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        T, k = ids.shape
        save_g, save_u = _saved_preactivations(layer._slices, T, k)
        out = layer._launch(pin, x, ids, weights, save_g, save_u)
        ctx.layer = layer
        ctx.weights_need_grad = any(ctx.needs_input_grad[5:])
        ctx.save_for_backward(x, ids, weights, *params, *save_g, *save_u)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        layer: NumaExperts = ctx.layer
        slices = layer._slices
        P, nparams = len(slices), len(layer.w13)
        x, ids, weights, *rest = ctx.saved_tensors
        save_g, save_u = rest[2 * nparams:2 * nparams + P], rest[2 * nparams + P:]
        w13 = [layer._slice_tensors(p)[0].detach() for p in range(P)]
        w2 = [layer._slice_tensors(p)[1].detach() for p in range(P)]
        g13 = g2 = None
        if ctx.weights_need_grad:
            # Fresh node-local buffers; autograd adopts them as .grad (or adds
            # them into an existing .grad). Replicas write their rows into one.
            g13, g2 = [], []
            for p in range(nparams):
                node = slices[p].node
                g13.append(memory.empty(layer.w13[p].shape, layer.dtype, node=node))
                g2.append(memory.empty(layer.w2[p].shape, layer.dtype, node=node))
            if layer.placement == "replicate":
                g13, g2 = g13 * P, g2 * P
        dx = torch.empty_like(x)
        dw = torch.empty(weights.shape, dtype=torch.float32)
        layer._impl.backward(runtime.pool(), grad_out.contiguous(), x.detach(), ids, weights.detach(), w13, w2,
                             list(save_g), list(save_u), g13, g2, dx, dw)
        layer._stale = True
        need = ctx.needs_input_grad
        param_grads: list[torch.Tensor | None] = [None] * (2 * nparams)
        if g13 is not None:
            param_grads = [g13[p] if need[5 + p] else None for p in range(nparams)] + \
                          [g2[p] if need[5 + nparams + p] else None for p in range(nparams)]
        return (None, None, dx if need[2] else None, None, dw if need[4] else None, *param_grads)


class QuantizedNumaExperts(QuantizedWeights, NumaExperts):
    """:class:`NumaExperts` with frozen int8 / int4 weights (see the module docstring).

    Build it with :meth:`NumaExperts.from_dense` (``weight_dtype=...``), :meth:`quantize`,
    :meth:`from_codes` or :meth:`NumaExperts.from_gguf`; ``forward``, ``route``, ``report`` and the
    placements work as for the float layer, at 1x the quantized bytes for ``split`` and
    ``by-expert``.

    Args:
        num_experts, hidden, intermediate: the layer's sizes.
        weight_dtype: ``"int8"`` or ``"int4"``.
        group_size: input elements per scale, 32, 64 or 128 (dividing ``hidden`` and
            ``intermediate``); ``None`` for one scale per row (int8 only). int4 defaults to 128.
        scale_dtype: ``torch.float16`` (default) or ``torch.bfloat16``.
        dtype: the dtype of ``x`` and the output, ``torch.bfloat16`` (default) or ``torch.float32``.
        nodes, placement, fallback: as for :class:`NumaExperts`.
    """
