"""What a backend can take, learned from what it does: its call time per text count, the timeouts that
follow from it, and how many calls at once it sustains.

A slow backend is *slow*, not failed. Fixed timeouts turned a saturated backend into failures (timeouts,
then an open circuit, then 99 % of requests refused); so each backend's per-call timeout is a multiple of
its recent call time for that many texts (within a floor - the configured timeout - and a ceiling), and
only a call that runs past that learned bound is a failure.

Concurrency: a backend handed more calls than it can work on queues them internally, where the gateway
cannot see or shed them. The limit starts from what the backend declares (at most `START_MAX`) and
adapts (AIMD, as TCP and Netflix's concurrency-limits do): while calls take about their unloaded time it
creeps up (+1 per `limit` calls), never past the declared value (llama.cpp's slots are a hard limit); when
a call takes much longer than the unloaded time for its size the backend is queueing, so the limit drops
to what Little's law says it works on at once (calls in flight x unloaded time / call time; x0.8 to x0.5,
at most once per unloaded call time). Extra calls then queue in the gateway, where their wait is known and
can be refused at once.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

_SAMPLES = 64  # recent successful calls (per size class) the model is taken over
START_MAX = 4  # the adaptive limit starts at what the backend declares, but no higher than this


@dataclass(frozen=True, slots=True)
class CapacityPolicy:
    timeout_multiplier: float = 4.0  # a call may take this many times its usual time before it is a failure
    max_call_timeout_s: float = 120.0  # ...but never longer than this
    queueing_factor: float = 1.6  # a call slower than this many times its unloaded time: the backend queues
    decrease: float = 0.8


_RESORT_EVERY = 8  # quantiles are re-read after this many new samples (a sort per call costs on the hot path)


_BEST_DRIFT = 1.01  # the unloaded time creeps up 1 % per slower call: a backend that got slower for good is re-learned


class _Bucket:
    def __init__(self) -> None:
        self.rates: deque[float] = deque(maxlen=_SAMPLES)
        self._sorted: list[float] = []
        self._new = 0
        self.best = math.inf  # the fastest call lately: the unloaded time (not flooded by queued calls)
        self.overdue = 0.0  # a per-text time calls exceeded when they timed out: a bound must allow more

    def overran(self, rate: float) -> None:
        self.overdue = max(self.overdue, rate)

    def add(self, rate: float) -> None:
        self.overdue /= _BEST_DRIFT  # forgotten as calls succeed again
        self.rates.append(rate)
        self._new += 1
        self.best = rate if rate < self.best else min(rate, self.best * _BEST_DRIFT)

    def quantile(self, q: float) -> float:
        if self._new >= _RESORT_EVERY or len(self._sorted) < min(len(self.rates), _RESORT_EVERY):
            self._sorted = sorted(self.rates)
            self._new = 0
        s = self._sorted
        return s[min(len(s) - 1, int(q * len(s)))]


def _size_class(texts: int) -> int:
    """Calls are compared with calls of about the same size (1, 2-3, 4-7, ... texts): per text, a call of 256
    texts is far cheaper than one of 1, so one rate for all would call every small call slow."""
    return min(10, max(1, texts).bit_length())


class CallTimes:
    """Seconds per text of recent successful calls, by size class ((n + 1) per call: the fixed cost counts
    as one text)."""

    def __init__(self) -> None:
        self._buckets: dict[int, _Bucket] = {}

    def observe(self, texts: int, seconds: float) -> None:
        self._buckets.setdefault(_size_class(texts), _Bucket()).add(seconds / (texts + 1))

    def overran(self, texts: int, seconds: float) -> None:
        """A call timed out after `seconds`: it takes longer than that, which the next bounds allow for (the
        typical time is not touched: nobody knows how long it would have taken)."""
        self._buckets.setdefault(_size_class(texts), _Bucket()).overran(seconds / (texts + 1))

    def _nearest(self, texts: int) -> _Bucket | None:
        if not self._buckets:
            return None
        want = _size_class(texts)
        return self._buckets[min(self._buckets, key=lambda c: (abs(c - want), -c))]  # a larger class if tied

    def _rate(self, texts: int, q: float) -> float | None:
        bucket = self._nearest(texts)
        if bucket is None or not bucket.rates:
            return bucket.overdue * 2 if bucket is not None and bucket.overdue else None
        return max(bucket.quantile(q), bucket.overdue * 2 if q >= 0.9 else 0.0)

    def usual_s(self, texts: int) -> float | None:
        """A typical call of `texts` texts now (p90 of recent per-text times); None before any sample."""
        rate = self._rate(texts, 0.9)
        return None if rate is None else rate * (texts + 1)

    def unloaded_s(self, texts: int) -> float | None:
        """The call time when the backend is not queueing: the fastest call of that size lately."""
        bucket = self._nearest(texts)
        if bucket is None or not bucket.rates:
            return None
        return bucket.best * (texts + 1)

    def timeout_s(self, texts: int, floor_s: float, policy: CapacityPolicy) -> float:
        """The learned bound for one call: a multiple of the usual time, never below `floor_s` (the
        configured timeout) nor above the policy's ceiling."""
        usual = self.usual_s(texts)
        learned = policy.timeout_multiplier * usual if usual is not None else 0.0
        return min(max(floor_s, learned), max(floor_s, policy.max_call_timeout_s))


class ConcurrencyLimit:
    """AIMD on call time against the unloaded call time; `apply` sets the admission limit it feeds."""

    def __init__(
        self,
        apply: Callable[[int], None],
        policy: CapacityPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._apply = apply
        self.policy = policy or CapacityPolicy()
        self._clock = clock
        self.declared = 0
        self.value = 1.0
        self._decreased_at = -math.inf

    @property
    def limit(self) -> int:
        return max(1, math.ceil(self.value - 1e-9))

    def reset(self, declared: int) -> None:
        """What the backend (or the configuration) says it takes: the growth cap, and the starting point up
        to `START_MAX` (TEI declares 512 concurrent *requests*, not 512 slots: sending it 512 calls at once
        would only queue them inside). The same figure again keeps what was learned."""
        declared = max(1, declared)
        if declared != self.declared:
            self.declared = declared
            self.value = float(min(declared, START_MAX))
        self._apply(self.limit)

    def observe(self, seconds: float, unloaded_s: float | None, busy: bool, in_flight: int) -> None:
        """One successful call of `seconds`, whose unloaded time is `unloaded_s`, with `in_flight` calls at the
        backend (itself included); `busy`: the limit was in use."""
        before = self.limit
        if unloaded_s is not None and seconds > self.policy.queueing_factor * unloaded_s:
            now = self._clock()
            if now - self._decreased_at >= unloaded_s:  # a burst of slow answers is one signal
                self._decreased_at = now
                working = in_flight * unloaded_s / seconds  # Little's law: the calls it really works on
                value = min(self.value, float(in_flight))  # a limit above what is in flight says nothing
                step = max(value * 0.5, 1.25 * working)  # at most halved per signal: one sample is noisy
                self.value = max(1.0, min(value * self.policy.decrease, step))
        elif busy:
            self.value = min(float(self.declared), self.value + 1.0 / self.value)
        if self.limit != before:
            self._apply(self.limit)
