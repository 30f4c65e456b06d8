"""The gateway's settings: a TOML file plus EMBEDDING_GATEWAY_* environment overrides."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from config.auth import AuthSettings
from config.backends import BackendConfig
from config.cache import CacheSettings
from config.profiles import BUILTIN_PROFILES, ModelProfile, Pooling

ENV_PREFIX = "EMBEDDING_GATEWAY_"


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0, description="larger request bodies get 413")
    max_inputs: int = Field(2048, gt=0, description="most texts in one client request")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="text (for people) or json (one object per line, with an access line per request)"
    )
    default_model: str | None = Field(None, description="model for /embed requests that name none; default the first")
    shutdown_grace_s: float = Field(10.0, ge=0, description="how long in-flight requests may finish on SIGTERM")
    max_inflight_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="request bodies processed at once; beyond: 503 + Retry-After"
    )
    max_inflight_texts: int = Field(8192, gt=0, description="texts being embedded at once; beyond: 503 + Retry-After")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection must send a complete request (headers and body) within this"
    )
    keepalive_timeout_s: float = Field(5.0, gt=0, description="idle keep-alive connections are closed after this")
    watch_config: bool = Field(False, description="reload the config file when it changes (as on SIGHUP)")
    max_connections: int | None = Field(
        None, gt=0, description="open client connections; beyond, the oldest idle one is closed (default: fd limit)"
    )
    unknown_fields: Literal["reject", "ignore"] = Field(
        "reject",
        description="request fields a route does not know: 400 naming them (a misspelt `dimension` would "
        "otherwise change nothing, silently), or ignored",
    )


class ResilienceSettings(BaseModel):
    """Retries, deadlines, circuit breakers, health checks, batching and hedging (all backends)."""

    model_config = ConfigDict(extra="forbid")

    request_timeout_s: float = Field(
        30.0, gt=0, description="deadline of one client request; the x-request-timeout header may lower it"
    )
    max_attempts: int = Field(4, ge=1, description="backend calls per sub-batch, across backends")
    backoff_base_s: float = Field(0.05, ge=0, description="full-jitter exponential backoff base")
    backoff_max_s: float = Field(2.0, ge=0)
    breaker_consecutive_failures: int = Field(5, ge=1, description="open the circuit after this many failures in a row")
    breaker_failure_ratio: float = Field(0.5, gt=0, le=1, description="...or this share of failures in the window")
    breaker_window_s: float = Field(30.0, gt=0)
    breaker_min_calls: int = Field(10, ge=1, description="calls in the window before the ratio counts")
    breaker_cooldown_s: float = Field(2.0, gt=0, description="first open period; doubles on repeated trips")
    breaker_cooldown_max_s: float = Field(60.0, gt=0)
    health_interval_s: float = Field(5.0, gt=0, description="active health check period per backend")
    health_timeout_s: float = Field(2.0, gt=0)
    healthy_threshold: int = Field(2, ge=1, description="passing checks in a row to become healthy")
    unhealthy_threshold: int = Field(2, ge=1, description="failing checks in a row to become unhealthy")
    probe_text: str = Field("embedding-gateway health probe", min_length=1, description="the one-text embed probe")
    batch_size: int = Field(32, ge=1, description="largest sub-batch when no backend states a limit")
    subbatch_concurrency: int = Field(4, ge=1, description="sub-batches of one request in flight at once")
    hedge_after_s: float | None = Field(None, gt=0, description="send a slow sub-batch to a second backend too (off)")


class ConsistencySettings(BaseModel):
    """The agreement checker: when it runs and what it enforces."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="check backends against the reference and quarantine disagreeing ones")
    interval_s: float = Field(300.0, gt=0, description="re-check every backend this often")
    require_verification: bool = Field(
        True, description="a backend serves only after it passed a check (the reference always serves)"
    )
    spaces_dir: str | None = Field(
        None,
        description="where an unpinned model's first agreed space is recorded (its id then survives restarts; "
        "shared through Redis when [cache] url or [auth] storage is set); default "
        "$EMBEDDING_GATEWAY_SPACES_DIR or ~/.cache/embedding-gateway/spaces",
    )
    on_space_drift: Literal["refuse", "warn"] = Field(
        "refuse", description="when every backend leaves a model's pinned space: refuse (503) or warn and serve"
    )


# ModelConfig fields about how the gateway treats the model, not what the model is.
_NOT_PROFILE = {
    "name",
    "profile",
    "reference",
    "reference_gguf",
    "space",
    "tokenizer",
    "truncate",
    "on_partial_disagreement",
    "audit_sample",
    "aliases",
    "coalesce_ms",
}


