"""Cohere's embed API: `POST /v2/embed` and `POST /v1/embed`, as the Cohere SDK calls them.

`texts`, `model`, `input_type` (an intent, mapped to a prompt through the model's task table: never
dropped), `embedding_types` (several at once, from the one float pipeline: gateway/api/quantize.py),
`truncate` NONE | START | END (through the model's length policy: NONE refuses an over-long text, START
drops its start, END its end), `output_dimension`. Answers `id`, `embeddings` by type, `texts`,
`meta.billed_units.input_tokens`; errors as Cohere shapes them (`{"message": ...}`).
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import orjson

from gateway.api.inputs import decode_body, parse_texts
from gateway.api.quantize import TYPES, rows
from gateway.errors import InvalidRequest
from gateway.pipeline import EmbedRequest
from gateway.runtime import Runtime
from gateway.service import EmbedResult

_TRUNCATE = {"NONE": "none", "START": "left", "END": "right"}


class CohereEmbedRequest(msgspec.Struct, forbid_unknown_fields=True):
    texts: Any = None
    model: str | None = None
    input_type: str | None = None
    embedding_types: list[str] | None = None
    truncate: str | None = None
    output_dimension: int | None = None
    images: Any = None
    inputs: Any = None
    max_tokens: int | None = None


def to_request(body: bytes, max_inputs: int, strict: bool, v2: bool) -> EmbedRequest:
    req: CohereEmbedRequest = decode_body(body, CohereEmbedRequest, strict)
    if not req.model:
        raise InvalidRequest("`model` is required", param="model")
    if req.images is not None or req.inputs is not None:
        raise InvalidRequest("this gateway embeds `texts` only (no images or mixed inputs)", param="images")
    if req.max_tokens is not None:
        raise InvalidRequest(
            "max_tokens is not supported: the model's own limit applies; use `truncate` START or END to cut "
            "longer texts",
            param="max_tokens",
        )
    types = req.embedding_types if req.embedding_types else ["float"]
    wrong = [t for t in types if t not in TYPES]
    if wrong:
        raise InvalidRequest(
            f"embedding_types {wrong} are not supported; use any of {list(TYPES)}", param="embedding_types"
        )
    cut = None
    if req.truncate is not None:
        cut = _TRUNCATE.get(req.truncate.upper())
        if cut is None:
            raise InvalidRequest("truncate must be NONE, START or END", param="truncate")
    texts = parse_texts(req.texts, "texts", max_inputs)
    return EmbedRequest(
        req.model,
        texts,
        dimensions=req.output_dimension,
        truncate=cut,
        intent=("input_type", req.input_type) if req.input_type is not None else None,
        outputs=tuple(dict.fromkeys(types)),
        # v1 without embedding_types answers a bare float matrix ("embeddings_floats")
        encoding="by_type" if v2 or req.embedding_types else "float",
    )


def render(result: EmbedResult, req: EmbedRequest) -> bytes:
    body: dict[str, Any] = {"id": str(uuid.uuid4())}
    if req.encoding == "float":
        body.update(response_type="embeddings_floats", embeddings=result.vectors)
    else:
        body.update(
            response_type="embeddings_by_type",
            embeddings={t: rows(result.vectors, t) for t in req.outputs},
        )
    body["texts"] = req.texts
    body["meta"] = {"api_version": {"version": "2"}, "billed_units": {"input_tokens": result.prompt_tokens}}
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def parse_v2(body: bytes, runtime: Runtime) -> EmbedRequest:
    server = runtime.settings.server
    return to_request(body, server.max_inputs, server.unknown_fields == "reject", v2=True)


def parse_v1(body: bytes, runtime: Runtime) -> EmbedRequest:
    server = runtime.settings.server
    return to_request(body, server.max_inputs, server.unknown_fields == "reject", v2=False)
