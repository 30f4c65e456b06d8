"""Texts per second through a real llama.cpp server: direct, and through the gateway, same run.

One llama.cpp server (the demo MiniLM GGUF, from the PyPI package) and `--concurrency` clients that
each send batches of `--batch` texts for `--duration` seconds; direct and through the gateway in
alternating rounds, so a drift of the shared machine hits both alike. Prints texts/s per round and the
ratio gateway/direct (goal: >= 0.97).

    .venv/bin/python bench/llamacpp_throughput.py [--rounds 3 --duration 10 --concurrency 4 --batch 16]
"""

from __future__ import annotations

import argparse
import asyncio
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

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "judge",
    "boxing",
    "matches",
]


def texts(batch: int, seed: int) -> list[str]:
    return [" ".join(WORDS[(seed + i + j) % len(WORDS)] for j in range(24)) for i in range(batch)]


async def load(url: str, model: str, concurrency: int, batch: int, duration: float) -> float:
    """Texts embedded per second by `concurrency` clients sending `batch` texts at a time."""
    done = 0
    end = time.monotonic() + duration

    async def client(k: int, http: httpx.AsyncClient) -> None:
        nonlocal done
        seed = k
        while time.monotonic() < end:
            r = await http.post(f"{url}/v1/embeddings", json={"model": model, "input": texts(batch, seed)})
            r.raise_for_status()
            assert len(r.json()["data"]) == batch
            done += batch
            seed += 1

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*(client(k, http) for k in range(concurrency)))
    return done / (time.monotonic() - started)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (the gateway needs a core too)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="eg-llama-bench-"))
    server = minilm_llama(work, threads=args.threads)
    port = free_port()
    config = one_backend_config(port, server.url, cache=False)  # the path to the backend, not the cache
    direct: list[float] = []
    through: list[float] = []
    try:
        server.wait_ready()
        with cli_gateway(work, config, port) as (gw, _pid):
            asyncio.run(load(gw, "minilm", args.concurrency, args.batch, 2))  # warm both paths
            asyncio.run(load(server.url, "minilm", args.concurrency, args.batch, 2))
            for r in range(args.rounds):
                direct.append(asyncio.run(load(server.url, "minilm", args.concurrency, args.batch, args.duration)))
                through.append(asyncio.run(load(gw, "minilm", args.concurrency, args.batch, args.duration)))
                print(f"round {r + 1}: direct {direct[-1]:.1f} texts/s, gateway {through[-1]:.1f} texts/s", flush=True)
    finally:
        server.stop()
    d, g = statistics.mean(direct), statistics.mean(through)
    print(f"llama.cpp threads={args.threads} parallel=2 concurrency={args.concurrency} batch={args.batch}")
    print(f"direct {d:.1f} texts/s, gateway {g:.1f} texts/s: ratio gateway/direct {g / d:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
