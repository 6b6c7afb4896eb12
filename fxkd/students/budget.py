"""A wall-clock budget for an analysis that may run away (torch-pruning's group enumeration
has run for over ten minutes on some models): past it, the analysis is interrupted with
``BudgetExceeded`` so the caller can fall back or refuse, instead of hanging."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["BudgetExceeded", "time_budget"]


class BudgetExceeded(Exception):
    """An analysis ran past its time budget."""


@contextlib.contextmanager
def time_budget(seconds: float | None) -> Iterator[None]:
    """Raise ``BudgetExceeded`` inside the block once ``seconds`` have passed (a SIGALRM timer:
    Python code is interrupted between bytecodes, a long C call when it returns). No budget
    (the block runs to its end) when ``seconds`` is None, off the main thread, or where the
    platform has no interval timer."""
    if (
        seconds is None
        or threading.current_thread() is not threading.main_thread()
        or not hasattr(signal, "setitimer")
    ):
        yield
        return

    def expire(signum, frame):
        raise BudgetExceeded(f"ran past its budget of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
