"""Hold back Ctrl-C across a state transition that must not be cut in half.

A ``KeyboardInterrupt`` is raised by Python's SIGINT handler at whatever bytecode the main
thread reaches next: right after a native call returns, for instance, before the Python
bookkeeping that belongs with it. :func:`deferred_sigint` installs a handler that only records
SIGINT for the duration of a block, then restores the previous handler and hands it the
signal, so the interrupt lands after the block, never inside it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["deferred_sigint"]


class _Recorder:
    """The SIGINT handler while a block runs: remembers that the signal came."""

    def __init__(self) -> None:
        self.frame: FrameType | None = None
        self.count = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.frame = frame


@contextmanager
def deferred_sigint() -> Iterator[None]:
    """Run the block with SIGINT held back; deliver it to the previous handler afterwards.

    Only the main thread runs Python signal handlers, so elsewhere (and when the current
    handler was installed outside Python, which cannot be restored) the block runs as is.
    Nested blocks defer to the outermost one. The previous handler gets one call however
    many signals came: ``default_int_handler`` raises ``KeyboardInterrupt``, ``SIG_DFL``
    re-raises the signal, ``SIG_IGN`` drops it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None or isinstance(previous, _Recorder):
        yield
        return
    recorder = _Recorder()
    signal.signal(signal.SIGINT, recorder)  # a signal pending before this goes to `previous`
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if recorder.count:
            if callable(previous):
                previous(signal.SIGINT, recorder.frame)
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)
