"""The embedding service: a canonical request in, finished vectors out. Dialect-free."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from config.profiles import ModelProfile
from gateway.cache.store import EmbeddingCache, cache_key
from gateway.consistency.audit import Auditor
from gateway.errors import REDUCE_PHRASE, InputOverLimit, ModelNotFound
from gateway.pipeline import (
    EmbedRequest,
    Prompt,
    estimate_tokens,
    finish,
    l2_normalize,
    resolve_dimensions,
    resolve_intent,
    resolve_prompt,
)
from gateway.resilience.deadline import Deadline
from gateway.router import Router
from gateway.shadow import Shadows
from gateway.tokens import LengthPolicy, OverLimit


@dataclass(frozen=True, slots=True)
class EmbedResult:
    vectors: np.ndarray  # (n, dimensions) float32
    backends: tuple[str, ...]
    prompt_tokens: int
    space_id: str | None = None  # the embedding space the vectors belong to (x-embedding-space)
    truncated: int = 0  # inputs the gateway cut to the model's limit (x-embedding-truncated)
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
        lengths: dict[str, LengthPolicy] | None = None,
        auditor: Auditor | None = None,
        observe: Callable[[str, list[str]], None] = lambda _model, _texts: None,
    ) -> None:
        self.profiles = profiles
        self.auditor = auditor
        self._observe = observe  # a sampled request's texts for the agreement checks (never logged)
        self.lengths = lengths or {}
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
        prompt = resolve_prompt(profile, resolve_intent(profile, req))
        dims = resolve_dimensions(profile, req.dimensions)
        req, counts, truncated = self._fit(req, profile, prompt)
        deadline = self.router.deadline(timeout_s)
        space = self._space_of(req.model)
        cache = self.cache if self.cache is not None and self.cache.enabled and space is not None else None
        if cache is None or req.cache == "off":
            routed = await self.router.embed(req.model, req.texts, prompt, deadline, _longest(counts, None))
            unit = _full(routed.vectors, profile)
            backends, tokens, state = routed.backends, self._tokens(prompt, req.texts), None
            made = None  # every input
        else:
            assert space is not None  # no space (first check still running): nothing is cached
            unit, backends, tokens, state, made = await self._cached(
                cache, space, req, profile, prompt, deadline, counts
            )
        if counts is not None:  # the model's tokenizer counted them
            tokens = sum(counts)
        after = None
        shadowed = self.shadows is not None and self.shadows.wanted(req.model)
        # Cache hits were audited when they were made: only vectors a backend just produced are.
        audited = self.auditor is not None and made != [] and self.auditor.wanted(req.model)
        if shadowed or audited:
            shadows, auditor, texts, served = self.shadows, self.auditor, req.texts, unit.astype(np.float64)

            async def after() -> None:  # after the response is sent; starts detached comparisons only
                if shadowed and shadows is not None:
                    shadows.compare(req.model, texts, prompt, served)
                if audited and auditor is not None:
                    fresh = [texts[i] for i in made] if made is not None else texts
                    auditor.audit(req.model, fresh, prompt, served if made is None else served[made], backends)
                    self._observe(req.model, fresh)

        vectors = finish(unit, profile, dims)
        return EmbedResult(vectors, backends, tokens, space, after=after, cache=state, truncated=truncated)

    def _fit(
        self, req: EmbedRequest, profile: ModelProfile, prompt: Prompt
    ) -> tuple[EmbedRequest, list[int] | None, int]:
        """The length policy, before any backend is called: every input counted with the model's tokenizer
        (prompt and special tokens included), one over the limit refused or - asked for - cut at a token
        boundary, the same cut text for every backend. (request, tokens of each input, inputs cut)."""
        policy = self.lengths.get(req.model)
        if policy is None or policy.tokenizer is None:
            return req, None, 0
        direction = req.truncate if req.truncate is not None else policy.truncate
        try:
            fitted = policy.tokenizer.fit(
                prompt.prefix,
                req.texts,
                profile.max_input_tokens,
                None if direction == "none" else direction,  # type: ignore[arg-type]
            )
        except OverLimit as exc:
            raise InputOverLimit(
                f"{REDUCE_PHRASE} Input {exc.index} is too long: {exc.tokens} tokens (with the model's prompt and "
                f"special tokens); model {req.model!r} takes at most {exc.limit}. Send a shorter text, or ask for "
                "truncation (`truncate: true`, `truncation_direction`: right or left)",
                param="input",
            ) from None
        if fitted.cut:
            req = dataclasses.replace(req, texts=fitted.texts)
        return req, fitted.tokens, fitted.cut

    async def _cached(
        self,
        cache: EmbeddingCache,
        space: str,
        req: EmbedRequest,
        profile: ModelProfile,
        prompt: Prompt,
        deadline: Deadline,
        counts: list[int] | None,
    ) -> tuple[np.ndarray, tuple[str, ...], int, str, list[int]]:
        """Hits from the cache, misses from the backends, in input order; what the backends made is stored.
        (vectors, backends, tokens, hit|partial|miss, indexes of the inputs a backend just embedded)"""
        keys = [cache_key(space, prompt, t) for t in req.texts]
        found = await cache.get_many(keys) if req.cache != "refresh" else [None] * len(keys)
        missing = [i for i, v in enumerate(found) if v is None]
        metrics = self.router.metrics
        metrics.cache_hits.labels(req.model).inc(len(keys) - len(missing))
        metrics.cache_misses.labels(req.model).inc(len(missing))
        if not missing:
            matrix = np.stack(found)  # type: ignore[arg-type]
            return matrix, (), estimate_tokens(prompt.apply(req.texts)), "hit", []
        texts = [req.texts[i] for i in missing]
        routed = await self.router.embed(req.model, texts, prompt, deadline, _longest(counts, missing))
        fresh = _full(routed.vectors, profile)
        await cache.put_many([keys[i] for i in missing], fresh, routed.backends)
        tokens = self._tokens(prompt, texts)
        if len(missing) == len(keys):
            return fresh, routed.backends, tokens, "miss", missing
        matrix = np.empty((len(keys), fresh.shape[1]), dtype=np.float32)
        matrix[missing] = fresh
        hits = [i for i, v in enumerate(found) if v is not None]
        matrix[hits] = np.stack([found[i] for i in hits])  # type: ignore[misc]
        tokens += estimate_tokens(prompt.apply([req.texts[i] for i in hits]))
        return matrix, routed.backends, tokens, "partial", missing

    @staticmethod
    def _tokens(prompt: Prompt, texts: list[str]) -> int:
        """Usage without the model's tokenizer: the gateway's estimate, never a backend's count (they count
        differently - Infinity counts characters - and a caller's usage must not depend on who served)."""
        return estimate_tokens(prompt.apply(texts))


def _longest(counts: list[int] | None, which: list[int] | None) -> int | None:
    """The most tokens among the inputs sent (all, or those at indexes `which`): who may embed them."""
    if counts is None:
        return None
    return max(counts) if which is None else max(counts[i] for i in which)


def _full(vectors: np.ndarray, profile: ModelProfile) -> np.ndarray:
    """The backend's full-dimension vectors as the cache keeps them: float32, unit length when the
    profile normalizes (slicing and encoding come after)."""
    m = np.asarray(vectors, dtype=np.float32)
    return l2_normalize(m) if profile.normalize else m
