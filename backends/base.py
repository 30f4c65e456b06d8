"""The interface every backend adapter implements, and the values it returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True, slots=True)
class Embeddings:
    """Vectors in input order: (n, dim) float32, full dimension, no prompt added by the backend. No token
    count: a caller's usage is the model tokenizer's count, whoever served (backends count differently)."""

    vectors: np.ndarray


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What a backend says about itself; the agreement checker compares this with the model profile."""

    kind: str
    model_id: str | None = None
    pooling: str | None = None
    dimension: int | None = None
    max_input_tokens: int | None = None
    max_batch_size: int | None = None
    max_concurrency: int | None = None  # calls it serves at once (llama.cpp slots, TEI max_concurrent_requests)
    extra: dict[str, object] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    name: str
    kind: str
    model: str
    priority: int
    # False (the norm): texts arrive with the model's prompt already prepended by the gateway.
    # True: the backend applies the prompt named `prompt_name` itself (TEI prompt_mode="backend", EIS
    # input_type), so it receives plain texts. The agreement checker verifies either way.
    applies_prompt: bool

    async def embed(
        self, texts: Sequence[str], prompt_name: str | None = None, timeout_s: float | None = None
    ) -> Embeddings: ...

    async def health(self) -> Health: ...

    async def describe(self) -> BackendInfo: ...

    # The token ids the backend makes of a text as sent (prompt included, special tokens added); None when
    # it has no tokenize route. Evidence for the checker when vectors disagree on some texts only.
    async def tokenize(self, text: str) -> list[int] | None: ...

    async def aclose(self) -> None: ...

    def public_url(self) -> str: ...
