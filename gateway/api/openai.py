"""OpenAI-compatible `POST /v1/embeddings`."""

from __future__ import annotations

import base64
from typing import Any, Literal

import msgspec
from litestar import Request, Response, post

from gateway.api.inputs import decode_body, parse_texts
from gateway.api.serve import serve_embeddings
from gateway.errors import InvalidRequest
from gateway.pipeline import EmbedRequest
from gateway.runtime import Runtime
from gateway.service import EmbedResult


class OpenAIEmbeddingRequest(msgspec.Struct):
    input: Any = None
    model: str | None = None
    encoding_format: str | None = None
    dimensions: int | None = None
    user: str | None = None
    prompt_name: str | None = None  # extension: "document" | "query" (the model's prompts)


class _Item(msgspec.Struct):
    index: int
    embedding: list[float] | str
    object: Literal["embedding"] = "embedding"


class _Usage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class _Response(msgspec.Struct):
    data: list[_Item]
    model: str
    usage: _Usage
    object: Literal["list"] = "list"


_encode = msgspec.json.Encoder().encode


def to_request(body: bytes, max_inputs: int) -> EmbedRequest:
    req: OpenAIEmbeddingRequest = decode_body(body, OpenAIEmbeddingRequest)
    if not req.model:
        raise InvalidRequest("`model` is required", param="model")
    encoding = "float" if req.encoding_format is None else req.encoding_format
    if encoding not in ("float", "base64"):
        raise InvalidRequest(
            f"encoding_format {encoding!r} is not supported; use 'float' or 'base64'", param="encoding_format"
        )
    texts = parse_texts(req.input, "input", max_inputs)
    return EmbedRequest(req.model, texts, req.prompt_name, req.dimensions, encoding)  # type: ignore[arg-type]


def render(result: EmbedResult, req: EmbedRequest) -> bytes:
    vectors = result.vectors
    if req.encoding == "base64":
        little = vectors.astype("<f4", copy=False)
        embeddings: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    else:
        embeddings = vectors.tolist()
    items = [_Item(index=i, embedding=e) for i, e in enumerate(embeddings)]
    usage = _Usage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
    return _encode(_Response(data=items, model=req.model, usage=usage))


def _parse(body: bytes, runtime: Runtime) -> EmbedRequest:
    return to_request(body, runtime.settings.server.max_inputs)


@post("/v1/embeddings", status_code=200)
async def create_embeddings(request: Request[Any, Any, Any]) -> Response[bytes]:
    return await serve_embeddings(request, _parse, render)
