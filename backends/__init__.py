"""Backend adapters: one module per backend kind, all behind the `Backend` protocol in base.py."""

from __future__ import annotations

from backends.base import Backend, BackendInfo, Embeddings, Health
from config.backends import (
    BackendConfig,
    ElasticBackend,
    InfinityBackend,
    LlamaCppBackend,
    OpenAIBackend,
    TeiBackend,
    VllmBackend,
)


def create_backend(config: BackendConfig, *, url: str | None = None) -> Backend:
    """Build the adapter for one configured backend (`url` overrides it, e.g. for a managed server)."""
    # Imported here so that a deployment without, say, Elasticsearch never imports its client.
    if isinstance(config, LlamaCppBackend):
        from backends.llamacpp import LlamaCppAdapter

        return LlamaCppAdapter(config, url=url)
    if isinstance(config, VllmBackend):
        from backends.vllm import VllmAdapter

        return VllmAdapter(config)
    if isinstance(config, InfinityBackend):
        from backends.infinity import InfinityAdapter

        return InfinityAdapter(config)
    if isinstance(config, OpenAIBackend):
        from backends.openai import OpenAICompatAdapter

        return OpenAICompatAdapter(config)
    if isinstance(config, TeiBackend):
        from backends.tei import TeiAdapter

        return TeiAdapter(config)
    if isinstance(config, ElasticBackend):
        from backends.elastic import ElasticAdapter

        return ElasticAdapter(config)
    raise ValueError(f"no adapter for backend kind {config.kind!r}")


__all__ = ["Backend", "BackendInfo", "Embeddings", "Health", "create_backend"]
