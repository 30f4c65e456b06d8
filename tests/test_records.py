"""Auto-recorded spaces: one id per space across restarts, replicas sharing Redis and last-bit noise."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np

from backends.managed.process import LlamaCppProcess
from config.profiles import BUILTIN_PROFILES
from gateway.consistency.probes import probe_set
from gateway.consistency.records import SpaceRecords
from gateway.consistency.space import live_space_id
from tests.conftest import RedisServer
from tests.helpers import llamacpp_backend, run_gateway, settings_for

PROFILE = BUILTIN_PROFILES["all-minilm-l6-v2"]
PROBES = probe_set(256)
rng = np.random.default_rng(5)


def rows(noise: float = 0.0, seed: int = 0) -> dict[tuple[str | None, int], np.ndarray]:
    base = np.random.default_rng(0).normal(size=(len(PROBES), 384))
    base[:, :40] *= 1e-4  # components near zero: their signs flip with last-bit noise
    jitter = np.random.default_rng(seed).normal(scale=noise, size=base.shape)
    out = base + jitter
    return {(None, i): out[i] / np.linalg.norm(out[i]) for i in range(len(PROBES))}


async def test_noise_that_flips_signs_keeps_the_recorded_id(tmp_path: Path) -> None:
    a, b = rows(), rows(noise=3e-5, seed=1)
    assert live_space_id("minilm", PROFILE, a) != live_space_id("minilm", PROFILE, b)  # the old problem
    records = SpaceRecords(tmp_path)
    first = await records.space_id("minilm", PROFILE, PROBES, a, "vllm")
    assert await records.space_id("minilm", PROFILE, PROBES, b, "infinity") == first
    # A restart (a new process): the same file, the same id.
    assert await SpaceRecords(tmp_path).space_id("minilm", PROFILE, PROBES, b, "infinity") == first
    # Another space is another id, recorded too: its own noise does not move it either, and the first keeps its id.
    other = {k: np.roll(v, 7) for k, v in a.items()}
    second = await records.space_id("minilm", PROFILE, PROBES, other, "x")
    noisy_other = {k: np.roll(v, 7) for k, v in b.items()}
    assert (
        second != first and await SpaceRecords(tmp_path).space_id("minilm", PROFILE, PROBES, noisy_other, "y") == second
    )
    assert await SpaceRecords(tmp_path).space_id("minilm", PROFILE, PROBES, b, "infinity") == first


async def test_replicas_sharing_redis_report_one_id_whoever_records_first(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    one = SpaceRecords(tmp_path / "replica-1", redis_server.url)
    two = SpaceRecords(tmp_path / "replica-2", redis_server.url)
    second_first = await two.space_id("minilm", PROFILE, PROBES, rows(3e-5, 2), "infinity")
    assert await one.space_id("minilm", PROFILE, PROBES, rows(), "vllm") == second_first
    assert (tmp_path / "replica-1").exists()  # the winner's recording, kept locally too


def test_ten_restarts_report_one_space_id(primary: LlamaCppProcess, tmp_path: Path) -> None:
    ids = set()
    for _ in range(10):
        settings = settings_for([llamacpp_backend("llama", primary.url)])
        settings["consistency"] = {"spaces_dir": str(tmp_path)}
        with run_gateway(settings) as gw:
            r = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "minilm", "input": "hello"})
            ids.add(r.headers["x-embedding-space"])
    assert len(ids) == 1 and list(tmp_path.glob("minilm-*.json"))
