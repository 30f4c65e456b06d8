"""Configuration: model profiles, backend configs, and loading settings from TOML + environment."""

from config.backends import (
    BackendConfig,
    ElasticBackend,
    InfinityBackend,
    LlamaCppBackend,
    ManagedLlamaCpp,
    OpenAIBackend,
    TeiBackend,
    VllmBackend,
)
from config.profiles import BUILTIN_PROFILES, ModelProfile
from config.settings import ConfigError, GatewaySettings, ModelConfig, ServerSettings, load_settings

__all__ = [
    "BUILTIN_PROFILES",
    "BackendConfig",
    "ConfigError",
    "ElasticBackend",
    "GatewaySettings",
    "InfinityBackend",
    "LlamaCppBackend",
    "ManagedLlamaCpp",
    "ModelConfig",
    "ModelProfile",
    "OpenAIBackend",
    "ServerSettings",
    "TeiBackend",
    "VllmBackend",
    "load_settings",
]
