"""Memory under a burst of big requests (issue 8, item 8): RSS of the real CLI gateway before, at its
peak and after 200 concurrent 2.9 MB requests (2048 texts each), with the default work budget and,
in the same run, with the budget lifted (the baseline the budget is measured against).

    python bench/memory.py [--requests 200]

The backend is a fast in-process OpenAI-compatible stub (unit vectors of the right count), so the
figure is the gateway's own memory, not a model's. Not part of make test.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backends.managed.process import free_port  # noqa: E402
from bench.cli_gateway import cli_gateway  # noqa: E402

DIM = 384
_VEC = base64.b64encode((np.ones(DIM) / np.sqrt(DIM)).astype("<f4").tobytes()).decode()


async def stub(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """POST /v1/embeddings -> one unit vector per input; GET /v1/models -> the model."""
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    if scope["path"] == "/v1/models":
        payload: Any = {"data": [{"id": "minilm"}]}
    else:
        n = len(json.loads(body)["input"])
        payload = {"data": [{"embedding": _VEC, "index": i} for i in range(n)], "usage": {"prompt_tokens": n}}
    out = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": out})


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


async def burst(url: str, n: int, body: bytes) -> Counter[int]:
    codes: Counter[int] = Counter()
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one() -> None:
            try:
                r = await client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
                codes[r.status_code] += 1
            except httpx.HTTPError:
                codes[0] += 1

        await asyncio.gather(*(one() for _ in range(n)))
    return codes


def run(stub_url: str, requests: int, body: bytes, budget: bool) -> dict[str, Any]:
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="eg-mem-"))
    server = "" if budget else "max_inflight_bytes = 100000000000\nmax_inflight_texts = 100000000\n"
    (work / "gw.toml").write_text(f"""
[server]
port = {port}
log_level = "warning"
max_body_bytes = 4194304
{server}
[cache]
enabled = false  # measure the path to the backends, not the cache (bench/cache.py does that)
[[models]]
name = "minilm"
profile = "all-minilm-l6-v2"
[[backends]]
name = "stub"
kind = "openai"
model = "minilm"
url = "{stub_url}"
max_batch_size = 256
""")
    with cli_gateway(work, (work / "gw.toml").read_text(), port) as (url, pid):
        before = rss_mb(pid)
        t = time.perf_counter()
        codes = asyncio.run(burst(url, requests, body))
        elapsed = time.perf_counter() - t
        peak = rss_mb(pid, "VmHWM")
        time.sleep(2)
        after = rss_mb(pid)
        return {"before": before, "peak": peak, "after": after, "codes": dict(codes), "seconds": elapsed}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    stub_port = free_port()
    server = uvicorn.Server(uvicorn.Config(stub, host="127.0.0.1", port=stub_port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    text = "word " * 280  # ~1.4 KB: 2048 of them make a ~2.9 MB body
    body = json.dumps({"model": "minilm", "input": [f"{i} {text}" for i in range(2048)]}).encode()
    print(f"{args.requests} concurrent requests of {len(body) / 1e6:.1f} MB (2048 texts each)")
    results = {}
    for label, budget in (("no budget (baseline)", False), ("default budget", True)):
        r = run(f"http://127.0.0.1:{stub_port}", args.requests, body, budget)
        results[label] = r
        print(
            f"{label:22s} RSS before {r['before']:.0f} MB, peak {r['peak']:.0f} MB, after {r['after']:.0f} MB; "
            f"statuses {r['codes']} in {r['seconds']:.1f}s"
        )
    base, capped = results["no budget (baseline)"], results["default budget"]
    growth = (capped["peak"] - capped["before"]) / max(1.0, base["peak"] - base["before"])
    print(f"peak growth with budget / without: {growth:.2f}")
    server.should_exit = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
