"""OpenAI-compatible `POST /v1/embeddings`."""

from __future__ import annotations

import base64
from typing import Any

import msgspec
import orjson

from gateway.api.inputs import decode_body, parse_texts, truncation
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
    truncate: bool | None = None  # extension (as TEI's): cut inputs over the model's limit instead of refusing
    truncation_direction: str | None = None  # extension: "right" (keep the start, default) | "left"


_NUMPY = orjson.OPT_SERIALIZE_NUMPY


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
    cut = truncation(req.truncate, req.truncation_direction)
    return EmbedRequest(req.model, texts, req.prompt_name, req.dimensions, encoding, truncate=cut)  # type: ignore[arg-type]


def render(result: EmbedResult, req: EmbedRequest) -> bytes:
    """Float rows go out as float32 numbers in their shortest form (each parses back to the exact
    float32 the pipeline produced), written by orjson straight from the matrix: no Python floats."""
    vectors = result.vectors
    if req.encoding == "base64":
        little = vectors.astype("<f4", copy=False)
        embeddings: Any = [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    else:
        embeddings = vectors
    data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(embeddings)]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return orjson.dumps({"object": "list", "data": data, "model": req.model, "usage": usage}, option=_NUMPY)


def parse(body: bytes, runtime: Runtime) -> EmbedRequest:
    return to_request(body, runtime.settings.server.max_inputs)
