"""OpenAI-compatible `POST /v1/embeddings` (and `POST /embeddings`), with the fields of the APIs that share
its shape: Jina (`task`, `embedding_type`, `normalized`, `late_chunking`, `{"text": ...}` items, see
gateway/api/jina.py) and Voyage (`input_type`, `output_dtype`, `output_dimension`, `truncation`). A field
that changes what a vector means is mapped or refused, never dropped; an unknown one is refused."""

from __future__ import annotations

from typing import Any

import msgspec
import orjson

from gateway.api import jina
from gateway.api.inputs import decode_body, parse_texts, truncation
from gateway.api.quantize import TYPES, rows
from gateway.errors import InvalidRequest
from gateway.pipeline import EmbedRequest
from gateway.runtime import Runtime
from gateway.service import EmbedResult


class OpenAIEmbeddingRequest(msgspec.Struct, forbid_unknown_fields=True):
    input: Any = None
    model: str | None = None
    encoding_format: str | None = None
    dimensions: int | None = None
    user: str | None = None
    prompt_name: str | None = None  # extension: "document" | "query" (the model's prompts)
    truncate: bool | None = None  # extension (as TEI's and Jina's): cut inputs over the limit instead of refusing
    truncation_direction: str | None = None  # extension: "right" (keep the start, default) | "left"
    # Jina
    task: str | None = None
    embedding_type: str | None = None
    normalized: bool | None = None
    late_chunking: bool | None = None
    # Voyage (and Cohere-style clients of this route)
    input_type: str | None = None
    output_dtype: str | None = None
    output_dimension: int | None = None
    truncation: bool | None = None


_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_FLOATS = ("float", "base64")


def _encoding(req: OpenAIEmbeddingRequest) -> str:
    """One output type from the three ways clients ask for one; two that contradict each other are refused."""
    asked = {
        name: value
        for name, value in (
            ("encoding_format", req.encoding_format),
            ("embedding_type", req.embedding_type),
            ("output_dtype", req.output_dtype),
        )
        if value is not None
    }
    allowed = {"encoding_format": _FLOATS, "embedding_type": jina.EMBEDDING_TYPES, "output_dtype": TYPES}
    for name, value in asked.items():
        if value not in allowed[name]:
            raise InvalidRequest(f"{name} {value!r} is not supported; use one of {list(allowed[name])}", param=name)
    # Voyage's SDK always sends encoding_format base64 and decodes the bytes as output_dtype says.
    if req.encoding_format == "base64" and req.output_dtype not in (None, "float") and req.embedding_type is None:
        return f"base64-{req.output_dtype}"
    chosen = {v for v in asked.values() if v != "float"} or {"float"}
    if len(chosen) > 1:
        raise InvalidRequest(f"the output types asked for contradict each other: {asked}; ask for one", param=None)
    return chosen.pop()


def to_request(body: bytes, max_inputs: int, strict: bool = True) -> EmbedRequest:
    req: OpenAIEmbeddingRequest = decode_body(body, OpenAIEmbeddingRequest, strict)
    if not req.model:
        raise InvalidRequest("`model` is required", param="model")
    jina.refuse_unsupported(req.normalized, req.late_chunking)
    if req.task is not None and req.input_type is not None and req.task != req.input_type:
        raise InvalidRequest("`task` and `input_type` both given and they differ; send one", param="input_type")
    intent = ("task", req.task) if req.task is not None else None
    if req.input_type is not None:
        intent = ("input_type", req.input_type)
    if req.dimensions is not None and req.output_dimension is not None and req.dimensions != req.output_dimension:
        raise InvalidRequest("`dimensions` and `output_dimension` both given and they differ", param="dimensions")
    dims = req.dimensions if req.dimensions is not None else req.output_dimension
    texts = parse_texts(req.input, "input", max_inputs)
    cut = truncation(req.truncate if req.truncate is not None else req.truncation, req.truncation_direction)
    return EmbedRequest(
        req.model,
        texts,
        req.prompt_name,
        dims,
        _encoding(req),
        truncate=cut,
        intent=intent,
    )


def render(result: EmbedResult, req: EmbedRequest) -> bytes:
    """Float rows go out as float32 numbers in their shortest form (each parses back to the exact
    float32 the pipeline produced), written by orjson straight from the matrix: no Python floats."""
    embeddings = rows(result.vectors, req.encoding)
    data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(embeddings)]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    model = req.alias or req.model
    return orjson.dumps({"object": "list", "data": data, "model": model, "usage": usage}, option=_NUMPY)


def parse(body: bytes, runtime: Runtime) -> EmbedRequest:
    server = runtime.settings.server
    return to_request(body, server.max_inputs, server.unknown_fields == "reject")
