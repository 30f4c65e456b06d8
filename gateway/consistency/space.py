"""Pinned embedding spaces: a model's space recorded once as a file, checked against forever.

A space file holds what defines the space - the profile fields (dimension, pooling, prompts,
normalize, input limit, Matryoshka dimensions), the probe texts, and each probe's full-dimension unit
vector per prompt (float32, little-endian, base64) - plus when and from which backend it was recorded.
Its `space_id` is `<model>@<12 hex>` of the SHA-256 of the defining content (not of the recording
metadata), so the same content always has the same id, and any other content another one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from config.profiles import ModelProfile
from gateway.consistency.probes import Probe

FORMAT = "embedding-gateway-space/1"
# The profile fields that define a space: a model that differs in any of them embeds elsewhere.
DEFINING = ("dimension", "pooling", "prompts", "normalize", "max_input_tokens", "matryoshka_dimensions")

Rows = dict[tuple[str | None, int], np.ndarray]


class SpaceError(Exception):
    """An unreadable, corrupt or contradicting space file: one message naming the problem."""


@dataclass(frozen=True)
class Space:
    model: str
    space_id: str
    profile: dict[str, Any]
    probes: tuple[Probe, ...]
    rows: Rows  # (prompt name, probe index) -> unit vector (float64 for comparisons)
    recorded: dict[str, Any]
    path: Path | None = None

    @property
    def probe_texts(self) -> tuple[str, ...]:
        return tuple(p.text for p in self.probes)


def defining(profile: ModelProfile) -> dict[str, Any]:
    data = profile.model_dump()
    out = {k: data.get(k) for k in DEFINING}
    out["matryoshka_dimensions"] = sorted(out.get("matryoshka_dimensions") or [])
    out["prompts"] = dict(sorted((out.get("prompts") or {}).items()))
    return out


def _encode(v: np.ndarray) -> str:
    return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")


def _content(model: str, profile: dict[str, Any], probes: list[dict[str, Any]], vectors: dict[str, Any]) -> bytes:
    return json.dumps(
        {"model": model, "profile": profile, "probes": probes, "vectors": vectors}, sort_keys=True, ensure_ascii=False
    ).encode()


def space_id(model: str, content: bytes) -> str:
    return f"{model}@{hashlib.sha256(content).hexdigest()[:12]}"


def build(
    model: str, profile: ModelProfile, probes: list[Probe], rows: Rows, recorded: dict[str, Any]
) -> dict[str, Any]:
    """The space file's JSON document for vectors just embedded on one backend."""
    prof = defining(profile)
    probe_list = [{"name": p.name, "text": p.text, "long": p.long} for p in probes]
    names = sorted({name for name, _ in rows}, key=lambda n: n or "")
    vectors = {
        (name or ""): [
            _encode(rows[(name, i)] / np.linalg.norm(rows[(name, i)])) if (name, i) in rows else None
            for i in range(len(probes))
        ]
        for name in names
    }
    doc = {
        "format": FORMAT,
        "space_id": space_id(model, _content(model, prof, probe_list, vectors)),
        "model": model,
        "profile": prof,
        "probes": probe_list,
        "vectors": vectors,
        "recorded": {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **recorded},
    }
    return doc


def load(path: Path, model: str | None = None, profile: ModelProfile | None = None) -> Space:
    """Read and verify a space file; against `profile` when given (a contradiction is a SpaceError)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpaceError(f"space file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise SpaceError(f"space file {str(path)!r} is not valid JSON: {exc}") from None
    return parse(doc, path, model, profile)


def parse(doc: Any, path: Path | None = None, model: str | None = None, profile: ModelProfile | None = None) -> Space:
    where = f"space file {str(path)!r}" if path else "space"
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SpaceError(f"{where} is not an embedding-gateway space (format {FORMAT!r} expected)")
    try:
        name, prof, probe_list, vectors = doc["model"], doc["profile"], doc["probes"], doc["vectors"]
        probes = tuple(Probe(p["name"], p["text"], bool(p.get("long"))) for p in probe_list)
        dim = int(prof["dimension"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SpaceError(f"{where} lacks or garbles a required field: {exc}") from None
    if doc.get("space_id") != space_id(name, _content(name, prof, probe_list, vectors)):
        raise SpaceError(
            f"{where}: its content does not match its space_id {doc.get('space_id')!r} (edited or corrupt)"
        )
    rows: Rows = {}
    for key, column in vectors.items():
        if not isinstance(column, list) or len(column) != len(probes):
            raise SpaceError(f"{where}: vectors[{key!r}] must list one vector per probe ({len(probes)})")
        for i, item in enumerate(column):
            if item is None:
                continue
            try:
                v = np.frombuffer(base64.b64decode(item, validate=True), dtype="<f4").astype(np.float64)
            except (ValueError, TypeError) as exc:
                raise SpaceError(f"{where}: vectors[{key!r}][{i}] is not base64 float32: {exc}") from None
            if v.shape != (dim,) or not np.isfinite(v).all():
                raise SpaceError(f"{where}: vectors[{key!r}][{i}] has {v.size} values; the space's dimension is {dim}")
            rows[(key or None, i)] = v / np.linalg.norm(v)
    if model is not None and name != model:
        raise SpaceError(f"{where} was recorded for model {name!r}, not {model!r}")
    if profile is not None:
        mine = defining(profile)
        for field in DEFINING:
            if prof.get(field) != mine[field]:
                raise SpaceError(
                    f"{where}: its {field} is {prof.get(field)!r} but the model's profile says {mine[field]!r}"
                )
    return Space(name, doc["space_id"], prof, probes, rows, dict(doc.get("recorded") or {}), path)


def live_space_id(model: str, profile: ModelProfile, rows: Rows) -> str:
    """The id of an unpinned space, from its reference's probe vectors: their signs (stable across
    the last-bit noise of repeated runs, different for any other model) and the profile."""
    signs = b"".join(np.packbits(rows[k] > 0).tobytes() for k in sorted(rows, key=lambda k: (k[0] or "", k[1])))
    return space_id(model, json.dumps(defining(profile), sort_keys=True).encode() + signs)
