"""Adapter for Elastic Inference Service (or any `text_embedding` inference endpoint) via Elasticsearch.

Talks through the official async client (`AsyncElasticsearch`): `POST _inference/text_embedding/{id}`
with `input` and `input_type`, `GET _inference/{id}` for the endpoint's service settings. EIS applies
the model's task prompt itself from `input_type` (document -> ingest, query -> search), so this adapter
receives plain text (`applies_prompt`); the agreement checker decides whether its space matches.

Version differences (research §3.7): `text_embedding(input_type=...)` exists from client 8.19.2/9.1.2;
older clients get the same request through `perform_request`, still the official client.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote

import elastic_transport
from elasticsearch import ApiError, AsyncElasticsearch, UnsupportedProductError

from backends.base import BackendInfo, Embeddings, Health
from backends.errors import (
    BackendError,
    BackendMisconfigured,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    BadBackendOutput,
    InputRejected,
    PayloadTooLarge,
)
from backends.http import redact_url, retry_after_seconds, stack_rows
from config.backends import ElasticBackend


def _client_kwargs(config: ElasticBackend) -> dict[str, Any]:
    kw: dict[str, Any] = {
        # The gateway's router decides retries and fallback; the client must not retry on its own.
        "max_retries": 0,
        "retry_on_timeout": False,
        "retry_on_status": (),
        "request_timeout": config.timeout_s + config.connect_timeout_s,
        "verify_certs": config.verify_certs,
    }
    if config.url is not None:
        kw["hosts"] = [redact_url(str(config.url))]
        if config.url.username is not None:  # user:password in the URL: Basic auth, kept out of the URL
            kw["basic_auth"] = (unquote(config.url.username), unquote(config.url.password or ""))
    if config.cloud_id is not None:
        kw["cloud_id"] = config.cloud_id.get_secret_value()
    if config.ca_cert is not None:
        kw["ca_certs"] = str(config.ca_cert)
    if config.api_key is not None:
        kw["api_key"] = config.api_key.get_secret_value()
    elif config.bearer_token is not None:
        kw["bearer_auth"] = config.bearer_token.get_secret_value()
    elif config.username is not None and config.password is not None:
        kw["basic_auth"] = (config.username, config.password.get_secret_value())
    return kw


class ElasticAdapter:
    kind = "elastic"
    applies_prompt = True  # EIS applies the task prompt from input_type

    def __init__(self, config: ElasticBackend, client: AsyncElasticsearch | None = None) -> None:
        self.name = config.name
        self.model = config.model
        self.priority = config.priority
        self.config = config
        self.inference_id = config.inference_id
        self._es = client or AsyncElasticsearch(**_client_kwargs(config))
        te = getattr(self._es.inference, "text_embedding", None)
        self._native_input_type = te is not None and "input_type" in inspect.signature(te).parameters

    def public_url(self) -> str:
        if self.config.url is not None:
            return redact_url(str(self.config.url))
        return "elastic-cloud (cloud_id)"

    async def aclose(self) -> None:
        await self._es.close()

    async def embed(
        self, texts: Sequence[str], prompt_name: str | None = None, timeout_s: float | None = None
    ) -> Embeddings:
        # Sub-batches arrive cut to `max_batch_size` by the router.
        input_type = self.config.input_types.get(prompt_name) if prompt_name else None
        rows = await self._infer(list(texts), input_type, timeout_s)
        if len(rows) != len(texts):
            raise BadBackendOutput(self.name, f"returned {len(rows)} embeddings for {len(texts)} inputs")
        return Embeddings(stack_rows(self.name, rows))  # the inference API reports no token usage

    async def _infer(self, texts: list[str], input_type: str | None, timeout_s: float | None = None) -> list[Any]:
        resp: Any
        seconds = timeout_s or self.config.call_timeout_s(len(texts))
        timeout = f"{max(1, int(seconds))}s"  # Elasticsearch's own limit on the inference call
        es = self._es.options(request_timeout=seconds + self.config.connect_timeout_s)
        try:
            if self._native_input_type:
                kw: dict[str, Any] = {"input_type": input_type} if input_type else {}
                resp = await es.inference.text_embedding(
                    inference_id=self.inference_id, input=texts, timeout=timeout, **kw
                )
            else:
                body: dict[str, Any] = {"input": texts, **({"input_type": input_type} if input_type else {})}
                resp = await es.perform_request(
                    "POST",
                    f"/_inference/text_embedding/{self.inference_id}",
                    params={"timeout": timeout},
                    headers={"accept": "application/json", "content-type": "application/json"},
                    body=body,
                )
        except Exception as exc:
            raise self._error(exc) from exc
        result = resp.body if hasattr(resp, "body") else resp
        if not isinstance(result, dict) or "text_embedding" not in result:
            keys = sorted(result) if isinstance(result, dict) else type(result).__name__
            raise BadBackendOutput(
                self.name, f"expected float `text_embedding` results, got {keys} (is the endpoint byte/bit?)"
            )
        try:
            return [item["embedding"] for item in result["text_embedding"]]
        except (KeyError, TypeError) as exc:
            raise BadBackendOutput(self.name, f"malformed text_embedding result: {exc}") from exc

    async def _endpoint(self) -> dict[str, Any]:
        try:
            resp = await self._es.inference.get(inference_id=self.inference_id)
        except Exception as exc:
            raise self._error(exc) from exc
        endpoints = resp.body.get("endpoints") or []
        if not endpoints:
            raise BackendMisconfigured(self.name, f"inference endpoint {self.inference_id!r} not found")
        endpoint: dict[str, Any] = endpoints[0]
        if endpoint.get("task_type") != "text_embedding":
            raise BackendMisconfigured(
                self.name,
                f"endpoint {self.inference_id!r} is a {endpoint.get('task_type')} endpoint, not text_embedding",
            )
        return endpoint

    async def health(self) -> Health:
        await self._endpoint()
        return Health(ok=True)

    async def tokenize(self, text: str) -> list[int] | None:
        return None  # inference endpoints have no tokenize API

    async def describe(self) -> BackendInfo:
        endpoint = await self._endpoint()
        settings = endpoint.get("service_settings") or {}
        return BackendInfo(
            kind=self.kind,
            model_id=settings.get("model_id"),
            dimension=settings.get("dimensions"),
            max_input_tokens=settings.get("max_input_tokens"),
            max_batch_size=self.config.max_batch_size,
            extra={
                "service": endpoint.get("service"),
                "similarity": settings.get("similarity"),
                "prompt": "applied by the service from input_type "
                + ", ".join(f"{k}->{v}" for k, v in self.config.input_types.items()),
            },
        )

    def _error(self, exc: Exception) -> BackendError:
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, UnsupportedProductError):
            return BackendMisconfigured(self.name, "the server at `url` is not Elasticsearch (no X-Elastic-Product)")
        if isinstance(exc, elastic_transport.ConnectionTimeout):
            return BackendTimeout(self.name, "timed out")
        if isinstance(exc, elastic_transport.ConnectionError):
            return BackendUnavailable(self.name, f"connection failed: {type(exc).__name__}")
        if isinstance(exc, ApiError):
            return self._api_error(exc)
        if isinstance(exc, elastic_transport.SerializationError):
            return BadBackendOutput(self.name, f"unparseable response: {exc}")
        if isinstance(exc, elastic_transport.TransportError):
            return BackendUnavailable(self.name, f"transport error: {type(exc).__name__}")
        raise exc

    def _api_error(self, exc: ApiError) -> BackendError:
        status = exc.meta.status
        reason = _reason(exc.body) or str(exc.message)
        if status in (401, 403):
            return BackendMisconfigured(
                self.name, f"authentication failed ({status}): check the credentials", status=status
            )
        if status in (404, 405) and exc.meta.headers.get("x-elastic-product") != "Elasticsearch":
            return BackendMisconfigured(
                self.name, f"the server at `url` is not Elasticsearch ({status} without X-Elastic-Product)"
            )
        if status == 404:
            return BackendMisconfigured(
                self.name, f"inference endpoint {self.inference_id!r} not found: {reason}", status=status
            )
        if status == 429:
            retry = retry_after_seconds(exc.meta.headers.get("retry-after"))
            return BackendOverloaded(self.name, f"rate limited: {reason}", retry_after=retry)
        if status == 408:
            return BackendTimeout(self.name, f"inference timed out (408): {reason}", status=status)
        if status == 413:
            return PayloadTooLarge(self.name, reason, status=status)
        if status == 400:
            # Elasticsearch reports an upstream (EIS) 5xx as 400 after its own retries: not the input's fault.
            if "server error status code" in reason:
                return BackendUnavailable(self.name, f"inference service failed: {reason}", status=status)
            if "Incompatible task_type" in reason:
                return BackendMisconfigured(self.name, reason, status=status)
            return InputRejected(self.name, reason, status=status)
        return BackendUnavailable(self.name, f"HTTP {status}: {reason}", status=status)


def _reason(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("reason") or err.get("type") or "")
        if isinstance(err, str):
            return err
    return str(body)[:300] if body else ""
