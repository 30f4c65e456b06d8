"""Adapter for llama.cpp's HTTP server (`llama-server`, or the same server from the xllamacpp wheel).

Wire facts (../shared/research/backend-protocols.md §2): every route answers 503 while the model loads;
an input longer than the physical batch gets 500 "too large to process"; malformed JSON can get 500.
Embedding goes through the OpenAI-compatible route, so this builds on OpenAICompatAdapter.
"""

from __future__ import annotations

from typing import Any

import httpx

from backends.base import BackendInfo, Health
from backends.errors import BackendError, BackendMisconfigured, BackendUnavailable, InputTooLong
from backends.http import error_message, transport_errors
from backends.openai import OpenAICompatAdapter
from config.backends import LlamaCppBackend

_POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}


class LlamaCppAdapter(OpenAICompatAdapter):
    kind = "llamacpp"

    def __init__(self, config: LlamaCppBackend, *, url: str | None = None) -> None:
        super().__init__(config, url=url)
        self._discovered = True  # llama.cpp embeds with its one model whatever `model` says

    async def tokenize(self, text: str) -> list[int] | None:
        async with transport_errors(self.name):
            resp = await self._client.post("/tokenize", json={"content": text, "add_special": True})
        if resp.status_code != 200:
            raise self._error(resp)
        tokens = resp.json().get("tokens")
        return [int(t) for t in tokens] if isinstance(tokens, list) else None

    async def health(self) -> Health:
        async with transport_errors(self.name):
            resp = await self._client.get("/health")  # public: 503 while loading
            if resp.status_code == 200:
                resp = await self._client.get("/props")  # needs the API key: catches a wrong one
        if resp.status_code == 200:
            return Health(ok=True)
        raise self._error(resp)

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
            # Two calls per slot: one computing, one waiting at the server, so the slots stay busy across
            # the gateway's round trip (bench/chaos.py: +10-20% throughput over one per slot) while the
            # server's own queue stays bounded.
            max_concurrency=2 * p["total_slots"] if isinstance(p.get("total_slots"), int) else None,
            extra={"ftype": meta.get("ftype") or p.get("model_ftype"), "total_slots": p.get("total_slots")},
        )

    def _error(self, resp: httpx.Response) -> BackendError:
        status = resp.status_code
        message = error_message(resp)
        if status == 503:
            return BackendUnavailable(self.name, f"unavailable (503): {message}", status=status)
        if status == 500 and "too large to process" in message:
            # The input does not fit one physical batch: the input's fault, not the server's.
            return InputTooLong(self.name, f"input too long for this backend: {message}", status=status)
        if status == 501:
            return BackendMisconfigured(self.name, f"{message}; start llama-server with --embeddings", status=status)
        return super()._error(resp)
