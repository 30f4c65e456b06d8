"""Routing a canonical batch to the backends of its model.

Simple fallback (issue 2): backends of one model are tried in priority order, known-unhealthy ones
last; on a retryable failure (connection, timeout, 5xx, 429, bad output, misconfiguration) the next
one serves. An input the backend rejects goes straight back to the client. Issue 4 replaces the
policy with retries, circuit breakers and health-aware routing behind the same `embed()` seam.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from backends.base import Embeddings
from backends.errors import BackendError, BackendMisconfigured, BackendUnavailable, BadBackendOutput, InputRejected
from gateway.errors import NoBackendAvailable
from gateway.metrics import Metrics
from gateway.pipeline import Prompt
from gateway.state import BackendState

log = logging.getLogger(__name__)

NO_PROMPT = Prompt(None, "")


@dataclass(frozen=True, slots=True)
class Routed:
    vectors: np.ndarray
    backends: tuple[str, ...]
    prompt_tokens: int | None


def check_output(backend: str, out: Embeddings, n: int, dimension: int) -> None:
    """A wrong count, wrong dimension, non-finite or zero vector is a backend failure, never client data."""
    v = out.vectors
    if v.ndim != 2 or v.shape[0] != n:
        raise BadBackendOutput(backend, f"returned {v.shape[0] if v.ndim else 0} vectors for {n} inputs")
    if v.shape[1] != dimension:
        raise BadBackendOutput(backend, f"returned dimension {v.shape[1]}, the model profile says {dimension}")
    if not np.isfinite(v).all():
        raise BadBackendOutput(backend, "returned non-finite numbers (NaN or infinity)")
    if n and not np.any(v, axis=1).all():
        raise BadBackendOutput(backend, "returned an all-zero vector")


class Router:
    def __init__(self, states: Sequence[BackendState], dimensions: dict[str, int], metrics: Metrics) -> None:
        self._by_model: dict[str, list[BackendState]] = {}
        for st in states:
            self._by_model.setdefault(st.backend.model, []).append(st)
        for group in self._by_model.values():
            group.sort(key=lambda st: st.backend.priority)  # stable: config order breaks ties
        self._dimensions = dimensions
        self._metrics = metrics

    def candidates(self, model: str) -> list[BackendState]:
        # Known-bad backends go last rather than away: when all look bad, trying is better than refusing.
        return sorted(self._by_model.get(model, []), key=lambda st: st.healthy is False)

    async def embed(self, model: str, texts: list[str], prompt: Prompt = NO_PROMPT) -> Routed:
        """Embed `texts` (without prompt) on the first backend of `model` that can serve them."""
        errors: list[str] = []
        retry_after = 1.0
        for attempt, st in enumerate(self.candidates(model)):
            backend = st.backend
            started = time.perf_counter()
            try:
                sent = texts if backend.applies_prompt else prompt.apply(texts)
                out = await backend.embed(sent, prompt.name)
                check_output(backend.name, out, len(texts), self._dimensions[model])
            except InputRejected as exc:
                st.record_failure(exc.message, unhealthy=False)
                self._metrics.backend_call(backend.name, exc.kind, time.perf_counter() - started)
                raise
            except Exception as exc:
                if not isinstance(exc, BackendError):
                    # An adapter bug must cost one backend attempt, not the client's request.
                    if st.should_log(f"unexpected {type(exc).__name__}"):
                        log.exception("backend %s raised an unexpected error", backend.name)
                    exc = BackendUnavailable(backend.name, f"unexpected error: {type(exc).__name__}")
                elapsed = time.perf_counter() - started
                st.record_failure(exc.message, unhealthy=not isinstance(exc, BadBackendOutput))
                self._metrics.backend_call(backend.name, exc.kind, elapsed)
                if st.should_log(exc.message):
                    level = logging.ERROR if isinstance(exc, BackendMisconfigured) else logging.WARNING
                    log.log(level, "backend %s failed (%s): %s", backend.name, exc.kind, exc.message)
                errors.append(f"{backend.name}: {exc.kind}")
                retry_after = max(retry_after, getattr(exc, "retry_after", None) or 0.0)
                continue
            elapsed = time.perf_counter() - started
            st.record_success(elapsed)
            self._metrics.backend_call(backend.name, "ok", elapsed)
            if attempt:
                self._metrics.fallback(model)
            return Routed(out.vectors, (backend.name,), out.prompt_tokens)
        raise NoBackendAvailable(
            f"no backend of model {model!r} could serve the request ({'; '.join(errors) or 'none configured'})",
            retry_after=retry_after,
        )
