"""Backend adapters: one module per backend kind, all behind the `Backend` protocol in base.py."""

from __future__ import annotations

from backends.base import Backend, BackendInfo, Embeddings, Health
from backends.llamacpp import LlamaCppAdapter
from config.backends import BackendConfig, LlamaCppBackend


def create_backend(config: BackendConfig, *, url: str | None = None) -> Backend:
    """Build the adapter for one configured backend (`url` overrides it, e.g. for a managed server)."""
    if isinstance(config, LlamaCppBackend):
        return LlamaCppAdapter(config, url=url)
    raise ValueError(f"no adapter for backend kind {config.kind!r}")


__all__ = ["Backend", "BackendInfo", "Embeddings", "Health", "create_backend"]
