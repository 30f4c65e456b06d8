"""Jina's embeddings dialect, on `/v1/embeddings` (its shape is OpenAI's): `{"text": ...}` input items
(gateway/api/inputs.py), `task` (an intent, mapped to a prompt through the model's task table),
`embedding_type`, `normalized`, `truncate`, `late_chunking`; the Jina SDK and LiteLLM's `jina_ai/` work
unchanged."""

from __future__ import annotations

from gateway.errors import InvalidRequest

EMBEDDING_TYPES = ("float", "base64", "binary", "ubinary")


def refuse_unsupported(normalized: bool | None, late_chunking: bool | None) -> None:
    if normalized is False:
        raise InvalidRequest(
            "normalized=false is not supported: the gateway always returns L2-normalized vectors so that every "
            "backend yields the same embedding space; omit `normalized`",
            param="normalized",
        )
    if late_chunking:
        raise InvalidRequest(
            "late_chunking is not supported by this model: it pools each chunk inside one long context, which "
            "the backends behind this gateway do not expose; omit `late_chunking` or set it to false",
            param="late_chunking",
        )
