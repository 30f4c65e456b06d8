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

_REDIS_PREFIX = "embedding-gateway:spaces:"  # a list per model and profile: its spaces, first recorded first


class SpaceRecords:
    def __init__(self, directory: Path, redis_url: str | None = None) -> None:
        self.directory = directory.expanduser()
        self._redis_url = redis_url
        self._warned: set[str] = set()
        self._docs: dict[str, dict[str, Any]] = {}  # space id -> its recording, as written

    def _name(self, model: str, profile: ModelProfile) -> str:
        digest = hashlib.sha256(json.dumps(defining(profile), sort_keys=True).encode()).hexdigest()[:12]
        return f"{model}-{digest}"

    async def space_id(self, model: str, profile: ModelProfile, probes: list[Probe], rows: Rows, backend: str) -> str:
        """The id of the space `rows` (the truth's unit vectors of the built-in probes) are in: the first
        recording it agrees with, else a new recording (every space gets an id free of last-bit noise)."""
        name = self._name(model, profile)
        known = self._load_local(name, model, profile) + await self._load_shared(name, model, profile)
        if (hit := _first_agreeing(known, probes, rows, profile.agree_cosine)) is not None:
            return hit.space_id
        doc = build(model, profile, probes, rows, {"backend": backend, "auto": True})
        mine = self._parse(doc, model, profile)
        if mine is None:
            return live_space_id(model, profile, rows)
        shared = await self._append_shared(name, doc, model, profile)
        # Replicas that recorded the same new space at once: the first in Redis's list wins for all.
        winner = _first_agreeing(shared, probes, rows, profile.agree_cosine) or mine
        self._save_local(name, winner)
        if known and name not in self._warned:
            self._warned.add(name)
            log.warning(
                "model %s: its backends produce another space than the one recorded at %s on %s (%s): recorded "
                "as %s; vectors stored from the old one must be re-indexed",
                model,
                known[0].recorded.get("at"),
                known[0].recorded.get("backend"),
                known[0].space_id,
                winner.space_id,
            )
        return winner.space_id

    # -- storage -------------------------------------------------------------------------------------
    def _parse(self, doc: Any, model: str, profile: ModelProfile) -> Space | None:
        try:
            space = parse(doc, None, model, profile)
        except SpaceError as exc:
            log.warning("model %s: an auto-recorded space is unusable (%s): recording again", model, exc)
            return None
        self._docs[space.space_id] = doc
        return space

    def _load_local(self, name: str, model: str, profile: ModelProfile) -> list[Space]:
        """Every space recorded here for this model and profile, oldest first."""
        found = []
        for path in self.directory.glob(f"{name}*.json"):
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if (space := self._parse(doc, model, profile)) is not None:
                found.append(space)
        return sorted(found, key=lambda sp: (str(sp.recorded.get("at")), sp.space_id))

    def _save_local(self, name: str, space: Space) -> None:
        path = self.directory / f"{name}-{space.space_id.rsplit('@', 1)[-1]}.json"
        with contextlib.suppress(OSError):
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{name}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(self._docs[space.space_id]), encoding="utf-8")
            tmp.replace(path)

    async def _load_shared(self, name: str, model: str, profile: ModelProfile) -> list[Space]:
        raws = await self._redis(lambda r: r.lrange(_REDIS_PREFIX + name, 0, -1))
        return self._parse_all(raws or [], name, model, profile)

    async def _append_shared(self, name: str, doc: dict[str, Any], model: str, profile: ModelProfile) -> list[Space]:
        """Append the recording to Redis's list of this model's spaces; the list as it is then (empty without
        Redis)."""
        key = _REDIS_PREFIX + name

        async def append(r: Any) -> Any:
            await r.rpush(key, json.dumps(doc))
            return await r.lrange(key, 0, -1)

        return self._parse_all(await self._redis(append) or [], name, model, profile)

    def _parse_all(self, raws: list[Any], name: str, model: str, profile: ModelProfile) -> list[Space]:
        out = []
        for raw in raws:
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            if (space := self._parse(doc, model, profile)) is not None:
                out.append(space)
                self._save_local(name, space)
        return out

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


def _first_agreeing(spaces: list[Space], probes: list[Probe], rows: Rows, agree: float) -> Space | None:
    return next((sp for sp in spaces if _agrees(sp, probes, rows, agree)), None)


def _agrees(space: Space, probes: list[Probe], rows: Rows, agree: float) -> bool:
    index = {p.text: i for i, p in enumerate(probes)}
    cos = [
        float(space.rows[(name, i)] @ rows[key])
        for (name, i) in space.rows
        if (key := (name, index.get(space.probes[i].text, -1))) in rows
    ]
    return bool(cos) and float(np.min(cos)) >= agree
