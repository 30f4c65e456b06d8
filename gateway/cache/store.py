"""The embedding cache: full-dimension unit vectors (float32) keyed by (space id, prompt, SHA-256 of the text).

Correct by construction: the space id is in the key (a re-recorded space or another live reference never
serves old entries), so is the prompt actually applied (queries and documents never collide), and one
entry serves every Matryoshka dimension and both encodings because slicing and encoding happen after it.

Two tiers: an in-process LRU bounded in bytes, and optionally Redis shared by workers and replicas, with
the LRU in front. Redis trouble is never a client error: the cache falls back to the LRU (logged once,
counted) and tries Redis again after a second.

Only verified vectors stay: each entry remembers which backend(s) produced it and when; entries newer
than a backend's last passing agreement check are dropped when that backend is quarantined.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from config.cache import CacheSettings
from gateway.consistency.report import Verdict
from gateway.metrics import Metrics

if TYPE_CHECKING:
    from gateway.pipeline import Prompt
    from gateway.state import BackendState

log = logging.getLogger(__name__)

_ENTRY_OVERHEAD = 200  # bytes per LRU entry besides the vector: key string, dict slot, array header
_RETRY_SHARED_S = 1.0


def cache_key(space: str, prompt: Prompt, text: str) -> str:
    digest = hashlib.sha256(f"{prompt.name or ''}\x00{prompt.prefix}\x00{text}".encode()).hexdigest()
    return f"egc:{space}:{digest}"


_TRACKED = 100_000  # recent entries remembered per backend (~10 MB): what a live audit failure drops


class EmbeddingCache:
    def __init__(self, settings: CacheSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.enabled = settings.enabled and (settings.max_bytes > 0 or settings.url is not None)
        self._metrics = metrics
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self.bytes = 0
        self._made_by: dict[str, deque[tuple[float, str]]] = {}  # backend -> (inserted at, key), oldest first
        self._redis: Any = None
        if settings.url:
            import redis.asyncio as aioredis

            self._redis = aioredis.Redis.from_url(settings.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._down_until = 0.0
        self._outage: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- reading -------------------------------------------------------------------------------
    async def get_many(self, keys: Sequence[str]) -> list[np.ndarray | None]:
        found: list[np.ndarray | None] = []
        for key in keys:
            vector = self._lru.get(key)
            if vector is not None:
                self._lru.move_to_end(key)
            found.append(vector)
        missing = [i for i, v in enumerate(found) if v is None]
        if missing and self._shared_up():
            try:
                values = await self._redis.mget([keys[i] for i in missing])
            except Exception as exc:  # any Redis trouble: the local tier alone, never a client error
                self._shared_failed(exc)
            else:
                self._shared_ok()
                for i, raw in zip(missing, values, strict=True):
                    if raw:
                        vector = np.frombuffer(raw, dtype="<f4")
                        found[i] = vector
                        self._remember(keys[i], vector)
        return found

    # -- writing -------------------------------------------------------------------------------
    async def put_many(self, keys: Sequence[str], vectors: np.ndarray, backends: Sequence[str]) -> None:
        """Store unit vectors that backends of the compatible set produced (the router routes only there)."""
        now = time.time()
        for key, vector in zip(keys, vectors, strict=True):
            self._remember(key, np.ascontiguousarray(vector, dtype="<f4"))
            for b in backends:
                self._made_by.setdefault(b, deque(maxlen=_TRACKED)).append((now, key))
        if self._shared_up():
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key, vector in zip(keys, vectors, strict=True):
                        pipe.set(key, np.ascontiguousarray(vector, dtype="<f4").tobytes(), ex=self.settings.ttl_s)
                    await pipe.execute()
            except Exception as exc:
                self._shared_failed(exc)
            else:
                self._shared_ok()

    def _remember(self, key: str, vector: np.ndarray) -> None:
        if self.settings.max_bytes <= 0:
            return
        size = vector.nbytes + _ENTRY_OVERHEAD
        old = self._lru.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes + _ENTRY_OVERHEAD
        self._lru[key] = vector
        self.bytes += size
        while self.bytes > self.settings.max_bytes and self._lru:
            _, evicted = self._lru.popitem(last=False)
            self.bytes -= evicted.nbytes + _ENTRY_OVERHEAD
            self._metrics.cache_evictions.inc()
        self._metrics.cache_bytes.set(self.bytes)

    # -- verdicts ------------------------------------------------------------------------------
    def sync(self, states: Sequence[BackendState]) -> None:
        """After agreement verdicts change: entries of a quarantined backend newer than its last passing
        check go (all it made lately when a live audit caught it: it has no last pass then); those older than
        a backend's last pass stay, tracked (the last _TRACKED per backend) in case a live audit catches it."""
        for st in states:
            made = self._made_by.get(st.backend.name)
            if not made:
                continue
            passed = st.last_pass_at or 0.0
            if st.agreement is Verdict.DISAGREE:
                doomed = [key for at, key in made if at >= passed]
                made.clear()
                self._drop(doomed, st.backend.name)

    def _drop(self, keys: list[str], backend: str) -> None:
        for key in keys:
            old = self._lru.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes + _ENTRY_OVERHEAD
        self._metrics.cache_bytes.set(self.bytes)
        if keys:
            log.warning(
                "cache: dropped %d entries backend %s produced since its last passing check", len(keys), backend
            )
        if keys and self._redis is not None:
            task = asyncio.ensure_future(self._drop_shared(keys))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drop_shared(self, keys: list[str]) -> None:
        with contextlib.suppress(Exception):
            await self._redis.delete(*keys)

    # -- the shared tier's health --------------------------------------------------------------
    def _shared_up(self) -> bool:
        return self._redis is not None and time.monotonic() >= self._down_until

    def _shared_failed(self, exc: Exception) -> None:
        self._down_until = time.monotonic() + _RETRY_SHARED_S
        self._metrics.cache_storage_errors.inc()
        if self._outage is None:
            log.error(
                "cache: shared tier unreachable (%s: %s): local cache only until it answers", type(exc).__name__, exc
            )
        self._outage = str(exc)

    def _shared_ok(self) -> None:
        if self._outage is not None:
            log.info("cache: shared tier reachable again")
            self._outage = None

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
