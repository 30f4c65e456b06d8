"""Configuration: model profiles, backend configs, and loading settings from TOML + environment."""

from config.backends import BackendConfig, LlamaCppBackend, ManagedLlamaCpp
from config.profiles import BUILTIN_PROFILES, ModelProfile
from config.settings import ConfigError, GatewaySettings, ModelConfig, ServerSettings, load_settings

__all__ = [
    "BUILTIN_PROFILES",
    "BackendConfig",
    "ConfigError",
    "GatewaySettings",
    "LlamaCppBackend",
    "ManagedLlamaCpp",
    "ModelConfig",
    "ModelProfile",
    "ServerSettings",
    "load_settings",
]
