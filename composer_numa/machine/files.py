"""Reading kernel text files safely: bounded, non-blocking, regular files only.

sysfs and procfs files are small regular files. A recorded or damaged tree may
hold anything in their place: a FIFO (opening it for reading would block), a
huge or binary file, a file we may not read. Each reader here returns the text
or raises :class:`UnreadableFile` with one line saying why, so discovery can
turn it into a warning or an error instead of hanging or growing without bound.
"""

from __future__ import annotations

import errno
import os
import stat

from composer_numa.units import parse_cpulist

__all__ = ["UnreadableFile", "MAX_BYTES", "read_text", "read_optional", "read_int", "read_cpulist"]

#: Largest file read (zoneinfo of a big machine is tens of KiB; sysfs files are one page).
MAX_BYTES = 4 << 20


class UnreadableFile(OSError):
    """A file exists but cannot be read as text; ``str(e)`` names the file and the reason."""


def read_text(path: str) -> str:
    """The file's text, stripped.

    Raises:
        FileNotFoundError: the file does not exist.
        UnreadableFile: not a regular file, not permitted, too large or not text.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            raise FileNotFoundError(e.errno, e.strerror, path) from None
        raise UnreadableFile(e.errno or errno.EIO, f"{path}: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise UnreadableFile(errno.EINVAL, f"{path}: is {kind}")
        chunks, size = [], 0
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError as e:
                raise UnreadableFile(e.errno or errno.EIO, f"{path}: {e.strerror or e}") from None
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_BYTES:
                raise UnreadableFile(errno.EFBIG, f"{path}: larger than {MAX_BYTES} bytes")
            chunks.append(chunk)
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("ascii").strip()
    except UnicodeDecodeError:
        raise UnreadableFile(errno.EINVAL, f"{path}: not text") from None


def read_optional(path: str, problems: list[str] | None = None) -> str | None:
    """The file's text, or None when it is absent; an unreadable file is None too, with
    its reason appended to ``problems`` (absent files are normal in containers and fake trees)."""
    try:
        return read_text(path)
    except FileNotFoundError:
        return None
    except UnreadableFile as e:
        if problems is not None:
            problems.append(str(e))
        return None


def read_int(path: str, problems: list[str] | None = None, base: int = 10) -> int | None:
    """An integer file (``numa_node``, ``core_id``, hexadecimal ``class``); None when absent or malformed."""
    text = read_optional(path, problems)
    if text is None:
        return None
    try:
        return int(text, base) if len(text) <= 32 else None
    except ValueError:
        if problems is not None:
            problems.append(f"{path}: not a number: {text[:40]!r}")
        return None


def read_cpulist(path: str, problems: list[str] | None = None) -> tuple[int, ...] | None:
    """A cpulist/nodelist file; None when absent, unreadable or malformed (reason in ``problems``)."""
    text = read_optional(path, problems)
    if text is None:
        return None
    try:
        return parse_cpulist(text)
    except ValueError as e:
        if problems is not None:
            problems.append(f"{path}: {e}")
        return None
