"""Adapter for vLLM serving an embedding model (`--runner pooling`) through its OpenAI-compatible API.

What it adds to the OpenAI wire code: health on `/health` (outside the API prefix), the input limit
(`max_model_len`) and the served id from `/v1/models`, and `/tokenize` for the checker. vLLM refuses an
input over `max_model_len` (400 "maximum context length"); the gateway never asks it to truncate
(`truncate_prompt_tokens`): it cuts inputs itself with the model's tokenizer.
"""

from __future__ import annotations

from backends.base import BackendInfo, Health
from backends.http import transport_errors
from backends.openai import OpenAICompatAdapter


class VllmAdapter(OpenAICompatAdapter):
    kind = "vllm"

    async def health(self) -> Health:
        async with transport_errors(self.name):
            resp = await self._client.get("/health")  # 200 once the engine runs; no API key needed
        if resp.status_code != 200:
            raise self._error(resp)
        await self.discover()  # needs the API key: catches a wrong one; the served model and its limit
        return Health(ok=True)

    async def describe(self) -> BackendInfo:
        await self.discover()
        entry = self._entry() or {}
        limit = entry.get("max_model_len")
        return BackendInfo(
            kind=self.kind,
            model_id=str(entry.get("root") or self.remote_model) if entry else None,
            max_input_tokens=limit if isinstance(limit, int) and limit > 0 else None,
            extra={"served_model": self.remote_model},
        )

    async def tokenize(self, text: str) -> list[int] | None:
        async with transport_errors(self.name):
            resp = await self._client.post("/tokenize", json={"model": self.remote_model, "prompt": text})
        if resp.status_code != 200:
            raise self._error(resp)
        tokens = resp.json().get("tokens")
        return [int(t) for t in tokens] if isinstance(tokens, list) else None
