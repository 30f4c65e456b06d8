"""In-process backends for router-level faults that a real server cannot be made to produce on demand."""

from __future__ import annotations

from collections.abc import Sequence

from backends.base import BackendInfo, Embeddings, Health


class InProcessBackend:
    """The Backend protocol's boilerplate; subclasses implement `embed`."""

    kind = "fake"
    applies_prompt = False

    def __init__(self, name: str, priority: int = 0, model: str = "m") -> None:
        self.name, self.model, self.priority = name, model, priority

    async def embed(
        self, texts: Sequence[str], prompt_name: str | None = None, timeout_s: float | None = None
    ) -> Embeddings:
        raise NotImplementedError

    async def health(self) -> Health:
        return Health(True)

    async def describe(self) -> BackendInfo:
        return BackendInfo(kind=self.kind)

    async def tokenize(self, text: str) -> list[int] | None:
        return None

    async def aclose(self) -> None:
        pass

    def public_url(self) -> str:
        return "fake://"
