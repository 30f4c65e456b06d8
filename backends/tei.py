"""Adapter for Hugging Face text-embeddings-inference (TEI), GPU and CPU images alike.

Uses the native `POST /embed` (it alone takes `prompt_name`, `truncate`, `normalize`), `GET /info`
for limits and pooling, `GET /health`. Wire facts: ../shared/research/backend-protocols.md §1.

Prompts: TEI adds its `--default-prompt(-name)` whenever a request has no `prompt_name`. With
`prompt_mode = "gateway"` the gateway prepends the prompt and TEI must run without a default prompt;
with `prompt_mode = "backend"` the adapter sends `prompt_name` and the gateway adds nothing.
Truncation: the adapter always sends `truncate: false`, so an over-long input is an error here just
as on llama.cpp — one policy for every backend, rather than TEI silently embedding a cut text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import msgspec

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
    error_message,
    make_client,
    redact_url,
    retry_after_seconds,
    stack_rows,
    transport_errors,
)
from backends.openai import tls_verify
from config.backends import TeiBackend

_decode_matrix = msgspec.json.Decoder(list[list[float]]).decode
_POOLING = {"last_token": "last", "cls": "cls", "mean": "mean", "splade": "splade"}


class TeiAdapter:
    kind = "tei"

    def __init__(self, config: TeiBackend) -> None:
        self.name = config.name
        self.model = config.model
        self.priority = config.priority
        self.config = config
        self.applies_prompt = config.prompt_mode == "backend"
        self._url = str(config.url).rstrip("/")
        headers = {"Authorization": f"Bearer {config.api_key.get_secret_value()}"} if config.api_key else None
        self._client = make_client(
            self._url,
            timeout_s=config.timeout_s,
            connect_timeout_s=config.connect_timeout_s,
            headers=headers,
            verify=tls_verify(config),
        )
        self._poster = JsonPoster(self._client, self._url, config.connect_timeout_s)
        self._info: dict[str, Any] | None = None

    def public_url(self) -> str:
        return redact_url(self._url)

    async def aclose(self) -> None:
        self._poster.close()
        await self._client.aclose()

    async def embed(
        self, texts: Sequence[str], prompt_name: str | None = None, timeout_s: float | None = None
    ) -> Embeddings:
        # Batches over TEI's max_client_batch_size (TEI #378) never get here: the router cuts
        # sub-batches to the limit describe() reports; a stale limit comes back as PayloadTooLarge.
        body: dict[str, Any] = {"inputs": list(texts), "truncate": False, "normalize": True}
        if self.applies_prompt and prompt_name is not None:
            body["prompt_name"] = prompt_name
        async with transport_errors(self.name):
            resp = await self._poster.post(
                "/embed", msgspec.json.encode(body), timeout_s or self.config.call_timeout_s(len(texts))
            )
        if resp.status_code != 200:
            raise self._error(resp.as_httpx())
        try:
            rows = _decode_matrix(resp.content)
        except msgspec.DecodeError as exc:  # also catches NaN (not JSON) and null (TEI's NaN)
            raise BadBackendOutput(self.name, f"unparseable /embed response: {exc}") from exc
        if len(rows) != len(texts):
            raise BadBackendOutput(self.name, f"returned {len(rows)} embeddings for {len(texts)} inputs")
        return Embeddings(stack_rows(self.name, rows))

    async def health(self) -> Health:
        async with transport_errors(self.name):
            resp = await self._client.get("/health")  # public; TEI runs a forward pass when unhealthy
        if resp.status_code != 200:
            raise BackendUnavailable(self.name, f"unhealthy ({resp.status_code}): {error_message(resp)}")
        self._info = await self._get_info()  # needs the API key: catches a wrong one; refreshes limits
        return Health(ok=True)

    async def describe(self) -> BackendInfo:
        info = await self._get_info()
        self._info = info
        embedding = (info.get("model_type") or {}).get("embedding") or {}
        pooling = embedding.get("pooling")
        return BackendInfo(
            kind=self.kind,
            model_id=info.get("model_id"),
            pooling=_POOLING.get(pooling, pooling) if isinstance(pooling, str) else None,
            max_input_tokens=info.get("max_input_length"),
            max_batch_size=min(x for x in (info.get("max_client_batch_size"), self.config.max_batch_size) if x)
            if info.get("max_client_batch_size") or self.config.max_batch_size
            else None,
            max_concurrency=mc if isinstance(mc := info.get("max_concurrent_requests"), int) and mc > 0 else None,
            extra={k: info.get(k) for k in ("version", "model_dtype", "auto_truncate", "max_batch_tokens")},
        )

    async def tokenize(self, text: str) -> list[int] | None:
        # No prompt_name: the text arrives with the prompt it is embedded with, whoever adds it.
        async with transport_errors(self.name):
            resp = await self._client.post("/tokenize", json={"inputs": text, "add_special_tokens": True})
        if resp.status_code != 200:
            raise self._error(resp)
        rows = resp.json()
        if not (isinstance(rows, list) and rows and isinstance(rows[0], list)):
            raise BadBackendOutput(self.name, "unparseable /tokenize response")
        return [int(t["id"]) for t in rows[0]]

    async def _get_info(self) -> dict[str, Any]:
        async with transport_errors(self.name):
            resp = await self._client.get("/info")
        if resp.status_code != 200:
            raise self._error(resp)
        try:
            info: dict[str, Any] = resp.json()
        except ValueError as exc:
            raise BadBackendOutput(self.name, f"unparseable /info: {exc}") from exc
        if "embedding" not in (info.get("model_type") or {}):
            raise BackendMisconfigured(self.name, f"TEI serves a non-embedding model: {info.get('model_type')}")
        return info

    def _error(self, resp: httpx.Response) -> BackendError:
        status = resp.status_code
        message = error_message(resp)
        is_json = resp.headers.get("content-type", "").startswith("application/json")
        if status == 401:
            return BackendMisconfigured(self.name, "authentication failed (401): check api_key", status=status)
        if status in (403, 404, 405, 415):
            return BackendMisconfigured(self.name, f"HTTP {status}: {message}", status=status)
        if status == 413 and not is_json:
            # axum's body limit (--payload-limit, 2 MB): a smaller batch will pass.
            return PayloadTooLarge(self.name, f"request body over TEI's payload limit: {message}", status=status)
        if status in (413, 422) and "batch size" in message:
            self._info = None  # limits changed under us: learn them again
            return PayloadTooLarge(self.name, message, status=status)
        if status in (400, 413, 422):  # 413 before TEI 1.9, 422 since (TEI #818)
            too_long = too_long_message(message)
            return (InputTooLong if too_long else InputRejected)(self.name, message, status=status)
        if status == 429:
            retry = retry_after_seconds(resp.headers.get("retry-after"))
            return BackendOverloaded(self.name, f"overloaded: {message}", retry_after=retry)
        if status == 424:
            return BackendUnavailable(self.name, f"backend error (424): {message}", status=status)
        return BackendUnavailable(self.name, f"HTTP {status}: {message}", status=status)
