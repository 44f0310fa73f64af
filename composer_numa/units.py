"""The kernel's list grammar ("0-3,8,10-14:2") and byte sizes ("380G"): parse and format.

Every module that reads or prints CPU lists, node lists or memory sizes uses
these, so the grammar is the same everywhere (sysfs, procfs, options, reports).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from composer_numa.errors import ComposerNumaError

__all__ = ["MAX_ID", "parse_cpulist", "format_cpulist", "parse_size", "format_size"]

#: Largest CPU or node id accepted: the kernel's own limit (NR_CPUS) is 8192; a
#: list naming ids beyond this is malformed, not a machine (and must not make us
#: build a list of millions of ids).
MAX_ID = 1 << 16

_PART = re.compile(r"(\d{1,9})(?:-(\d{1,9})(?::(\d{1,9})(?:/(\d{1,9}))?)?)?")


def parse_cpulist(text: str, *, limit: int = MAX_ID) -> tuple[int, ...]:
    """Parse a kernel cpulist (``0-3,8,10-14:2`` style) into sorted ids.

    Args:
        text: the list.
        limit: ids must be below this.

    Raises:
        ValueError: the text is not a cpulist, or names an id at or above ``limit``.
    """
    out: set[int] = set()
    text = text.strip()
    if not text:
        return ()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = _PART.fullmatch(part)
        if m is None:
            raise ValueError(f"not a cpulist: {_short(text)}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"not a cpulist: {_short(text)} (range {part} runs backwards)")
        if hi >= limit:
            raise ValueError(f"not a cpulist: {_short(text)} (id {hi} is beyond the largest possible {limit - 1})")
        if m.group(3) is not None:
            used, group = int(m.group(3)), int(m.group(4) or m.group(3))
            if used <= 0 or group <= 0:
                raise ValueError(f"not a cpulist: {_short(text)}")
            out.update(i for i in range(lo, hi + 1) if (i - lo) % group < used)
        else:
            out.update(range(lo, hi + 1))
    return tuple(sorted(out))


def format_cpulist(ids: Iterable[int], empty: str = "") -> str:
    """Format ids as a compact cpulist: ``[0, 1, 2, 5]`` -> ``"0-2,5"``; ``empty`` when there are none."""
    s = sorted(set(ids))
    parts: list[str] = []
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        parts.append(str(s[i]) if i == j else f"{s[i]}-{s[j]}")
        i = j + 1
    return ",".join(parts) or empty


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
_SIZE = re.compile(r"\s*(\d+)(?:\.(\d+))?\s*([kmgtpeKMGTPE]?)(?:i?[bB])?\s*")
#: Sizes must be below this (16 EiB): nothing larger is a machine's memory.
MAX_SIZE = 1 << 64


def parse_size(text: str | int) -> int:
    """Parse a memory size: ``"380G"``, ``"512MiB"``, ``"1.5t"``, ``"4096"`` (bytes).

    Binary units (K = 1024).

    Raises:
        ComposerNumaError: naming the offending text (malformed, negative or above 16 EiB).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ComposerNumaError(f"invalid size {text}: must not be negative")
        if text >= MAX_SIZE:
            raise ComposerNumaError(f"invalid size {text}: larger than 16 EiB")
        return text
    m = _SIZE.fullmatch(str(text))
    if m is None:
        raise ComposerNumaError(
            f"invalid size {_short(str(text))}: expected a number with an optional unit, e.g. 380G or 512MiB"
        )
    unit = _UNITS[m.group(3).lower()]
    if len(m.group(1).lstrip("0")) > 20:  # more digits than 16 EiB has
        raise ComposerNumaError(f"invalid size {_short(str(text))}: larger than 16 EiB")
    whole = int(m.group(1)) * unit
    frac = (m.group(2) or "")[:20]
    value = whole + (int(frac) * unit) // (10 ** len(frac)) if frac else whole
    if value >= MAX_SIZE:
        raise ComposerNumaError(f"invalid size {_short(str(text))}: larger than 16 EiB")
    return value


def format_size(n: int) -> str:
    """Format bytes with a binary unit: ``format_size(3 << 30) == "3.0 GiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(value) < 1024 or unit == "EiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _short(text: str, limit: int = 60) -> str:
    """``repr`` of text, cut to ``limit`` characters so a malformed input stays one line."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
