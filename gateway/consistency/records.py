"""Auto-recorded spaces: the space id of an unpinned model as a property of its space, not of a process.

An id computed from live vectors can differ between two runs of the same space (components near zero
flip sign with last-bit noise: vLLM and Infinity gave two ids for one space). So the first agreement of
an unpinned model is recorded (the `space record` file format) under the spaces directory and, when a
Redis URL is configured, in Redis (first writer wins). Later checks, restarts and replicas whose truth
agrees with the recording (min cosine >= agree_cosine over its probes) report the recording's id; a
truth that disagrees with it is another space and reports its own live id (and says so once).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from config.profiles import ModelProfile
from gateway.consistency.probes import Probe
from gateway.consistency.space import Rows, Space, SpaceError, build, defining, live_space_id, parse

log = logging.getLogger(__name__)

_REDIS_PREFIX = "embedding-gateway:space:"


class SpaceRecords:
    def __init__(self, directory: Path, redis_url: str | None = None) -> None:
        self.directory = directory.expanduser()
        self._redis_url = redis_url
        self._warned: set[str] = set()

    def _name(self, model: str, profile: ModelProfile) -> str:
        digest = hashlib.sha256(json.dumps(defining(profile), sort_keys=True).encode()).hexdigest()[:12]
        return f"{model}-{digest}"

    async def space_id(self, model: str, profile: ModelProfile, probes: list[Probe], rows: Rows, backend: str) -> str:
        """The id of the space `rows` (the truth's unit vectors of the built-in probes) are in."""
        name = self._name(model, profile)
        recorded = self._load_local(name, model, profile) or await self._load_shared(name, model, profile)
        if recorded is None:
            doc = build(model, profile, probes, rows, {"backend": backend, "auto": True})
            winner = await self._share_first(name, doc)
            recorded = self._parse(winner, model, profile) if winner is not None else None
            recorded = recorded or self._parse(doc, model, profile)
            if recorded is None:
                return live_space_id(model, profile, rows)
            self._save_local(name, recorded, winner or doc)
        if _agrees(recorded, probes, rows, profile.agree_cosine):
            return recorded.space_id
        if name not in self._warned:
            self._warned.add(name)
            log.warning(
                "model %s: its backends no longer produce the space recorded at %s on %s (%s): this is another "
                "space; vectors stored from the old one must be re-indexed",
                model,
                recorded.recorded.get("at"),
                recorded.recorded.get("backend"),
                recorded.space_id,
            )
        return live_space_id(model, profile, rows)

    # -- storage -------------------------------------------------------------------------------------
    def _parse(self, doc: Any, model: str, profile: ModelProfile) -> Space | None:
        try:
            return parse(doc, None, model, profile)
        except SpaceError as exc:
            log.warning("model %s: an auto-recorded space is unusable (%s): recording again", model, exc)
            return None

    def _load_local(self, name: str, model: str, profile: ModelProfile) -> Space | None:
        path = self.directory / f"{name}.json"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return self._parse(doc, model, profile)

    def _save_local(self, name: str, space: Space, doc: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{name}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(doc), encoding="utf-8")
            tmp.replace(self.directory / f"{name}.json")

    async def _load_shared(self, name: str, model: str, profile: ModelProfile) -> Space | None:
        raw = await self._redis(lambda r: r.get(_REDIS_PREFIX + name))
        if not raw:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            return None
        space = self._parse(doc, model, profile)
        if space is not None:
            self._save_local(name, space, doc)
        return space

    async def _share_first(self, name: str, doc: dict[str, Any]) -> dict[str, Any] | None:
        """Offer the recording to Redis; whoever wrote first wins. None without Redis."""
        key = _REDIS_PREFIX + name
        if await self._redis(lambda r: r.set(key, json.dumps(doc), nx=True)) is None:
            return None
        raw = await self._redis(lambda r: r.get(key))
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    async def _redis(self, op: Any) -> Any:
        if not self._redis_url:
            return None
        import redis.asyncio as redis

        client = redis.from_url(self._redis_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return await op(client)
        except (redis.RedisError, OSError) as exc:
            log.warning("space records: Redis %s unavailable (%s): this process records locally", self._redis_url, exc)
            return None
        finally:
            await client.aclose()


def _agrees(space: Space, probes: list[Probe], rows: Rows, agree: float) -> bool:
    index = {p.text: i for i, p in enumerate(probes)}
    cos = [
        float(space.rows[(name, i)] @ rows[key])
        for (name, i) in space.rows
        if (key := (name, index.get(space.probes[i].text, -1))) in rows
    ]
    return bool(cos) and float(np.min(cos)) >= agree
