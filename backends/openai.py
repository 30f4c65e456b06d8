"""Adapter for any OpenAI-compatible embeddings server (OpenAI, proxies; vLLM and Infinity build on it).

`POST {url}{path_prefix}/embeddings` asking for base64 (float32 LE: cheaper to parse than float JSON). Never sends
`encoding_format: null` (LiteLLM #19174 broke vLLM and TEI that way). The llama.cpp adapter builds on
this one, adding what only llama.cpp has (/props, its "too large to process" error); so do the vLLM and
Infinity adapters (their limits, health and tokenize routes). The `model` sent is the configured
`remote_model`, else read from the server's model list at first contact.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from typing import Any

import httpx
import msgspec
import numpy as np
import orjson

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
from config.backends import InfinityBackend, LlamaCppBackend, OpenAIBackend, VllmBackend

log = logging.getLogger(__name__)

OpenAICompatConfig = OpenAIBackend | VllmBackend | InfinityBackend


def decode_vectors(backend: str, content: bytes, n: int) -> np.ndarray:
    """An OpenAI-shaped embeddings body into an (n, dim) float32 matrix in input order (by `index` when
    every item has one). orjson into plain objects, then numpy: profiled on the hot path, a typed
    msgspec decode of a 1024-float body took 27 us and this 18 us; a malformed body is a backend fault."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        raise BadBackendOutput(backend, f"unparseable embeddings response: {exc}") from exc
    items = body.get("data") if isinstance(body, dict) else None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise BadBackendOutput(backend, "the response has no `data` list of embedding objects")
    if len(items) != n:
        raise BadBackendOutput(backend, f"returned {len(items)} embeddings for {n} inputs")
    if all(type(item.get("index")) is int for item in items):
        items = sorted(items, key=lambda item: item["index"])
    rows: list[Any] = []
    for item in items:
        embedding = item.get("embedding")
        if isinstance(embedding, str):
            rows.append(decode_base64_vector(backend, embedding))
        elif isinstance(embedding, list):
            rows.append(embedding)
        else:
            raise BadBackendOutput(backend, "an embedding is neither a list of numbers nor base64")
    return stack_rows(backend, rows)


def tls_verify(config: OpenAICompatConfig | LlamaCppBackend | Any) -> ssl.SSLContext | bool:
    if getattr(config, "ca_cert", None):
        return ssl.create_default_context(cafile=str(config.ca_cert))
    return bool(getattr(config, "verify_tls", True))


