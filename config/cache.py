"""`[cache]`: the embedding cache, keyed by (space, prompt, text)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CacheSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="serve repeated (space, prompt, text) from the cache")
    max_bytes: int = Field(256 * 1024 * 1024, ge=0, description="the in-process LRU's size (vectors and keys)")
    url: str | None = Field(None, description='a shared tier: "redis://host:port/db" (workers and replicas)')
    ttl_s: int = Field(7 * 24 * 3600, gt=0, description="how long entries live in the shared tier")
