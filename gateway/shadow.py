"""Shadow backends: a sample of live requests is also embedded on a shadow, after the client has its
answer, and each vector's cosine with the one served is recorded. A shadow never serves a client.

This is how a new TEI version, a quantization or an EIS endpoint is proven on real traffic before it
is promoted. Comparisons run detached from the request (never delaying it), at most
`_CONCURRENCY` at a time per shadow; a sampled request beyond that is dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.errors import BackendError
from config.profiles import ModelProfile
from gateway.calls import BackendCalls, Purpose
from gateway.errors import DeadlineExceeded
from gateway.metrics import Metrics
from gateway.pipeline import Prompt
from gateway.resilience.deadline import Deadline
from gateway.state import BackendState

log = logging.getLogger(__name__)

_CONCURRENCY = 4
_KEEP = 10_000  # recent cosines kept per shadow for its percentiles
_TIMEOUT_S = 30.0


@dataclass
class ShadowStats:
    samples: int = 0
    texts: int = 0
    errors: int = 0
    dropped: int = 0
    min_cosine: float | None = None
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=_KEEP))
    in_flight: int = 0

    def add(self, cosines: np.ndarray) -> None:
        self.samples += 1
        self.texts += len(cosines)
        lo = float(cosines.min())
        self.min_cosine = lo if self.min_cosine is None else min(self.min_cosine, lo)
        self.recent.extend(float(c) for c in cosines)

    def summary(self, profile: ModelProfile) -> dict[str, Any]:
        recent = np.fromiter(self.recent, dtype=np.float64) if self.recent else None
        verdict = "pending"
        if self.min_cosine is not None:
            lo = self.min_cosine
            verdict = "agree" if lo >= profile.warn_cosine else "drift" if lo >= profile.agree_cosine else "disagree"
        return {
            "samples": self.samples,
            "texts": self.texts,
            "errors": self.errors,
            "dropped": self.dropped,
            "min_cosine": None if self.min_cosine is None else round(self.min_cosine, 6),
            "p1_cosine": None if recent is None else round(float(np.percentile(recent, 1)), 6),
            "p50_cosine": None if recent is None else round(float(np.percentile(recent, 50)), 6),
            "verdict": verdict,
        }


class Shadows:
    def __init__(self, states: Sequence[BackendState], calls: BackendCalls, metrics: Metrics) -> None:
        self._by_model: dict[str, list[BackendState]] = {}
        for st in states:
            if st.shadow:
                self._by_model.setdefault(st.backend.model, []).append(st)
        self._calls = calls
        self._metrics = metrics
        self.stats: dict[str, ShadowStats] = {
            st.backend.name: ShadowStats() for g in self._by_model.values() for st in g
        }
        self._tasks: set[asyncio.Task[None]] = set()

    def wanted(self, model: str) -> bool:
        return model in self._by_model

    def compare(self, model: str, texts: list[str], prompt: Prompt, served: np.ndarray) -> None:
        """Start comparisons of a served request (full-dimension unit vectors); returns at once."""
        for st in self._by_model.get(model, []):
            sample = float(getattr(getattr(st.backend, "config", None), "shadow_sample", 0.0))
            if sample <= 0 or random.random() >= sample:
                continue
            stats = self.stats[st.backend.name]
            if stats.in_flight >= _CONCURRENCY:
                stats.dropped += 1
                self._metrics.shadow_dropped.labels(model, st.backend.name).inc()
                continue
            stats.in_flight += 1
            task = asyncio.create_task(self._one(model, st, texts, prompt, served), name=f"shadow-{st.backend.name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _one(self, model: str, st: BackendState, texts: list[str], prompt: Prompt, served: np.ndarray) -> None:
        stats = self.stats[st.backend.name]
        try:
            sent = texts if st.backend.applies_prompt else prompt.apply(texts)
            out = await self._calls.embed(
                st, sent, prompt.name, deadline=Deadline(_TIMEOUT_S), purpose=Purpose.CHECK, timeout_s=_TIMEOUT_S
            )
            vectors = out.vectors.astype(np.float64)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            cosines = np.sum(vectors * served, axis=1)
            stats.add(cosines)
            histogram = self._metrics.shadow_cosine.labels(model, st.backend.name)
            for c in cosines:
                histogram.observe(float(c))
        except (BackendError, DeadlineExceeded) as exc:
            stats.errors += 1
            if stats.errors == 1 or stats.errors % 100 == 0:
                log.warning("shadow %s: comparison failed (%d so far): %s", st.backend.name, stats.errors, exc)
        finally:
            stats.in_flight -= 1

    def report(self, profiles: dict[str, ModelProfile]) -> list[dict[str, Any]]:
        return [
            {"model": model, "backend": st.backend.name, **self.stats[st.backend.name].summary(profiles[model])}
            for model, group in self._by_model.items()
            for st in group
        ]

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
