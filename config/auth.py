"""`[auth]`: caller keys, what each may use, and its quotas."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class KeyConfig(BaseModel):
    """One caller key. Only its SHA-256 is configured: the key itself is shown once, by `keys new`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$", description="shown in logs, metrics")
    hash: str = Field(description="hex SHA-256 of the key (`embedding-gateway keys new` prints it)")
    models: list[str] = Field(default_factory=lambda: ["*"], min_length=1, description='allowed models; ["*"]: all')
    rpm: int | None = Field(None, gt=0, description="requests per minute (none: unlimited)")
    texts_per_minute: int | None = Field(None, gt=0, description="texts per minute, a request costs its texts")
    admin: bool = Field(False, description="may call admin routes (POST /v1/consistency, /v1/reload, /v1/usage)")

    @field_validator("hash")
    @classmethod
    def _hex_sha256(cls, value: str) -> str:
        value = value.strip().lower().removeprefix("sha256:")
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("must be the key's SHA-256 as 64 hex digits (embedding-gateway keys new prints it)")
        return value

    def may_use(self, model: str) -> bool:
        return "*" in self.models or model in self.models


class AuthSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="require a caller key (Authorization: Bearer, or api-key)")
    keys: list[KeyConfig] = Field(default_factory=list)
    storage: str = Field(
        "memory://", description='quota counters: "memory://" (per process) or "redis://host:port/db" (shared)'
    )
    strategy: Literal["sliding-window", "moving-window", "fixed-window"] = Field(
        "sliding-window", description="the `limits` strategy counting requests and texts"
    )
    window_s: int = Field(60, gt=0, description="the window the per-minute quotas count over (lower only for tests)")
    on_storage_error: Literal["local", "reject"] = Field(
        "local",
        description="shared storage unreachable: per-process limits divided by the workers (local) or 503 (reject)",
    )
    protect_metrics: bool = Field(False, description="require a key on /metrics")
    protect_views: bool = Field(False, description="require a key on the read-only /v1/* views")

    @model_validator(mode="after")
    def _keys(self) -> AuthSettings:
        names = [k.name for k in self.keys]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"auth.keys: names must be unique: {dup}")
        hashes = [k.hash for k in self.keys]
        if len(set(hashes)) != len(hashes):
            raise ValueError("auth.keys: two entries have the same hash (the same key)")
        if self.enabled and not self.keys:
            raise ValueError("auth.enabled is true but no [[auth.keys]] are configured: nobody could call")
        if not self.storage.startswith(("memory://", "redis://", "rediss://", "redis+unix://")):
            raise ValueError(f"auth.storage {self.storage!r}: use memory:// or redis://host:port/db")
        return self
