"""Configuration: model profiles, backend configs, and loading settings from TOML + environment."""

from config.backends import BackendConfig, ElasticBackend, LlamaCppBackend, ManagedLlamaCpp, OpenAIBackend, TeiBackend
from config.profiles import BUILTIN_PROFILES, ModelProfile
from config.settings import ConfigError, GatewaySettings, ModelConfig, ServerSettings, load_settings

__all__ = [
    "BUILTIN_PROFILES",
    "BackendConfig",
    "ConfigError",
    "ElasticBackend",
    "GatewaySettings",
    "LlamaCppBackend",
    "ManagedLlamaCpp",
    "ModelConfig",
    "ModelProfile",
    "OpenAIBackend",
    "ServerSettings",
    "TeiBackend",
    "load_settings",
]
