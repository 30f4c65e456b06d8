"""Retry policy for one sub-batch, built from tenacity's strategy objects.

Only what the taxonomy marks retryable is retried (unavailable, timeouts, overloaded, bad output,
misconfigured-elsewhere); an input the backend rejects goes straight back to the client. A retry
moves to the next compatible backend at once; only when every candidate has been tried does it wait,
with full-jitter exponential backoff, never past the request's deadline. Retry-After is honoured by
the circuit breaker, which holds that backend's circuit open for as long as it asked: no attempt
reaches it before then, and when every circuit is open the client gets 503 with a Retry-After
instead of a request held hostage.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    wait_random_exponential,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from backends.errors import BackendError, PayloadTooLarge
from gateway.resilience.deadline import Deadline


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 4
    backoff_base_s: float = 0.05
    backoff_max_s: float = 2.0


def retryable(exc: BaseException) -> bool:
    return isinstance(exc, BackendError) and exc.retryable and not isinstance(exc, PayloadTooLarge)


class wait_next_backend(wait_base):
    """0 s when another untried backend is available; otherwise full-jitter exponential backoff."""

    def __init__(self, policy: RetryPolicy, deadline: Deadline, has_untried: Callable[[], bool]) -> None:
        self._jitter = wait_random_exponential(multiplier=policy.backoff_base_s, max=policy.backoff_max_s)
        self._deadline = deadline
        self._has_untried = has_untried

    def __call__(self, retry_state: RetryCallState) -> float:
        if self._has_untried():
            return 0.0
        return self._deadline.cap(self._jitter(retry_state))


class stop_at_deadline(stop_base):
    def __init__(self, deadline: Deadline) -> None:
        self._deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._deadline.expired


def will_retry(exc: BaseException, has_untried: Callable[[], bool]) -> bool:
    # A batch too large for one backend may suit another; once none is left, the router splits it.
    return retryable(exc) or (isinstance(exc, PayloadTooLarge) and has_untried())


def first_backoff(policy: RetryPolicy, deadline: Deadline, has_untried: Callable[[], bool]) -> float:
    """The wait before the first retry, for a first attempt made outside `retrying()`."""
    if has_untried():
        return 0.0
    return deadline.cap(random.uniform(0, min(policy.backoff_max_s, policy.backoff_base_s)))


def retrying(policy: RetryPolicy, deadline: Deadline, has_untried: Callable[[], bool], done: int = 0) -> AsyncRetrying:
    """Attempts after the `done` already made, within `policy.max_attempts` in all and the deadline."""
    return AsyncRetrying(
        stop=stop_any(stop_after_attempt(policy.max_attempts - done), stop_at_deadline(deadline)),
        wait=wait_next_backend(policy, deadline, has_untried),
        retry=retry_if_exception(lambda e: will_retry(e, has_untried)),
        reraise=True,
    )
