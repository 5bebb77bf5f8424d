"""Holding Ctrl-C back while a few lines must run together.

A checkpoint write and the record of which checkpoint is the last one belong
together: an interrupt between the two would leave the newest file on disk while
the run reports the one before it.
"""

from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["interrupts_held"]


@contextlib.contextmanager
def interrupts_held():
    """Run the block to its end even if SIGINT arrives; raise ``KeyboardInterrupt``
    right after it when one did.

    Outside the main thread (where Python delivers signals anyway) and where the
    program has its own SIGINT handler, this changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        yield
        return
    arrived = []
    signal.signal(signal.SIGINT, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if arrived:
        raise KeyboardInterrupt
