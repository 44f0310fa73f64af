"""Reading a MoE layer's expert tensors from GGUF files (Q8_0, Q4_0) without requantizing.

GGUF stores the experts of block ``L`` as ``blk.L.ffn_gate_exps.weight``, ``ffn_up_exps`` (ggml shape
``[hidden, intermediate, experts]``, i.e. ``[E, I, H]`` row-major) and ``ffn_down_exps``
(``[E, H, I]``). Q8_0 and Q4_0 both cut each row into blocks of 32 with a float16 scale ``d``:
Q8_0 holds 32 int8 codes (``w = d * q``), Q4_0 16 bytes whose low nibbles are elements 0..15 and
high nibbles 16..31 (``w = d * (n - 8)``), which is exactly :mod:`composer_numa.offload.quant`'s
int8 / int4 with ``group_size=32`` and float16 scales.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["read_experts", "TENSOR_NAMES"]

#: The tensors of one block, in (gate, up, down) order.
TENSOR_NAMES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
_BLOCK = 32


def _reader(path_or_reader: Any) -> Any:
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a test extra
        raise ImportError("NumaExperts.from_gguf needs the 'gguf' package (pip install gguf)") from e
    if isinstance(path_or_reader, gguf.GGUFReader):
        return path_or_reader
    return gguf.GGUFReader(path_or_reader)


def _decode(name: str, qtype: str, data: np.ndarray, rows: tuple[int, ...], k: int) -> tuple[torch.Tensor, ...]:
    """Raw blocks -> (codes int8 ``[*rows, k]``, scales float16 ``[*rows, k / 32]``)."""
    bsize = 34 if qtype == "Q8_0" else 18
    nblk = k // _BLOCK
    raw = np.ascontiguousarray(data).reshape(-1)
    need = int(np.prod(rows)) * nblk * bsize
    if raw.size != need:
        raise ValueError(f"NumaExperts.from_gguf: {name} holds {raw.size} bytes, expected {need} for {qtype} "
                         f"{list(rows) + [k]}")
    blocks = torch.from_numpy(raw.copy()).reshape(*rows, nblk, bsize)
    scales = blocks[..., :2].contiguous().view(torch.float16).reshape(*rows, nblk)
    qs = blocks[..., 2:].contiguous()
    if qtype == "Q8_0":
        codes = qs.view(torch.int8).reshape(*rows, k)
    else:
        nib = torch.cat([qs & 15, qs >> 4], dim=-1)  # elements 0..15, then 16..31 of each block
        codes = (nib.to(torch.int16) - 8).to(torch.int8).reshape(*rows, k)
    return codes, scales


def read_experts(path_or_reader: Any, layer: int) -> tuple[Any, ...]:
    """``(weight_dtype, gate_q, gate_s, up_q, up_s, down_q, down_s)`` of block ``layer``: codes
    int8 (int4 as values in [-8, 7]) and float16 scales per 32 elements, as stored.

    Raises:
        ValueError: a missing tensor, a format other than Q8_0 / Q4_0, mixed formats, or shapes
            that do not fit together (one line naming the tensor).
    """
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"NumaExperts.from_gguf: layer must be a non-negative int, got {layer!r}")
    reader = _reader(path_or_reader)
    by_name = {t.name: t for t in reader.tensors}
    found = []
    for short in TENSOR_NAMES:
        name = f"blk.{layer}.{short}.weight"
        t = by_name.get(name)
        if t is None:
            raise ValueError(f"NumaExperts.from_gguf: no tensor {name} in the file")
        qtype = getattr(t.tensor_type, "name", str(t.tensor_type))
        if qtype not in ("Q8_0", "Q4_0"):
            raise ValueError(f"NumaExperts.from_gguf: {name} is {qtype}; only Q8_0 and Q4_0 load "
                             "(K-quants and float types are not supported)")
        shape = [int(d) for d in t.shape]  # ggml order: fastest dimension first
        if len(shape) != 3:
            raise ValueError(f"NumaExperts.from_gguf: {name} has ggml shape {shape}, expected 3 dimensions")
        found.append((name, qtype, t, shape))
    types = {q for _, q, _, _ in found}
    if len(types) != 1:
        raise ValueError(f"NumaExperts.from_gguf: block {layer} mixes formats {sorted(types)}; one of Q8_0 or "
                         "Q4_0 for all three tensors is supported")
    (gname, _, _, gshape), (uname, _, _, ushape), (dname, _, _, dshape) = found
    H, inter, E = gshape
    if ushape != gshape:
        raise ValueError(f"NumaExperts.from_gguf: {uname} has ggml shape {ushape}, expected {gshape} like {gname}")
    if dshape != [inter, H, E]:
        raise ValueError(f"NumaExperts.from_gguf: {dname} has ggml shape {dshape}, expected {[inter, H, E]}")
    for name, k in ((gname, H), (dname, inter)):
        if k % _BLOCK:
            raise ValueError(f"NumaExperts.from_gguf: {name} rows of {k} are not whole blocks of 32")
    qtype = types.pop()
    gq, gs = _decode(gname, qtype, found[0][2].data, (E, inter), H)
    uq, us = _decode(uname, qtype, found[1][2].data, (E, inter), H)
    dq, ds = _decode(dname, qtype, found[2][2].data, (E, H), inter)
    return ("int8" if qtype == "Q8_0" else "int4"), gq, gs, uq, us, dq, ds
