"""Coalescing: single-text clients through the gateway vs straight at the backend, in the same run.

Phases (each direct and through the gateway, alternated, `--rounds` times; the median ratio is printed):

- calls: a TEI test server over llama.cpp that counts requests, 32 single-text clients for `--duration`
  seconds through the gateway: backend calls per client request (goal <= 1/8);
- llama.cpp, and with `--peers` real vLLM and Infinity (`make peers` installs them): 16 and 64 single-text
  clients, and 4 clients sending 16 texts each: texts/s through the gateway / texts/s direct, p50 and p99.

    .venv/bin/python bench/coalesce.py --duration 10 --peers
The load comes from wrk (Debian's `wrk`: C, one thread, a Lua script making every text unique), out of
process: on a 2-core box it still takes some CPU the backend and the gateway would otherwise use, alike for
both sides of each ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backends.managed.process import free_port  # noqa: E402
from bench.cli_gateway import cli_gateway, minilm_llama  # noqa: E402


def config(port: int, kind: str, url: str, coalesce_ms: float) -> str:
    return f"""
[server]
port = {port}
log_level = "warning"
[cache]
enabled = false  # every text is embedded: this measures coalescing, not the cache
[[models]]
name = "minilm"
profile = "all-minilm-l6-v2"
coalesce_ms = {coalesce_ms}
audit_sample = 0
[[backends]]
name = "b"
kind = "{kind}"
model = "minilm"
url = "{url}"
"""


WRK_SCRIPT = """
local counter = 0
local nonce = "%(nonce)s"
local per = %(per)d
local model = %(model)s
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  counter = counter + 1
  local items = {}
  for j = 1, per do
    items[j] = string.format('"%%s asks question %%d.%%d about the sea"', nonce, counter, j)
  end
  local input = items[1]
  if per > 1 then input = "[" .. table.concat(items, ",") .. "]" end
  local body = '{"input":' .. input
  if model then body = body .. ',"model":"' .. model .. '"' end
  return wrk.format(nil, nil, nil, body .. "}")
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %%d %%d %%d %%f %%f\\n", summary.requests, summary.errors.status,
    summary.duration, latency:percentile(50), latency:percentile(99)))
