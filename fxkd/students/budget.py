"""Budgets for an analysis that may run away: torch-pruning's group enumeration has run for
over ten minutes on some models (timm's ReXNet) and exhausted 24 GiB on others (torchvision's
Swin). Past its budget the analysis is interrupted with ``BudgetExceeded`` so the caller can
fall back or refuse, instead of hanging or being killed for memory."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import threading
import time
from collections.abc import Iterator

__all__ = ["BudgetExceeded", "analysis_budget", "default_memory_budget", "resident_bytes",
           "time_budget"]  # fmt: skip

CHECK_EVERY_S = 0.1
"""How often the budget is checked (a SIGALRM interval timer)."""


class BudgetExceeded(Exception):
    """An analysis ran past its time or memory budget."""


def resident_bytes() -> int:
    """This process's resident memory now (``/proc/self/statm``), else its peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def default_memory_budget() -> int | None:
    """Half the memory available now (``MemAvailable``), so a runaway analysis stops before the
    machine kills the process; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError):
        pass
    return None


@contextlib.contextmanager
def analysis_budget(seconds: float | None, memory_bytes: int | None = None) -> Iterator[None]:
    """Raise ``BudgetExceeded`` inside the block once ``seconds`` have passed or the resident
    memory has grown by more than ``memory_bytes`` since the block began (checked every
    ``CHECK_EVERY_S`` by a SIGALRM timer: Python code is interrupted between bytecodes, a long
    C call when it returns). No budget (the block runs to its end) when both are None, off the
    main thread, or where the platform has no interval timer."""
    if (
        (seconds is None and memory_bytes is None)
        or threading.current_thread() is not threading.main_thread()
        or not hasattr(signal, "setitimer")
    ):
        yield
        return
    start, base = time.monotonic(), resident_bytes()

    def check(signum, frame):
        if seconds is not None and time.monotonic() - start >= seconds:
            raise BudgetExceeded(f"ran past its budget of {seconds:g} s")
        if memory_bytes is not None and resident_bytes() - base > memory_bytes:
            raise BudgetExceeded(f"grew past its memory budget of {memory_bytes / 2**30:.2g} GiB")

    previous = signal.signal(signal.SIGALRM, check)
    first = CHECK_EVERY_S if seconds is None else min(CHECK_EVERY_S, max(seconds, 1e-3))
    signal.setitimer(signal.ITIMER_REAL, first, CHECK_EVERY_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def time_budget(seconds: float | None) -> contextlib.AbstractContextManager[None]:
    """``analysis_budget`` with a wall-clock budget only."""
    return analysis_budget(seconds)
