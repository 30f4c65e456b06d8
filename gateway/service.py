"""The embedding service: a canonical request in, finished vectors out. Dialect-free."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from config.profiles import ModelProfile
from gateway.errors import ModelNotFound
from gateway.pipeline import EmbedRequest, estimate_tokens, finish, resolve_dimensions, resolve_prompt
from gateway.router import Router
from gateway.shadow import Shadows


def unit_rows(m: np.ndarray) -> np.ndarray:
    v: np.ndarray = m.astype(np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


@dataclass(frozen=True, slots=True)
class EmbedResult:
    vectors: np.ndarray  # (n, dimensions) float32
    backends: tuple[str, ...]
    prompt_tokens: int
    space_id: str | None = None  # the embedding space the vectors belong to (x-embedding-space)
    after: Callable[[], Awaitable[None]] | None = None  # to run once the client has its answer (shadows)


class EmbeddingService:
    def __init__(
        self,
        profiles: dict[str, ModelProfile],
        router: Router,
        space_of: Callable[[str], str | None] = lambda _model: None,
        shadows: Shadows | None = None,
    ) -> None:
        self.profiles = profiles
        self.router = router
        self._space_of = space_of
        self.shadows = shadows

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
        routed = await self.router.embed(req.model, req.texts, prompt, self.router.deadline(timeout_s))
        tokens = routed.prompt_tokens if routed.prompt_tokens is not None else estimate_tokens(prompt.apply(req.texts))
        after = None
        if self.shadows is not None and self.shadows.wanted(req.model):
            shadows, texts, served = self.shadows, req.texts, unit_rows(routed.vectors)

            async def after() -> None:  # after the response is sent; starts detached comparisons only
                shadows.compare(req.model, texts, prompt, served)

        vectors = finish(routed.vectors, profile, dims)
        return EmbedResult(vectors, routed.backends, tokens, self._space_of(req.model), after)