class AliasConfig(BaseModel):
    """A second name for a model: the same space and backends, another default prompt (a framework's query
    embedder then only changes its model name)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    prompt: str | None = Field(None, description="the prompt requests under this name get unless they name one")


class ModelConfig(BaseModel):
    """A model clients can ask for: a built-in profile, inline fields overriding it, or both."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    profile: str | None = Field(None, description=f"one of {sorted(BUILTIN_PROFILES)}")
    dimension: int | None = None
    matryoshka_dimensions: list[int] | None = None
    pooling: Pooling | None = None
    prompts: dict[str, str] | None = None
    default_prompt_name: str | None = None
    max_input_tokens: int | None = None
    normalize: bool | None = None
    agree_cosine: float | None = None
    warn_cosine: float | None = None
    error_cosine: float | None = None
    reference: str | None = Field(None, description="backend the others are checked against; default first by priority")
    reference_gguf: Path | None = Field(
        None, description="GGUF of the model: lets the checker reproduce other poolings to name a pooling mismatch"
    )
    space: Path | None = Field(
        None, description="a pinned space file (embedding-gateway space record), relative to the config file"
    )
    tokenizer: Path | None = Field(
        None,
        description="the model's tokenizer.json, relative to the config file (default: the built-in profile's, "
        "where the gateway has the model's files)",
    )
    truncate: Literal["none", "right", "left"] = Field(
        "none", description="inputs over max_input_tokens: refused (none), or cut keeping their start or end"
    )
    audit_sample: float = Field(
        0.01,
        ge=0,
        le=1,
        description="share of requests whose vectors are re-embedded on another backend in service after the "
        "response (live-traffic audit); 0 turns it off",
    )
    on_partial_disagreement: Literal["restrict", "quarantine"] = Field(
        "restrict",
        description="a backend wrong on a few scripts only: keeps serving texts in the others (restrict), or is "
        "taken out (quarantine)",
    )

    aliases: list[AliasConfig] = Field(default_factory=list, description="other names for this model")
    coalesce_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="concurrent requests for this model and prompt arriving within this window, or while the "
        "backend's slots are all busy, share one backend call (only on backends whose vectors do not depend on "
        "batch composition); 0 turns it off",
    )
    tasks: dict[str, str] | None = None

    _resolved: ModelProfile | None = PrivateAttr(None)
    _space: Any = PrivateAttr(None)  # the loaded pinned space (gateway.consistency.space.Space)
    _tokenizer: Any = PrivateAttr(None)  # the loaded tokenizer (gateway.tokens.ModelTokenizer) or None

    @model_validator(mode="after")
    def _resolve(self) -> ModelConfig:
        base: dict[str, Any] = {}
        if self.profile is not None:
            if self.profile not in BUILTIN_PROFILES:
                raise ValueError(f"unknown profile {self.profile!r}; built-in profiles: {sorted(BUILTIN_PROFILES)}")
            base = BUILTIN_PROFILES[self.profile].model_dump()
        overrides = self.model_dump(
            exclude=_NOT_PROFILE,
            exclude_none=True,
        )
        # New prompts invalidate the profile's default unless it still names one of them.
        if (
            "prompts" in overrides
            and "default_prompt_name" not in overrides
            and base.get("default_prompt_name") not in overrides["prompts"]
        ):
            base["default_prompt_name"] = None
        if "tasks" in overrides:  # the profile's task names stay unless overridden one by one
            overrides["tasks"] = {**base.get("tasks", {}), **overrides["tasks"]}
        merged = {**base, **overrides}
        missing = [k for k in ("dimension", "pooling", "max_input_tokens") if k not in merged]
        if missing:
            raise ValueError(f"no built-in `profile` given, so {missing} must be set inline")
        self._resolved = ModelProfile.model_validate(merged)
        prompts = self._resolved.prompts
        for alias in self.aliases:
            if alias.prompt is not None and alias.prompt not in prompts:
                known = sorted(prompts) or "none"
                raise ValueError(
                    f"alias {alias.name!r}: prompt {alias.prompt!r} is not one of the model's prompts ({known})"
                )
        return self

    @property
    def resolved(self) -> ModelProfile:
        assert self._resolved is not None
        return self._resolved


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    server: ServerSettings = ServerSettings()
    resilience: ResilienceSettings = ResilienceSettings()
    consistency: ConsistencySettings = ConsistencySettings()
    auth: AuthSettings = AuthSettings()
    cache: CacheSettings = CacheSettings()
    models: list[ModelConfig] = Field(min_length=1)
    backends: list[BackendConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _cross_references(self) -> GatewaySettings:
        model_names = [m.name for m in self.models]
        _unique("models and model aliases", model_names + [a.name for m in self.models for a in m.aliases])
        _unique("backends", [b.name for b in self.backends])
        for b in self.backends:
            if b.model not in model_names:
                raise ValueError(
                    f"backend {b.name!r} serves model {b.model!r}, which is not in [[models]] {model_names}"
                )
        for m in self.models:
            own = [b.name for b in self.backends if b.model == m.name]
            if m.reference is not None and m.reference not in own:
                raise ValueError(f"models {m.name!r}: reference {m.reference!r} is not one of its backends {own}")
        if self.server.default_model is not None and self.server.default_model not in model_names:
            raise ValueError(f"server.default_model {self.server.default_model!r} is not in [[models]] {model_names}")
        for k in self.auth.keys:
            unknown = [m for m in k.models if m != "*" and m not in model_names]
            if unknown:
                raise ValueError(f"auth key {k.name!r} allows models {unknown}, which are not in [[models]]")
        served = {b.model for b in self.backends}
        lonely = [m for m in model_names if m not in served]
        if lonely:
            raise ValueError(f"models {lonely} have no [[backends]] entry")
        return self

    def profile(self, model: str) -> ModelProfile:
        return next(m.resolved for m in self.models if m.name == model)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file; the file beats defaults. load_settings() hands over the file.
        return (init_settings, env_settings, _FileSource(settings_cls, _CURRENT_FILE_DATA))


class _FileSource(PydanticBaseSettingsSource):
    """The parsed (and ${VAR}-expanded) TOML file as a settings source."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any] | None) -> None:
        super().__init__(settings_cls)
        self._data = data or {}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def _unique(what: str, names: list[str]) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{what} names must be unique; repeated: {dupes}")


_CURRENT_FILE_DATA: dict[str, Any] | None = None
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(Exception):
    """An invalid configuration: one readable message, no traceback (the CLI exits 2)."""


def load_settings(path: Path | str | None, *, load_spaces: bool = True) -> GatewaySettings:
    """Read the TOML file at `path` (may be None: environment only) and apply env overrides.

    String values may reference environment variables as `${NAME}`, so secrets can stay out of the
    file (e.g. `api_key = "${ES_API_KEY}"`); an unset variable is a configuration error.
    """
    global _CURRENT_FILE_DATA
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"configuration file {str(path)!r} does not exist")
        data = _expand(_read_toml(path), path, ())
    _CURRENT_FILE_DATA = data
    try:
        settings = GatewaySettings()
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    finally:
        _CURRENT_FILE_DATA = None
    resolve_tokenizers(settings, path)
    if load_spaces:
        load_spaces_of(settings, path)
    return settings


def resolve_tokenizers(settings: GatewaySettings, path: Path | None) -> None:
    """Each model's tokenizer.json (relative to the config file, or the built-in profile's); a file that is
    missing or does not load stops start-up naming the field."""
    from gateway.tokens import ModelTokenizer, builtin_tokenizer

    base = path.parent if path is not None else Path.cwd()
    for i, m in enumerate(settings.models):
        given = m.tokenizer
        found = (base / given.expanduser()).resolve() if given is not None else builtin_tokenizer(m.profile)
        if found is None:
            continue
        try:
            m._tokenizer = ModelTokenizer(found)
        except Exception as exc:  # the Rust library raises its own types for unreadable files
            raise ConfigError(
                f"invalid configuration ({path or 'environment'}):\n  models[{i}].tokenizer: cannot load {found}: "
                f"{' '.join(str(exc).split())[:200]}"
            ) from None
        m.tokenizer = found


def load_spaces_of(settings: GatewaySettings, path: Path | None) -> None:
    """Pinned spaces, relative to the config file; unreadable, corrupt or contradicting ones stop start-up."""
    from gateway.consistency.space import SpaceError, load

    base = path.parent if path is not None else Path.cwd()
    for i, m in enumerate(settings.models):
        if m.space is None:
            continue
        m.space = (base / m.space.expanduser()).resolve()
        try:
            m._space = load(m.space, m.name, m.resolved)
        except SpaceError as exc:
            raise ConfigError(f"invalid configuration ({path or 'environment'}):\n  models[{i}].space: {exc}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _expand(node: Any, path: Path, loc: tuple[int | str, ...]) -> Any:
    if isinstance(node, dict):
        return {k: _expand(v, path, (*loc, k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, path, (*loc, i)) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def lookup(m: re.Match[str]) -> str:
            if m.group(1) not in os.environ:
                raise ConfigError(
                    f"invalid configuration ({path}):\n  {_loc(loc)}: environment variable {m.group(1)} is not set"
                )
            return os.environ[m.group(1)]

        return _ENV_REF.sub(lookup, node)
    return node


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = str(path) if path is not None else "environment"
    lines = [f"invalid configuration ({where}):"]
    for err in exc.errors(include_url=False, include_input=False):
        loc = _loc(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("llamacpp", "tei", "elastic", "openai", "vllm", "infinity") and out.endswith("]"):
            continue  # the discriminator tag adds nothing for a reader
        else:
            out += f".{part}" if out else str(part)
    return out
