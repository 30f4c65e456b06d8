"""The OpenAPI description of the embedding routes.

Those routes are served straight from ASGI (`gateway/api/direct.py`), so Litestar never runs these
handlers: they exist so that `/schema/openapi.json` describes every route - request, response and
error shapes - from the same types. A handler here that ran would be a routing bug, hence the error.
"""

from __future__ import annotations

from typing import Annotated, Literal, NoReturn

import msgspec
from litestar import post
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPI, Schema
from litestar.params import JSONBody

# -- request bodies ------------------------------------------------------------------------------
Text = Annotated[str, msgspec.Meta(min_length=1, description="a text with something visible in it")]


class JinaText(msgspec.Struct):
    text: Text


Intent = Annotated[
    str,
    msgspec.Meta(
        description="what the vector is for (query, document, search_query, retrieval.passage...): mapped to "
        "the model's prompt (GET /v1/models: `tasks`); a value the model does not serve is a 400"
    ),
]


class OpenAIEmbeddingRequest(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    input: Text | list[Text | JinaText]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    user: str | None = None
    prompt_name: str | None = msgspec.field(default=None)  # extension: one of the model's prompts
    truncate: bool | None = None  # extension: cut an input over the model's limit instead of refusing it
    truncation_direction: Literal["right", "left", "Right", "Left"] | None = None  # extension: which end goes
    task: Intent | None = None  # Jina
    embedding_type: Literal["float", "base64", "binary", "ubinary"] | None = None  # Jina
    normalized: Literal[True] | None = None  # Jina (false is refused)
    late_chunking: Literal[False] | None = None  # Jina (true is refused)
    input_type: Intent | None = None  # Voyage, Cohere-style clients
    output_dtype: Literal["float", "int8", "uint8", "binary", "ubinary"] | None = None  # Voyage
    output_dimension: int | None = None  # Voyage
    truncation: bool | None = None  # Voyage


class CohereEmbedRequest(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    texts: list[Text]
    input_type: Intent | None = None
    embedding_types: list[Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]] | None = None
    truncate: Literal["NONE", "START", "END"] | None = None
    output_dimension: int | None = None


class CohereEmbeddings(msgspec.Struct, omit_defaults=True):
    float_: list[list[float]] | None = msgspec.field(default=None, name="float")
    int8: list[list[int]] | None = None
    uint8: list[list[int]] | None = None
    binary: list[list[int]] | None = None
    ubinary: list[list[int]] | None = None
    base64: list[str] | None = None


class CohereBilled(msgspec.Struct):
    input_tokens: int


class CohereMeta(msgspec.Struct):
    billed_units: CohereBilled


class CohereEmbedResponse(msgspec.Struct):
    id: str
    response_type: Literal["embeddings_by_type", "embeddings_floats"]
    embeddings: CohereEmbeddings | list[list[float]]  # the matrix: "embeddings_floats" (v1 without embedding_types)
    texts: list[str]
    meta: CohereMeta


class CohereError(msgspec.Struct):
    """Every error on Cohere's routes (`/v2/embed`, `/v1/embed`)."""

    message: str


class TEIEmbedRequest(msgspec.Struct, forbid_unknown_fields=True):
    inputs: Text | list[Text]
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: Literal["right", "left", "Right", "Left"] | None = None
    prompt_name: str | None = None
    dimensions: int | None = None
    model: str | None = None  # extension: default the server's default model


# -- responses -----------------------------------------------------------------------------------
class OpenAIEmbedding(msgspec.Struct):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32; quantized types give integers


class OpenAIUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingResponse(msgspec.Struct):
    object: Literal["list"]
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class OpenAIErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str


class OpenAIError(msgspec.Struct):
    """Every error on `/v1/*` and the other non-TEI routes."""

    error: OpenAIErrorDetail


class TEIError(msgspec.Struct):
    """Every error on TEI's routes (`/embed`, `/`, `/invocations`, `/info`)."""

    error: str
    error_type: str


def _errors(body: type, statuses: dict[int, str]) -> dict[int, ResponseSpec]:
    return {status: ResponseSpec(data_container=body, description=why) for status, why in statuses.items()}


EMBED_ERRORS = {
    400: "invalid input: the message says which field and why (an over-long input: OpenAI's 'Please reduce your prompt'"
    " words on /v1/embeddings)",
    401: "no valid API key (auth on)",
    404: "unknown model, or one the key may not use",
    405: "another method than POST",
    413: "body over server.max_body_bytes (on TEI's routes also an over-long input)",
    429: "the key's quota is used up: Retry-After and x-ratelimit-* headers",
    503: "no compatible backend could serve, or the gateway is overloaded: Retry-After",
    504: "the request's deadline passed",
}
_WHY = {
    400: "invalid parameter, or (reload) a configuration that does not load",
    401: "no valid API key (auth on; views only with auth.protect_views, /metrics with protect_metrics)",
    403: "an admin route called with a key that is not an admin key",
    404: "unknown model, or one the key may not use",
    405: "method not allowed",
    503: "the control plane did not answer (serve --workers N): retry",
}


def errors_of(*statuses: int, tei: bool = False) -> dict[int, ResponseSpec]:
    """The error responses of an operational route, in its dialect (405 and 401 always possible)."""
    return _errors(TEIError if tei else OpenAIError, {s: _WHY[s] for s in sorted({401, 405, *statuses})})


class Readiness(msgspec.Struct):
    status: Literal["ready", "not ready"]
    models: dict[str, list[str]]
    models_without_healthy_backend: list[str] | None = None
    models_checking_agreement: list[str] | None = None
    pending_verification: dict[str, list[str]] | None = None
    quarantined: list[str] | None = None


def describe_models(spec: OpenAPI, models: list[str]) -> None:
    """Name the configured models in the request schemas (as examples: a reload may add models, and any
    other name is a documented 404), so generated requests reach the embedding pipeline too."""
    schemas = spec.components.schemas if spec.components and spec.components.schemas else {}
    for name in ("OpenAIEmbeddingRequest", "TEIEmbedRequest", "CohereEmbedRequest"):
        entry = schemas.get(name)
        model = entry.properties.get("model") if entry is not None and entry.properties else None
        if isinstance(model, Schema):
            model.examples = list(models)
            model.description = "one of the configured models (GET /v1/models); another name gets 404"
        field = {"OpenAIEmbeddingRequest": "input", "TEIEmbedRequest": "inputs"}.get(name, "texts")
        text = entry.properties.get(field) if entry and entry.properties else None
        if isinstance(text, Schema):
            text.examples = ["The sun sets behind the hills.", ["first document", "second document"]]


def _not_here() -> NoReturn:
    raise RuntimeError("embedding routes are served by gateway.api.direct, never by Litestar")


@post(
    "/v1/embeddings",
    status_code=200,
    summary="Embed texts (OpenAI-compatible; Jina's and Voyage's fields too)",
    responses=_errors(OpenAIError, EMBED_ERRORS),
    response_headers=None,
)
async def openai_embeddings(data: JSONBody[OpenAIEmbeddingRequest]) -> OpenAIEmbeddingResponse:
    _not_here()


@post(
    "/embeddings",
    status_code=200,
    summary="Embed texts: /v1/embeddings without /v1 (where llama.cpp and vLLM serve it)",
    responses=_errors(OpenAIError, EMBED_ERRORS),
    name="embeddings-unversioned",
)
async def openai_embeddings_unversioned(data: JSONBody[OpenAIEmbeddingRequest]) -> OpenAIEmbeddingResponse:
    _not_here()


def _cohere(path: str):  # type: ignore[no-untyped-def]
    @post(
        path,
        status_code=200,
        summary="Embed texts (Cohere's embed API)",
        responses=_errors(CohereError, EMBED_ERRORS),
        name=f"cohere{path}",
    )
    async def handler(data: JSONBody[CohereEmbedRequest]) -> CohereEmbedResponse:
        _not_here()

    return handler


cohere_v2 = _cohere("/v2/embed")
cohere_v1 = _cohere("/v1/embed")


def _tei(path: str, summary: str):  # type: ignore[no-untyped-def]
    @post(path, status_code=200, summary=summary, responses=_errors(TEIError, EMBED_ERRORS), name=f"tei{path}")
    async def handler(data: JSONBody[TEIEmbedRequest]) -> list[list[float]]:
        _not_here()

    return handler


tei_embed = _tei("/embed", "Embed texts (TEI-compatible)")
tei_root = _tei("/", "Embed texts (TEI's root route, as huggingface_hub calls it)")
tei_invocations = _tei("/invocations", "Embed texts (TEI's SageMaker route)")
HANDLERS = [
    openai_embeddings,
    openai_embeddings_unversioned,
    cohere_v2,
    cohere_v1,
    tei_embed,
    tei_root,
    tei_invocations,
]
