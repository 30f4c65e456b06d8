"""TEI-compatible `POST /embed`, so TEI clients can point at the gateway unchanged."""

from __future__ import annotations

from typing import Any

import msgspec
import orjson

from gateway.api.inputs import decode_body, parse_texts, truncation
from gateway.errors import InvalidRequest
from gateway.pipeline import EmbedRequest
from gateway.runtime import Runtime
from gateway.service import EmbedResult


class TEIEmbedRequest(msgspec.Struct, forbid_unknown_fields=True):
    inputs: Any = None
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: str | None = None
    prompt_name: str | None = None
    dimensions: int | None = None
    model: str | None = None  # extension: which model; default the server's default model


def to_request(body: bytes, default_model: str, max_inputs: int, strict: bool = True) -> EmbedRequest:
    req: TEIEmbedRequest = decode_body(body, TEIEmbedRequest, strict)
    if not req.normalize:
        raise InvalidRequest(
            "normalize=false is not supported: the gateway always returns L2-normalized vectors so that every "
            "backend yields the same embedding space; omit `normalize`",
            param="normalize",
        )
    cut = truncation(req.truncate, req.truncation_direction)
    texts = parse_texts(req.inputs, "inputs", max_inputs)
    return EmbedRequest(req.model or default_model, texts, req.prompt_name, req.dimensions, "float", truncate=cut)


def parse(body: bytes, runtime: Runtime) -> EmbedRequest:
    server = runtime.settings.server
    return to_request(body, runtime.default_model, server.max_inputs, server.unknown_fields == "reject")


def render(result: EmbedResult, _req: EmbedRequest) -> bytes:
    return orjson.dumps(result.vectors, option=orjson.OPT_SERIALIZE_NUMPY)  # float32 rows, shortest form
