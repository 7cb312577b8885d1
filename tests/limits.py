"""A time bound for tests of code that must never hang (loaders on damaged files, error messages
about absurd sizes)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class TimeBoundExceeded(BaseException):
    """Raised by the alarm inside code that runs too long. A BaseException, so that no
    `except Exception` in the code under test can turn it into an ordinary error."""


@contextlib.contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    """Raise TimeBoundExceeded in the main thread if the block runs longer than `seconds`."""

    def on_alarm(signum, frame):
        raise TimeBoundExceeded(f"ran longer than {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
