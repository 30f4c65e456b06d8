"""The embedding service: a canonical request in, finished vectors out. Dialect-free."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from config.profiles import ModelProfile
from gateway.cache.store import EmbeddingCache, cache_key
from gateway.errors import ModelNotFound
from gateway.pipeline import (
    EmbedRequest,
    Prompt,
    estimate_tokens,
    finish,
    l2_normalize,
    resolve_dimensions,
    resolve_prompt,
)
from gateway.resilience.deadline import Deadline
from gateway.router import Router
from gateway.shadow import Shadows


@dataclass(frozen=True, slots=True)
class EmbedResult:
    vectors: np.ndarray  # (n, dimensions) float32
    backends: tuple[str, ...]
    prompt_tokens: int
    space_id: str | None = None  # the embedding space the vectors belong to (x-embedding-space)
    after: Callable[[], Awaitable[None]] | None = None  # to run once the client has its answer (shadows)
    cache: str | None = None  # hit | partial | miss (x-embedding-cache); None: the cache was not used


class EmbeddingService:
    def __init__(
        self,
        profiles: dict[str, ModelProfile],
        router: Router,
        space_of: Callable[[str], str | None] = lambda _model: None,
        shadows: Shadows | None = None,
        cache: EmbeddingCache | None = None,
    ) -> None:
        self.profiles = profiles
        self.router = router
        self._space_of = space_of
        self.shadows = shadows
        self.cache = cache

    def profile(self, model: str) -> ModelProfile:
        try:
            return self.profiles[model]
        except KeyError:
            raise ModelNotFound(
                f"model {model!r} does not exist; known models: {sorted(self.profiles)}", param="model"
            ) from None

    async def embed(self, req: EmbedRequest, timeout_s: float | None = None) -> EmbedResult:
        """`timeout_s` (from x-request-timeout) may lower the configured request deadline."""
        profile = self.profile(req.model)
        prompt = resolve_prompt(profile, req.prompt_name)
        dims = resolve_dimensions(profile, req.dimensions)
        deadline = self.router.deadline(timeout_s)
        space = self._space_of(req.model)
        cache = self.cache if self.cache is not None and self.cache.enabled and space is not None else None
        if cache is None or req.cache == "off":
            routed = await self.router.embed(req.model, req.texts, prompt, deadline)
            unit = _full(routed.vectors, profile)
            backends, tokens, state = routed.backends, self._tokens(routed.prompt_tokens, prompt, req.texts), None
        else:
            assert space is not None  # no space (first check still running): nothing is cached
            unit, backends, tokens, state = await self._cached(cache, space, req, profile, prompt, deadline)
        after = None
        if self.shadows is not None and self.shadows.wanted(req.model):
            shadows, texts, served = self.shadows, req.texts, unit.astype(np.float64)

            async def after() -> None:  # after the response is sent; starts detached comparisons only
                shadows.compare(req.model, texts, prompt, served)

        vectors = finish(unit, profile, dims)
        return EmbedResult(vectors, backends, tokens, space, after, state)

    async def _cached(
        self,
        cache: EmbeddingCache,
        space: str,
        req: EmbedRequest,
        profile: ModelProfile,
        prompt: Prompt,
        deadline: Deadline,
    ) -> tuple[np.ndarray, tuple[str, ...], int, str]:
        """Hits from the cache, misses from the backends, in input order; what the backends made is stored."""
        keys = [cache_key(space, prompt, t) for t in req.texts]
        found = await cache.get_many(keys) if req.cache != "refresh" else [None] * len(keys)
        missing = [i for i, v in enumerate(found) if v is None]
        metrics = self.router.metrics
        metrics.cache_hits.labels(req.model).inc(len(keys) - len(missing))
        metrics.cache_misses.labels(req.model).inc(len(missing))
        if not missing:
            matrix = np.stack(found)  # type: ignore[arg-type]
            return matrix, (), estimate_tokens(prompt.apply(req.texts)), "hit"
        texts = [req.texts[i] for i in missing]
        routed = await self.router.embed(req.model, texts, prompt, deadline)
        fresh = _full(routed.vectors, profile)
        await cache.put_many([keys[i] for i in missing], fresh, routed.backends)
        tokens = self._tokens(routed.prompt_tokens, prompt, texts)
        if len(missing) == len(keys):
            return fresh, routed.backends, tokens, "miss"
        matrix = np.empty((len(keys), fresh.shape[1]), dtype=np.float32)
        matrix[missing] = fresh
        hits = [i for i, v in enumerate(found) if v is not None]
        matrix[hits] = np.stack([found[i] for i in hits])  # type: ignore[misc]
        tokens += estimate_tokens(prompt.apply([req.texts[i] for i in hits]))
        return matrix, routed.backends, tokens, "partial"

    @staticmethod
    def _tokens(counted: int | None, prompt: Prompt, texts: list[str]) -> int:
        return counted if counted is not None else estimate_tokens(prompt.apply(texts))


def _full(vectors: np.ndarray, profile: ModelProfile) -> np.ndarray:
    """The backend's full-dimension vectors as the cache keeps them: float32, unit length when the
    profile normalizes (slicing and encoding come after)."""
    m = np.asarray(vectors, dtype=np.float32)
    return l2_normalize(m) if profile.normalize else m
