"""TEI-compatible `POST /embed`, so TEI clients can point at the gateway unchanged."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, post

from gateway.api.inputs import decode_body, parse_texts, request_timeout
from gateway.errors import InvalidRequest
from gateway.pipeline import EmbedRequest
from gateway.runtime import Runtime


class TEIEmbedRequest(msgspec.Struct):
    inputs: Any = None
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: str | None = None
    prompt_name: str | None = None
    dimensions: int | None = None
    model: str | None = None  # extension: which model; default the server's default model


_encode = msgspec.json.Encoder().encode


def to_request(body: bytes, default_model: str, max_inputs: int) -> EmbedRequest:
    req: TEIEmbedRequest = decode_body(body, TEIEmbedRequest)
    if not req.normalize:
        raise InvalidRequest(
            "normalize=false is not supported: the gateway always returns L2-normalized vectors so that every "
            "backend yields the same embedding space; omit `normalize`",
            param="normalize",
        )
    if req.truncation_direction is not None and req.truncation_direction.lower() not in ("right", "left"):
        raise InvalidRequest("truncation_direction must be 'right' or 'left'", param="truncation_direction")
    texts = parse_texts(req.inputs, "inputs", max_inputs)
    return EmbedRequest(req.model or default_model, texts, req.prompt_name, req.dimensions, "float")


@post("/embed", status_code=200)
async def embed(request: Request[Any, Any, Any]) -> Response[bytes]:
    runtime: Runtime = request.app.state.runtime
    server = runtime.settings.server
    req = to_request(await request.body(), runtime.default_model, server.max_inputs)
    result = await runtime.service.embed(req, request_timeout(request.headers.get("x-request-timeout")))
    return Response(
        _encode(result.vectors.tolist()), media_type="application/json", headers=runtime.result_headers(result)
    )
