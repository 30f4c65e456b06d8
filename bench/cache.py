"""The embedding cache through a real llama.cpp server, in one run: requests/s and p50 when every text is
a miss, when every text is a hit, and a 50 % mix (each request half cached texts, half new ones).

    .venv/bin/python bench/cache.py [--duration 10 --concurrency 8 --batch 8]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backends.managed.process import free_port  # noqa: E402
from bench.cli_gateway import cli_gateway, minilm_llama, one_backend_config  # noqa: E402


async def load(url: str, make_texts: object, concurrency: int, duration: float) -> tuple[float, float, str]:
    """Requests/s, p50 ms and the x-embedding-cache values seen."""
    latencies: list[float] = []
    seen: set[str] = set()
    end = time.monotonic() + duration
    counter = itertools.count()

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < end:
            texts = make_texts(next(counter))  # type: ignore[operator]
            started = time.perf_counter()
            r = await http.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": texts})
            r.raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
            seen.add(r.headers.get("x-embedding-cache", "-"))

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=60) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return len(latencies) / (time.monotonic() - started), statistics.median(latencies), ",".join(sorted(seen))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="eg-cache-bench-"))
    server = minilm_llama(work)
    port = free_port()
    config = one_backend_config(port, server.url, cache=True)
    b = args.batch
    hot = [f"a repeated query number {i}" for i in range(b)]
    results = {}
    try:
        server.wait_ready()
        with cli_gateway(work, config, port) as (url, _pid):
            asyncio.run(load(url, lambda n: hot, 2, 1))  # the hot set is cached now
            results["all miss"] = asyncio.run(
                load(url, lambda n: [f"new text {n} {i}" for i in range(b)], args.concurrency, args.duration)
            )
            results["all hit"] = asyncio.run(load(url, lambda n: hot, args.concurrency, args.duration))
            results["50% hit"] = asyncio.run(
                load(
                    url,
                    lambda n: hot[: b // 2] + [f"fresh text {n} {i}" for i in range(b - b // 2)],
                    args.concurrency,
                    args.duration,
                )
            )
    finally:
        server.stop()
    print(f"llama.cpp 1 thread, 2 slots; {args.concurrency} clients x {b} texts per request, {args.duration:g}s each")
    print(f"{'traffic':<10} {'req/s':>9} {'p50 ms':>9}  x-embedding-cache")
    for name, (rps, p50, seen) in results.items():
        print(f"{name:<10} {rps:>9.1f} {p50:>9.2f}  {seen}")
    miss = results["all miss"]
    for name in ("all hit", "50% hit"):
        rps, p50, _ = results[name]
        print(f"{name} vs all miss: req/s x{rps / miss[0]:.1f}, p50 x{p50 / miss[1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
