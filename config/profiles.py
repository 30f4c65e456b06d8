"""Model profiles: what the gateway must know about a model to put every backend in one space."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Pooling = Literal["mean", "cls", "last"]


class ModelProfile(BaseModel):
    """The facts about one embedding model that the canonical pipeline and the checker rely on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dimension: int = Field(gt=0, description="full output dimension of the model")
    matryoshka_dimensions: tuple[int, ...] = Field(
        default=(), description="dimensions a client may ask for (the full dimension is always allowed)"
    )
    pooling: Pooling
    prompts: dict[str, str] = Field(default_factory=dict, description="prompt name -> prefix")
    default_prompt_name: str | None = None
    # A client's intent (Jina `task`, Cohere/Voyage `input_type`) -> the prompt that expresses it; the common
    # names (COMMON_TASKS) apply to every model unless overridden here.
    tasks: dict[str, str] = Field(default_factory=dict, description="task / input_type name -> prompt name")
    max_input_tokens: int = Field(gt=0)
    normalize: bool = Field(True, description="return L2-normalized vectors")
    # Agreement thresholds on the cosine of two backends' vectors for one probe (jina-v5.md §9):
    # at or above `warn_cosine` they agree; down to `agree_cosine` it is precision drift (still one
    # space); below `error_cosine` it is a configuration error, not numerical noise.
    agree_cosine: float = Field(0.99, gt=0, le=1)
    warn_cosine: float = Field(0.999, gt=0, le=1)
    error_cosine: float = Field(0.97, gt=0, le=1)

    @model_validator(mode="after")
    def _consistent(self) -> ModelProfile:
        too_big = [d for d in self.matryoshka_dimensions if d <= 0 or d > self.dimension]
        if too_big:
            raise ValueError(f"matryoshka_dimensions {too_big} must lie in 1..{self.dimension}")
        if not self.error_cosine <= self.agree_cosine <= self.warn_cosine:
            raise ValueError("thresholds must satisfy error_cosine <= agree_cosine <= warn_cosine")
        wrong = {t: p for t, p in self.tasks.items() if self.prompts and p not in self.prompts}
        if wrong:
            raise ValueError(f"tasks {wrong} name prompts the model does not have; its prompts: {sorted(self.prompts)}")
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            raise ValueError(
                f"default_prompt_name {self.default_prompt_name!r} is not one of prompts {sorted(self.prompts)}"
            )
        return self

    @property
    def allowed_dimensions(self) -> tuple[int, ...]:
        return tuple(sorted({*self.matryoshka_dimensions, self.dimension}))

    @property
    def task_table(self) -> dict[str, str]:
        """Every intent name a client may send, and the prompt it means (for a model without prompts every
        intent gives the same vector: they are all accepted)."""
        common = {t: p for t, p in COMMON_TASKS.items() if not self.prompts or p in self.prompts}
        return {**common, **self.tasks}


# Intent names the common embedding APIs use (Cohere and Voyage `input_type`, Jina `task`, sentence-transformers
# prompt names). Classification and clustering embed as documents unless a model's profile says otherwise.
COMMON_TASKS: dict[str, str] = {
    "query": "query",
    "document": "document",
    "passage": "document",
    "search_query": "query",
    "search_document": "document",
    "retrieval.query": "query",
    "retrieval.passage": "document",
    "classification": "document",
    "clustering": "document",
}


_JINA_PROMPTS = {"query": "Query: ", "document": "Document: "}
# jina-embeddings-v5 text-matching (../shared/research/jina-v5.md): its other tasks embed as documents.
_JINA_TASKS = {"text-matching": "document", "classification": "document", "clustering": "document"}

BUILTIN_PROFILES: dict[str, ModelProfile] = {
    "jina-embeddings-v5-text-small-text-matching": ModelProfile(
        dimension=1024,
        matryoshka_dimensions=(32, 64, 128, 256, 512, 768, 1024),
        pooling="last",
        prompts=_JINA_PROMPTS,
        default_prompt_name="document",
        tasks=_JINA_TASKS,
        max_input_tokens=32768,
    ),
    "jina-embeddings-v5-text-nano-text-matching": ModelProfile(
        dimension=768,
        matryoshka_dimensions=(32, 64, 128, 256, 512, 768),
        pooling="last",
        prompts=_JINA_PROMPTS,
        default_prompt_name="document",
        tasks=_JINA_TASKS,
        max_input_tokens=8192,
    ),
    "all-minilm-l6-v2": ModelProfile(
        dimension=384,
        pooling="mean",
        max_input_tokens=256,
    ),
}
