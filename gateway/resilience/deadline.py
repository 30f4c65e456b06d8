"""A per-request deadline: the budget every attempt, wait and sub-batch of one request shares."""

from __future__ import annotations

import time
from collections.abc import Callable


class Deadline:
    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.seconds = seconds
        self._at = clock() + seconds

    def remaining(self) -> float:
        return max(0.0, self._at - self._clock())

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0.0

    def cap(self, seconds: float) -> float:
        """`seconds`, but never past the deadline."""
        return min(seconds, self.remaining())


def parse_timeout_header(value: str | None, default_s: float) -> float:
    """`x-request-timeout: <seconds>` may lower the default deadline, never raise it.

    Returns the default for a missing header; raises ValueError for one that is not a positive number.
    """
    if value is None or value == "":
        return default_s
    seconds = float(value)
    if not seconds > 0 or seconds != seconds:
        raise ValueError("must be a positive number of seconds")
    return min(seconds, default_s)
