"""Linux cpulist strings ("0-3,8,10-11") and human memory sizes ("380G")."""

from __future__ import annotations

import re
from collections.abc import Iterable

from composer_numa.errors import ComposerNumaError

__all__ = ["parse_cpulist", "format_cpulist", "parse_size", "format_size"]


def parse_cpulist(text: str) -> tuple[int, ...]:
    """Parse a kernel cpulist (``0-3,8,10-14:2`` style) into sorted ids.

    Raises:
        ValueError: the text is not a cpulist.
    """
    out: set[int] = set()
    text = text.strip()
    if not text:
        return ()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+)(?:/(\d+))?)?)?", part)
        if m is None:
            raise ValueError(f"not a cpulist: {text!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"not a cpulist: {text!r} (range {part} runs backwards)")
        if m.group(3) is not None:
            used, group = int(m.group(3)), int(m.group(4) or m.group(3))
            if used <= 0 or group <= 0:
                raise ValueError(f"not a cpulist: {text!r}")
            out.update(i for i in range(lo, hi + 1) if (i - lo) % group < used)
        else:
            out.update(range(lo, hi + 1))
    return tuple(sorted(out))


def format_cpulist(ids: Iterable[int]) -> str:
    """Format ids as a compact cpulist: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    s = sorted(set(ids))
    parts: list[str] = []
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        parts.append(str(s[i]) if i == j else f"{s[i]}-{s[j]}")
        i = j + 1
    return ",".join(parts)


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str | int) -> int:
    """Parse a memory size: ``"380G"``, ``"512MiB"``, ``"1.5t"``, ``"4096"`` (bytes).

    Binary units (K = 1024). Raises ComposerNumaError with the offending text.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ComposerNumaError(f"invalid size {text}: must not be negative")
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtpKMGTP]?)(?:i?[bB])?\s*", str(text))
    if m is None:
        raise ComposerNumaError(
            f"invalid size {text!r}: expected a number with an optional unit, e.g. 380G or 512MiB"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    """Format bytes with a binary unit: ``format_size(3 << 30) == "3.0 GiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