end
"""


def load(url: str, model: str | None, clients: int, per_request: int, seconds: float) -> tuple[float, float, float]:
    """(texts/s answered 200, p50 ms, p99 ms) of `clients` connections each posting `per_request` texts for
    `seconds` to the embeddings endpoint `url`. The load comes from wrk (C, one thread, out of process), so
    the measuring costs both sides little and alike; texts never repeat across phases."""
    nonce = f"{time.monotonic_ns()}"
    script = WRK_SCRIPT % {"nonce": nonce, "per": per_request, "model": f'"{model}"' if model else "nil"}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        cmd = ["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--timeout", "30s", "-s", f.name, url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    finally:
        Path(f.name).unlink()
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    requests, failed, duration_us, p50_us, p99_us = (float(x) for x in line.split()[1:])
    if failed:
        print(f"  ({failed:.0f} of {requests:.0f} requests to {url} were not answered 200)", flush=True)
    return (requests - failed) * per_request / (duration_us / 1e6), p50_us / 1000, p99_us / 1000


def wait_coalescing(url: str, timeout: float = 120) -> str:
    end = time.monotonic() + timeout
    view: dict[str, str] = {}
    while time.monotonic() < end:
        view = httpx.get(f"{url}/v1/backends", timeout=10).json()["data"][0]
        if view.get("coalescing") == "on":
            break
        time.sleep(0.5)
    return f"coalescing {view.get('coalescing')}: {view.get('coalescing_reason')}"


def compare(name: str, direct: str, direct_model: str | None, gateway: str, args: argparse.Namespace) -> None:
    for clients, per in ((16, 1), (64, 1), (4, 16)):
        ratios, d_runs, g_runs = [], [], []
        for _ in range(args.rounds):
            d = load(direct, direct_model, clients, per, args.duration)
            g = load(f"{gateway}/v1/embeddings", "minilm", clients, per, args.duration)
            d_runs.append(d)
            g_runs.append(g)
            ratios.append(g[0] / d[0] if d[0] else float("nan"))
        d, g = d_runs[-1], g_runs[-1]
        direct_s = f"direct {d[0]:7.1f} texts/s (p50 {d[1]:6.1f} p99 {d[2]:7.1f} ms)"
        gateway_s = f"gateway {g[0]:7.1f} texts/s (p50 {g[1]:6.1f} p99 {g[2]:7.1f} ms)"
        ratio = statistics.median(ratios)
        print(f"{name:9} {clients:3} clients x {per:2} texts: {direct_s}  {gateway_s}  ratio {ratio:.2f}x", flush=True)


@contextmanager
def tei_standin(upstream: str) -> Iterator[tuple[str, object]]:
    from tests.helpers import run_asgi
    from tests.servers.tei import TeiConfig, TeiServer

    server = TeiServer(upstream, TeiConfig(seconds_per_call=0.005))
    with run_asgi(server) as (url, _):
        yield url, server


def calls_phase(work: Path, llama_url: str, args: argparse.Namespace) -> None:
    from tests.servers.base import is_probe

    with tei_standin(llama_url) as (tei_url, server):
        port = free_port()
        with cli_gateway(work, config(port, "tei", tei_url, 2), port) as (gw, _):
            print(wait_coalescing(gw), flush=True)
            before = len(server.received)  # type: ignore[attr-defined]
            requests = 0
            for _ in range(1):
                rate, p50, p99 = load(f"{gw}/v1/embeddings", "minilm", 32, 1, args.duration)
                requests += int(rate * args.duration)
            received = server.received[before:]  # type: ignore[attr-defined]
            calls = sum(1 for r in received if r.path == "/embed" and not is_probe(r.body))
            print(
                f"calls     32 single-text clients, {args.duration:.0f} s: {requests} requests, {calls} backend calls: "
                f"{calls / max(1, requests):.3f} calls per request (p50 {p50:.1f} ms, p99 {p99:.1f} ms)",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--peers", action="store_true", help="also real vLLM and Infinity (make peers)")
    ap.add_argument("--skip-llama", action="store_true", help="no llama.cpp comparison (the calls phase still runs)")
    ap.add_argument("--skip-calls", action="store_true", help="no calls-per-request phase")
    ap.add_argument("--peer", choices=["vllm", "infinity"], action="append", help="only these peers (with --peers)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        llama = minilm_llama(work)
        try:
            if not args.skip_calls:
                calls_phase(work, llama.url, args)
            if not args.skip_llama:
                port = free_port()
                with cli_gateway(work, config(port, "llamacpp", llama.url, 2), port) as (gw, _):
                    print(wait_coalescing(gw), flush=True)
                    compare("llama.cpp", f"{llama.url}/v1/embeddings", None, gw, args)
        finally:
            llama.stop()
        if args.peers:
            from tests.peers import start_infinity, start_vllm

            for name, start, kind, served in (
                ("vLLM", lambda: start_vllm(work, served_name="minilm"), "vllm", "minilm"),
                ("Infinity", lambda: start_infinity(work), "infinity", None),
            ):
                if args.peer and kind not in args.peer:
                    continue
                peer = start()
                try:
                    model = served
                    if model is None:
                        model = httpx.get(f"{peer.url}/models", timeout=10).json()["data"][0]["id"]
                    port = free_port()
                    with cli_gateway(work, config(port, kind, peer.url, 2), port) as (gw, _):
                        print(wait_coalescing(gw), flush=True)
                        path = "/v1/embeddings" if kind == "vllm" else "/embeddings"
                        compare(name, f"{peer.url}{path}", model, gw, args)
                finally:
                    peer.stop()


if __name__ == "__main__":
    main()