class OpenAICompatAdapter:
    kind = "openai"
    applies_prompt = False  # OpenAI's API has no prompts: the gateway prepends them
    default_prefix: str | None = "/v1"  # None: found at first contact (Infinity: with or without --url-prefix)

    def __init__(self, config: OpenAICompatConfig | LlamaCppBackend, *, url: str | None = None) -> None:
        self.name = config.name
        self.model = config.model
        self.priority = config.priority
        self.config = config
        base = url or (str(config.url) if config.url else None)
        if base is None:
            raise ValueError(f"backend {config.name!r} has no URL yet (managed server not started)")
        base = base.rstrip("/")
        configured = getattr(config, "path_prefix", None)
        prefix = configured if configured is not None else self.default_prefix
        if base.endswith("/v1") and prefix in (None, "/v1"):
            # The OpenAI SDK's base_url spelling (http://host/v1): the prefix is in the URL.
            base, prefix = base.removesuffix("/v1"), "/v1"
        self._url = base
        self._prefix: str | None = prefix
        self._configured_model: str | None = getattr(config, "remote_model", None)
        # Until the server's model list is read: the configured name, else the gateway's.
        self.remote_model = self._configured_model or config.model
        self._discovered = self._configured_model is not None
        self._listing: list[dict[str, Any]] = []
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
        return redact_url(self._url) + (self._prefix or "")

    async def aclose(self) -> None:
        self._poster.close()
        await self._client.aclose()

    def _request_body(self, texts: Sequence[str]) -> bytes:
        # Never `truncate_prompt_tokens` (vLLM) or any server-side truncation: the gateway cuts inputs with
        # the model's tokenizer, the same way for every backend.
        return msgspec.json.encode({"input": list(texts), "model": self.remote_model, "encoding_format": "base64"})

    async def embed(
        self, texts: Sequence[str], prompt_name: str | None = None, timeout_s: float | None = None
    ) -> Embeddings:
        if not self._discovered:
            await self._discover_quietly()
        async with transport_errors(self.name):
            resp = await self._poster.post(
                f"{self._prefix or ''}/embeddings",
                self._request_body(texts),
                timeout_s or self.config.call_timeout_s(len(texts)),
            )
        if resp.status_code != 200:
            raise self._error(resp.as_httpx())
        return Embeddings(vectors=decode_vectors(self.name, resp.content, len(texts)))

    async def health(self) -> Health:
        try:
            await self.discover()
        except BackendMisconfigured as exc:
            if exc.status in (404, 405) and self._prefix is not None:
                # Not every OpenAI-compatible server lists models (TEI's OpenAI route does not):
                # the health check's embed probe decides.
                return Health(ok=True, detail=f"no {self._prefix}/models on this server")
            raise
        return Health(ok=True)

    async def describe(self) -> BackendInfo:
        await self.discover()
        entry = self._entry()
        return BackendInfo(kind=self.kind, model_id=self.remote_model if entry is not None else None)

    async def tokenize(self, text: str) -> list[int] | None:
        """The token ids the server makes of `text` (special tokens included); None: it cannot say."""
        return None

    # -- which model, where ------------------------------------------------------------------------
    async def discover(self) -> None:
        """Read the server's model list: where its API lives (when not configured) and which `model` to send.

        The configured `remote_model` must be listed; without one, the gateway's model name if listed,
        else the server's only model; several and none of them named: a configuration error naming them."""
        listing, prefix = await self._models_listing()
        self._listing, self._prefix = listing, prefix
        served = [str(m["id"]) for m in listing if isinstance(m.get("id"), str)]
        if not served:
            self._discovered = True
            return
        if self._configured_model is not None:
            if self._configured_model not in served:
                raise BackendMisconfigured(
                    self.name,
                    f"model {self._configured_model!r} is not served here; served: {served} (set remote_model)",
                )
            chosen = self._configured_model
        elif self.config.model in served:
            chosen = self.config.model
        elif len(served) == 1:
            chosen = served[0]
        else:
            raise BackendMisconfigured(
                self.name,
                f"serves {len(served)} models and none is named {self.config.model!r}; served: {served} "
                "(set remote_model to one of them)",
            )
        if chosen != self.remote_model:
            log.info("backend %s: sending model %r (listed by the server)", self.name, chosen)
        self.remote_model, self._discovered = chosen, True

    async def _discover_quietly(self) -> None:
        """Before the first call when no health check ran yet: a misconfiguration is raised, anything else
        (the server busy, no model list) leaves the default name and lets the call decide."""
        try:
            await self.discover()
        except BackendMisconfigured as exc:
            if exc.status not in (404, 405):
                raise
            self._discovered = True
        except BackendError:
            pass

    async def _models_listing(self) -> tuple[list[dict[str, Any]], str | None]:
        """The `data` of GET {prefix}/models, and the prefix it answered at."""
        candidates = [self._prefix] if self._prefix is not None else ["", "/v1"]
        last: BackendError | None = None
        for prefix in candidates:
            async with transport_errors(self.name):
                resp = await self._client.get(f"{prefix}/models")
            if resp.status_code == 200:
                try:
                    data = resp.json().get("data", [])
                except (ValueError, AttributeError) as exc:
                    raise BadBackendOutput(self.name, f"unparseable {prefix}/models response: {exc}") from exc
                return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else [], prefix
            last = self._error(resp)
            if not (isinstance(last, BackendMisconfigured) and last.status in (404, 405)):
                raise last
        assert last is not None
        if self._prefix is None:
            raise BackendMisconfigured(
                self.name,
                f"no model list at {self._url}/models nor {self._url}/v1/models: is this the server's URL? "
                "(set path_prefix)",
                status=last.status,
            )
        raise last

    def _entry(self) -> dict[str, Any] | None:
        """The served model's entry in the model list (limits live there)."""
        return next((m for m in self._listing if m.get("id") == self.remote_model), None)

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
