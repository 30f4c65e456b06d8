"""Adapter for any OpenAI-compatible embeddings server (vLLM `--runner pooling`, Infinity, OpenAI).

`POST {url}/v1/embeddings` asking for base64 (float32 LE: cheaper to parse than float JSON). Never sends
`encoding_format: null` (LiteLLM #19174 broke vLLM and TEI that way). The llama.cpp adapter builds on
this one, adding what only llama.cpp has (/props, its "too large to process" error).
"""

from __future__ import annotations

import ssl
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
    InputTooLong,
    PayloadTooLarge,
    too_long_message,
)
from backends.http import (
    JsonPoster,
    decode_base64_vector,
    error_message,
    make_client,
    redact_url,
    retry_after_seconds,
    stack_rows,
    transport_errors,
)
from config.backends import LlamaCppBackend, OpenAIBackend


class _Item(msgspec.Struct):
    embedding: str | list[float]
    index: int = -1


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None


class _Response(msgspec.Struct):
    data: list[_Item]
    usage: _Usage | None = None


_decode_response = msgspec.json.Decoder(_Response).decode


def tls_verify(config: OpenAIBackend | LlamaCppBackend | Any) -> ssl.SSLContext | bool:
    if getattr(config, "ca_cert", None):
        return ssl.create_default_context(cafile=str(config.ca_cert))
    return bool(getattr(config, "verify_tls", True))


class OpenAICompatAdapter:
    kind = "openai"
    applies_prompt = False  # OpenAI's API has no prompts: the gateway prepends them

    def __init__(self, config: OpenAIBackend | LlamaCppBackend, *, url: str | None = None) -> None:
        self.name = config.name
        self.model = config.model
        self.priority = config.priority
        self.config = config
        base = url or (str(config.url) if config.url else None)
        if base is None:
            raise ValueError(f"backend {config.name!r} has no URL yet (managed server not started)")
        self._url = base.rstrip("/").removesuffix("/v1")
        self.remote_model = getattr(config, "remote_model", None) or config.model
        headers = {"Authorization": f"Bearer {config.api_key.get_secret_value()}"} if config.api_key else None
        self._client = make_client(
            self._url,
            timeout_s=config.timeout_s,
            connect_timeout_s=config.connect_timeout_s,
            headers=headers,
            verify=tls_verify(config),
        )
        self._poster = JsonPoster(self._client, self._url, config.connect_timeout_s)

    def public_url(self) -> str:
        return redact_url(self._url)

    async def aclose(self) -> None:
        await self._client.aclose()

    def _request_body(self, texts: Sequence[str]) -> bytes:
        return msgspec.json.encode({"input": list(texts), "model": self.remote_model, "encoding_format": "base64"})

    async def embed(
        self, texts: Sequence[str], prompt_name: str | None = None, timeout_s: float | None = None
    ) -> Embeddings:
        async with transport_errors(self.name):
            resp = await self._poster.post(
                "/v1/embeddings", self._request_body(texts), timeout_s or self.config.call_timeout_s(len(texts))
            )
        if resp.status_code != 200:
            raise self._error(resp.as_httpx())
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
        try:
            models = await self._models()
        except BackendMisconfigured as exc:
            if exc.status in (404, 405):
                # Not every OpenAI-compatible server lists models (TEI's OpenAI route does not):
                # the health check's embed probe decides.
                return Health(ok=True, detail="no /v1/models on this server")
            raise
        if models and self.remote_model not in models:
            raise BackendMisconfigured(
                self.name, f"model {self.remote_model!r} is not served here; served: {models} (set remote_model)"
            )
        return Health(ok=True)

    async def describe(self) -> BackendInfo:
        models = await self._models()
        return BackendInfo(kind=self.kind, model_id=self.remote_model if self.remote_model in models else None)

    async def _models(self) -> list[str]:
        async with transport_errors(self.name):
            resp = await self._client.get("/v1/models")
        if resp.status_code != 200:
            raise self._error(resp)
        try:
            return [str(m.get("id")) for m in resp.json().get("data", [])]
        except (ValueError, AttributeError) as exc:
            raise BadBackendOutput(self.name, f"unparseable /v1/models response: {exc}") from exc

    def _error(self, resp: httpx.Response) -> BackendError:
        status = resp.status_code
        message = error_message(resp)
        if status == 429:
            retry = retry_after_seconds(resp.headers.get("retry-after"))
            return BackendOverloaded(self.name, message, retry_after=retry)
        if status in (401, 403):
            return BackendMisconfigured(self.name, f"authentication failed ({status}): check api_key", status=status)
        if status in (404, 405, 501):
            return BackendMisconfigured(self.name, f"endpoint or model not found ({status}): {message}", status=status)
        if status == 413:
            return PayloadTooLarge(self.name, f"request too large ({status}): {message}", status=status)
        if status in (400, 422):
            return (InputTooLong if too_long_message(message) else InputRejected)(self.name, message, status=status)
        return BackendUnavailable(self.name, f"HTTP {status}: {message}", status=status)
