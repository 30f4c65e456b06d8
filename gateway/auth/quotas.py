"""Per-key quotas with the `limits` library: requests and texts per window (a request of 1,000 texts
costs 1,000), counted in memory or in Redis.

With Redis every worker and replica charges the same counters (atomic scripts), so a limit holds in
total. With `memory://` each process counts for itself and enforces its share (limit / workers), so
N workers never admit more than the limit between them. When Redis cannot be reached, the
configured fallback applies - per-process shares (`local`) or 503 (`reject`) - never "unlimited";
the outage is logged once, counted, and Redis is tried again after a second.

A fallback never starts from zero (that admitted 50 requests in a minute for rpm = 30 with two workers):
each process remembers the shared remaining Redis last reported for each key and window, the workers of
`serve --workers N` pool those figures through the control plane (each second), and in a fallback each
process admits at most its 1/N of the smallest remaining known for the window - so the processes together
stay within what was left. Only a window nobody has a figure for starts from the per-process share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.errors import StorageError
from limits.storage import storage_from_string

from config.auth import AuthSettings, KeyConfig
from gateway.errors import QuotaStorageUnavailable, RateLimited
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

_STRATEGIES: dict[str, type[RateLimiter]] = {
    "sliding-window": SlidingWindowCounterRateLimiter,
    "moving-window": MovingWindowRateLimiter,
    "fixed-window": FixedWindowRateLimiter,
}
_RETRY_SHARED_S = 1.0  # after a storage error, per-process limits for this long, then Redis again
_NAMESPACE = "embedding-gateway"


@dataclass(frozen=True, slots=True)
class Window:
    limit: int
    remaining: int
    reset_s: float


def _reset(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* format: "1s", "6m0s", "250ms"."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def headers(requests: Window | None, texts: Window | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for what, w in (("requests", requests), ("texts", texts)):
        if w is not None:
            out[f"x-ratelimit-limit-{what}"] = str(w.limit)
            out[f"x-ratelimit-remaining-{what}"] = str(w.remaining)
            out[f"x-ratelimit-reset-{what}"] = _reset(w.reset_s)
    return out


class Quotas:
    def __init__(self, settings: AuthSettings, metrics: Metrics, workers: Callable[[], int] = lambda: 1) -> None:
        self.settings = settings
        self._metrics = metrics
        self._workers = workers
        self.shared = not settings.storage.startswith("memory://")
        strategy = _STRATEGIES[settings.strategy]
        self._local = strategy(MemoryStorage())
        self._storage: Storage | None = None
        self._remote: RateLimiter | None = None
        if self.shared:
            storage = storage_from_string(
                "async+" + settings.storage,
                implementation="redispy",
                wrap_exceptions=True,
                socket_timeout=0.5,
                socket_connect_timeout=0.5,
            )
            assert isinstance(storage, Storage)  # "async+" gives the asyncio flavour
            self._storage = storage
            self._remote = strategy(storage)
        self._down_until = 0.0
        self._outage: str | None = None
        # "key/what" -> (window number, shared remaining): this process's latest figure from Redis, and the
        # smallest any worker reported (pooled by the control plane).
        self.seen: dict[str, tuple[int, int]] = {}
        self.pooled: dict[str, tuple[int, int]] = {}

    def inherit(self, old: Quotas) -> None:
        """A reload keeps the counters when they are counted the same way (else a reload would reset
        every key's quota)."""
        same = (old.settings.storage, old.settings.strategy, old.settings.window_s)
        if same == (self.settings.storage, self.settings.strategy, self.settings.window_s):
            self._local, self._remote, self._storage = old._local, old._remote, old._storage
            self.seen, self.pooled = old.seen, old.pooled

    def _item(self, amount: int | None, share: int) -> RateLimitItem | None:
        if amount is None:
            return None
        return RateLimitItemPerSecond(max(1, amount // share), self.settings.window_s, namespace=_NAMESPACE)

    async def admit(self, key: KeyConfig, texts: int) -> dict[str, str]:
        """Charge one request of `texts` texts to `key`; its x-ratelimit-* headers, or RateLimited."""
        if key.rpm is None and key.texts_per_minute is None:
            return {}
        if self._remote is not None and time.monotonic() >= self._down_until:
            try:
                windows = await self._charge(self._remote, key, texts, share=1)
            except StorageError as exc:
                self._storage_failed(exc)
                await self._drop_connections()
            else:
                self._note(key, windows)
                return headers(*windows)
        if self.shared and self.settings.on_storage_error == "reject":
            self._metrics.key_rejection(key.name, "storage_unavailable")
            raise QuotaStorageUnavailable(
                "the shared quota store is unreachable and auth.on_storage_error = reject; retry shortly",
                retry_after=_RETRY_SHARED_S,
            )
        share = max(1, self._workers())
        if self.shared:
            await self._cap_to_known(key, share)
        return headers(*await self._charge(self._local, key, texts, share=share))

    def _window_no(self) -> int:
        return int(time.time() // self.settings.window_s)

    def _note(self, key: KeyConfig, windows: tuple[Window | None, Window | None]) -> None:
        now = self._window_no()
        for what, window in zip(("requests", "texts"), windows, strict=True):
            if window is not None:
                self.seen[f"{key.name}/{what}"] = (now, window.remaining)

    def observations(self) -> dict[str, tuple[int, int]]:
        """This window's figures, for the control plane to pool."""
        now = self._window_no()
        return {k: v for k, v in self.seen.items() if v[0] == now}

    def learn(self, pooled: dict[str, Any]) -> None:
        self.pooled = {k: (int(v[0]), int(v[1])) for k, v in pooled.items()}

    async def _cap_to_known(self, key: KeyConfig, share: int) -> None:
        """Before a fallback charge: this process may use at most 1/share of the smallest shared remaining
        known for this window."""
        now = self._window_no()
        for what, amount in (("requests", key.rpm), ("texts", key.texts_per_minute)):
            item = self._item(amount, share)
            if item is None:
                continue
            known = [
                v[1]
                for v in (self.seen.get(f"{key.name}/{what}"), self.pooled.get(f"{key.name}/{what}"))
                if v and v[0] == now
            ]
            if not known:
                continue
            stats = await self._local.get_window_stats(item, key.name, what)
            excess = stats.remaining - min(known) // share
            if excess > 0:
                await self._local.hit(item, key.name, what, cost=excess)

    async def _drop_connections(self) -> None:
        """Close every pooled connection: after Redis restarts each of them is dead, and trying them one
        by one made the store flip between unreachable and reachable for 20 s. The next try connects anew."""
        client = getattr(getattr(self._storage, "bridge", None), "storage", None)
        pool = getattr(client, "connection_pool", None)
        if pool is not None:
            with contextlib.suppress(Exception):
                await pool.disconnect()

    def _storage_failed(self, exc: StorageError) -> None:
        self._down_until = time.monotonic() + _RETRY_SHARED_S
        self._metrics.ratelimit_storage_errors.inc()
        message = f"{type(exc.storage_error).__name__}: {exc.storage_error}"
        if self._outage is None:
            fallback = (
                "requests are refused (503)"
                if self.settings.on_storage_error == "reject"
                else f"each process enforces its share of every limit (1/{max(1, self._workers())})"
            )
            log.error("quota storage %s unreachable (%s): %s", _redacted(self.settings.storage), message, fallback)
        self._outage = message

    async def _charge(
        self, limiter: RateLimiter, key: KeyConfig, texts: int, share: int
    ) -> tuple[Window | None, Window | None]:
        """Charge `limiter`; the request and text windows after it, or RateLimited."""
        requests = self._item(key.rpm, share)
        text_item = self._item(key.texts_per_minute, share)
        if text_item is not None and texts > text_item.amount:
            self._metrics.key_rejection(key.name, "request_too_large")
            raise RateLimited(
                f"this request has {texts} texts, more than key {key.name!r} may send in a window "
                f"({text_item.amount} texts per {self.settings.window_s}s): split it",
                code="request_too_large",
                headers={},
            )
        if requests is not None and not await limiter.hit(requests, key.name, "requests"):
            window = await self._window(limiter, requests, key, "requests")
            if limiter is self._remote:  # used up for everyone: this process's fallback too
                self._note(key, (window, None))
            raise self._limited(key, "rpm", window, headers(window, None))
        if text_item is not None and not await limiter.hit(text_item, key.name, "texts", cost=texts):
            window = await self._window(limiter, text_item, key, "texts")
            if limiter is self._remote:
                self._note(key, (None, window))
            raise self._limited(key, "texts_per_minute", window, headers(None, window))
        if limiter is self._remote and self._outage is not None:
            log.info("quota storage reachable again: limits are shared again")
            self._outage = None
        if requests is not None and text_item is not None:  # both at once: one round trip of latency
            r, t = await asyncio.gather(
                self._window(limiter, requests, key, "requests"), self._window(limiter, text_item, key, "texts")
            )
            return r, t
        return (
            await self._window(limiter, requests, key, "requests") if requests else None,
            await self._window(limiter, text_item, key, "texts") if text_item else None,
        )

    async def _window(self, limiter: RateLimiter, item: RateLimitItem, key: KeyConfig, what: str) -> Window:
        stats = await limiter.get_window_stats(item, key.name, what)
        return Window(item.amount, max(0, stats.remaining), max(0.0, stats.reset_time - time.time()))

    def _limited(self, key: KeyConfig, reason: str, window: Window, hdrs: dict[str, str]) -> RateLimited:
        hdrs["Retry-After"] = str(max(1, math.ceil(window.reset_s)))
        self._metrics.key_rejection(key.name, reason)
        return RateLimited(
            f"rate limit reached for key {key.name!r}: {window.limit} "
            f"{'requests' if reason == 'rpm' else 'texts'} per {self.settings.window_s}s; "
            f"retry after {hdrs['Retry-After']}s",
            code=f"{reason}_exceeded",
            headers=hdrs,
        )

    async def current(self, key: KeyConfig) -> dict[str, Window]:
        """The key's windows now, without charging (for /v1/usage): shared ones when Redis answers."""
        limiter = self._remote if self._remote is not None and time.monotonic() >= self._down_until else self._local
        share = 1 if limiter is self._remote else max(1, self._workers())
        out = {}
        for what, amount in (("requests", key.rpm), ("texts", key.texts_per_minute)):
            item = self._item(amount, share)
            if item is not None:
                try:
                    out[what] = await self._window(limiter, item, key, what)
                except StorageError as exc:
                    self._storage_failed(exc)
                    await self._drop_connections()
        return out


def _redacted(uri: str) -> str:
    """The storage URI without a password."""
    scheme, sep, rest = uri.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest
