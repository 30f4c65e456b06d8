"""Adapter for llama.cpp's HTTP server (`llama-server`, or the same server from the xllamacpp wheel).

Wire facts (../shared/research/backend-protocols.md §2): every route answers 503 while the model loads;
an input longer than the physical batch gets 500 "too large to process"; malformed JSON can get 500;
the OpenAI route honours `encoding_format: base64` (float32 LE), which is much cheaper to parse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import msgspec
import numpy as np

from backends.base import BackendInfo, Embeddings, Health
from backends.errors import (
    BackendError,
    BackendMisconfigured,
    BackendOverloaded,
    BackendUnavailable,
    BadBackendOutput,
    InputRejected,
)
from backends.http import (
    decode_base64_vector,
    make_client,
    redact_url,
    retry_after_seconds,
    stack_rows,
    transport_errors,
)
from config.backends import LlamaCppBackend

_POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}


class _Item(msgspec.Struct):
    embedding: str | list[float]
    index: int = -1


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None


class _Response(msgspec.Struct):
    data: list[_Item]
    usage: _Usage | None = None


_decode_response = msgspec.json.Decoder(_Response).decode


class LlamaCppAdapter:
    kind = "llamacpp"

    def __init__(self, config: LlamaCppBackend, *, url: str | None = None) -> None:
        self.name = config.name
        self.model = config.model
        self.priority = config.priority
        self.config = config
        base = url or (str(config.url) if config.url else None)
        if base is None:
            raise ValueError(f"backend {config.name!r} has no URL yet (managed server not started)")
        self._url = base.rstrip("/")
        headers = {"Authorization": f"Bearer {config.api_key.get_secret_value()}"} if config.api_key else None
        self._client = make_client(
            self._url, timeout_s=config.timeout_s, connect_timeout_s=config.connect_timeout_s, headers=headers
        )

    def public_url(self) -> str:
        return redact_url(self._url)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        body = msgspec.json.encode({"input": list(texts), "encoding_format": "base64"})
        async with transport_errors(self.name):
            resp = await self._client.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
        if resp.status_code != 200:
            raise self._error(resp)
        try:
            parsed = _decode_response(resp.content)
        except msgspec.DecodeError as exc:
            raise BadBackendOutput(self.name, f"unparseable embeddings response: {exc}") from exc
        items = parsed.data
        if len(items) != len(texts):
            raise BadBackendOutput(self.name, f"returned {len(items)} embeddings for {len(texts)} inputs")
        if all(item.index >= 0 for item in items):
            items = sorted(items, key=lambda item: item.index)
        rows = [
            decode_base64_vector(self.name, item.embedding)
            if isinstance(item.embedding, str)
            else np.asarray(item.embedding, dtype=np.float32)
            for item in items
        ]
        tokens = parsed.usage.prompt_tokens if parsed.usage else None
        return Embeddings(vectors=stack_rows(self.name, rows), prompt_tokens=tokens)

    async def health(self) -> Health:
        async with transport_errors(self.name):
            resp = await self._client.get("/health")
        if resp.status_code == 200:
            return Health(ok=True)
        return Health(ok=False, detail=self._error(resp).message)

    async def describe(self) -> BackendInfo:
        async with transport_errors(self.name):
            props = await self._client.get("/props")
            models = await self._client.get("/v1/models")
        if props.status_code != 200:
            raise self._error(props)
        p: dict[str, Any] = props.json()
        meta: dict[str, Any] = {}
        if models.status_code == 200:
            data = models.json().get("data") or [{}]
            meta = data[0].get("meta") or {}
        settings = p.get("default_generation_settings") or {}
        pooling = p.get("pooling_type", p.get("pooling"))
        return BackendInfo(
            kind=self.kind,
            model_id=p.get("model_alias") or p.get("model_path"),
            pooling=_POOLING_NAMES.get(pooling, pooling) if pooling is not None else None,
            dimension=meta.get("n_embd"),
            max_input_tokens=settings.get("n_ctx") or meta.get("n_ctx"),
            extra={"ftype": meta.get("ftype") or p.get("model_ftype"), "total_slots": p.get("total_slots")},
        )

    def _error(self, resp: httpx.Response) -> BackendError:
        status = resp.status_code
        message = _error_message(resp)
        if status == 503:
            return BackendUnavailable(self.name, f"unavailable (503): {message}", status=status)
        if status == 429:
            return BackendOverloaded(
                self.name, message, retry_after=retry_after_seconds(resp.headers.get("retry-after"))
            )
        if status == 500 and "too large to process" in message:
            # The input does not fit one physical batch: the input's fault, not the server's.
            return InputRejected(self.name, f"input too long for this backend: {message}", status=status)
        if status in (401, 403):
            return BackendMisconfigured(self.name, f"authentication failed ({status}): check api_key", status=status)
        if status in (404, 501):
            return BackendMisconfigured(
                self.name, f"endpoint not served ({status}): {message}; is it started with --embeddings?", status=status
            )
        if status == 400:
            return InputRejected(self.name, message, status=status)
        return BackendUnavailable(self.name, f"HTTP {status}: {message}", status=status)


def _error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300] or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
    return str(body)[:300]
