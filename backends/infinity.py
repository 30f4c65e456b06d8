"""Adapter for Infinity (`infinity_emb v2`, michaelfeil/infinity) through its OpenAI-compatible API.

Its API routes live at the root unless started with `--url-prefix /v1` (`/health` stays at the root):
without a configured `path_prefix` the adapter finds which at first contact. Its batch size
(`stats.batch_size` in the model list) bounds the gateway's sub-batches. Its `usage` counts characters,
not tokens, so it is ignored. Infinity truncates over-long inputs silently; the gateway's length policy
means none reaches it.
"""

from __future__ import annotations

from typing import Any

from backends.base import BackendInfo, Health
from backends.http import transport_errors
from backends.openai import OpenAICompatAdapter


class InfinityAdapter(OpenAICompatAdapter):
    kind = "infinity"
    default_prefix = None

    async def health(self) -> Health:
        await self.discover()  # finds the prefix, checks the model
        async with transport_errors(self.name):
            resp = await self._client.get("/health")  # at the root even with --url-prefix
        if resp.status_code != 200:
            raise self._error(resp)
        return Health(ok=True)

    async def describe(self) -> BackendInfo:
        await self.discover()
        entry = self._entry() or {}
        stats: dict[str, Any] = entry.get("stats") if isinstance(entry.get("stats"), dict) else {}  # type: ignore[assignment]
        batch = stats.get("batch_size")
        backend = entry.get("backend")
        return BackendInfo(
            kind=self.kind,
            model_id=self.remote_model if entry else None,
            max_batch_size=batch if isinstance(batch, int) and batch > 0 else None,
            extra={"engine": backend, "capabilities": entry.get("capabilities")},
        )
