"""Naming a pooling mismatch by reproducing it: the same GGUF served with each other pooling.

llama.cpp does not report its pooling over HTTP, and vectors alone cannot tell "another pooling" from
"another model". With the model's GGUF at hand (a managed backend's, or `reference_gguf`), the checker
starts short-lived llama.cpp servers with the other poolings; the one whose vectors match the suspect
backend's names the pooling it uses.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np

from backends.managed.process import LlamaCppProcess

POOLINGS = ("mean", "cls", "last")


async def reproduce(gguf: Path, pooling: str, texts: list[str]) -> np.ndarray:
    """Unit vectors for `texts` from `gguf` pooled with `pooling` (a scratch llama.cpp server)."""
    proc = LlamaCppProcess(gguf=gguf, pooling=pooling, parallel=1, threads=1, ctx_size=2048, batch_size=2048)
    await asyncio.to_thread(proc.start)
    try:
        await asyncio.to_thread(proc.wait_ready, 60.0)
        async with httpx.AsyncClient(base_url=proc.url, timeout=120) as client:
            resp = await client.post("/v1/embeddings", json={"input": texts})
            resp.raise_for_status()
        data = sorted(resp.json()["data"], key=lambda d: d["index"])
        m = np.asarray([d["embedding"] for d in data], dtype=np.float64)
        unit: np.ndarray = m / np.linalg.norm(m, axis=1, keepdims=True)
        return unit
    finally:
        await asyncio.to_thread(proc.stop)
