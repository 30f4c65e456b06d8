"""Gateway overhead: wrk against an nginx stub directly, then through the gateway, in the same run.

The stub answers every POST with one fixed OpenAI-shaped body holding a 1024-dim vector, so the
backend costs almost nothing and the gateway's own cost shows. Prints req/s, p50/p99 and ratios.

    make bench                      # or: python bench/gateway_overhead.py --duration 10 --connections 32
Needs Debian's nginx and wrk (`apt-get install nginx-light wrk`); not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from backends.managed.process import free_port

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  server {{
    listen 127.0.0.1:{port};
    default_type application/json;
    location = /health {{ return 200 '{{"status":"ok"}}'; }}
    # nginx refuses POST on static files (405); error_page re-serves the file as a GET.
    location / {{ root {dir}; try_files /body.json =404; error_page 405 =200 /body.json; }}
    location = /body.json {{ root {dir}; }}
  }}
}}
"""

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model": "bench", "input": ["The quick brown fox jumps over the lazy dog."], "encoding_format": "float"}'
"""


def stub_body(dim: int = 1024) -> bytes:
    vec = np.random.default_rng(0).normal(size=dim).astype(np.float32)
    vec /= np.linalg.norm(vec)
    body = {
        "object": "list",
        "model": "stub",
        "usage": {"prompt_tokens": 12, "total_tokens": 12},
        "data": [{"object": "embedding", "index": 0, "embedding": vec.tolist()}],
    }
    return json.dumps(body).encode()


def wrk(url: str, lua: Path, duration: int, connections: int, threads: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(lua), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M)
        assert m, out
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": pct("50"), "p99_ms": pct("99"), "non_2xx": float(errors.group(1)) if errors else 0.0}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def top_frames(raw: Path, n: int = 15) -> list[tuple[float, str]]:
    """Self time per function from py-spy's collapsed stacks ("a;b;c count" lines)."""
    counts: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        leaf = stack.rsplit(";", 1)[-1]
        counts[leaf] = counts.get(leaf, 0) + int(count)
        total += int(count)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
    return [(c / max(1, total), frame) for frame, c in ranked]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", help="write a py-spy collapsed-stack profile of the gateway here")
    args = ap.parse_args()
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} not found: apt-get install nginx-light wrk", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="eg-bench-"))
    work.chmod(0o755)  # nginx workers run unprivileged and must read body.json
    (work / "body.json").write_bytes(stub_body())
    lua = work / "post.lua"
    lua.write_text(LUA)
    stub_port, gw_port = free_port(), free_port()
    (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, port=stub_port))
    nginx = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(work / "nginx.conf")])
    config = work / "gateway.toml"
    config.write_text(f"""
[server]
port = {gw_port}
log_level = "warning"
[[models]]
name = "bench"
profile = "jina-embeddings-v5-text-small-text-matching"
[[backends]]
name = "stub"
kind = "llamacpp"
model = "bench"
url = "http://127.0.0.1:{stub_port}"
[consistency]
enabled = false  # the stub answers one fixed vector: nothing to check
""")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{gw_port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("gateway not ready")
            time.sleep(0.1)
        check = httpx.post(f"http://127.0.0.1:{gw_port}/v1/embeddings", json={"model": "bench", "input": "x"}).json()
        assert "data" in check, check
        assert len(check["data"][0]["embedding"]) == 1024
        # Warm both paths, then measure back to back.
        wrk(f"http://127.0.0.1:{stub_port}/v1/embeddings", lua, 2, args.connections, args.threads)
        wrk(f"http://127.0.0.1:{gw_port}/v1/embeddings", lua, 2, args.connections, args.threads)
        direct = wrk(f"http://127.0.0.1:{stub_port}/v1/embeddings", lua, args.duration, args.connections, args.threads)
        spy = None
        if args.profile:  # py-spy (pip install py-spy; not a dependency) samples the gateway during its run
            spy = subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "--format",
                    "raw",
                    "-o",
                    args.profile,
                    "-d",
                    str(args.duration),
                    "-p",
                    str(gateway.pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        cpu_before = _cpu_seconds(gateway.pid)
        through = wrk(f"http://127.0.0.1:{gw_port}/v1/embeddings", lua, args.duration, args.connections, args.threads)
        through["cpu_ms_per_request"] = (
            (_cpu_seconds(gateway.pid) - cpu_before) * 1000 / max(1.0, through["rps"] * args.duration)
        )
        if spy is not None:
            spy.wait(timeout=60)
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=30)
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    print(f"cpus={os.cpu_count()} connections={args.connections} duration={args.duration}s body=1024-dim float JSON")
    print(f"{'path':<10} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'non-2xx':>8}")
    for name, r in (("direct", direct), ("gateway", through)):
        print(f"{name:<10} {r['rps']:>10.0f} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f} {r['non_2xx']:>8.0f}")
    print(f"gateway CPU per request: {through['cpu_ms_per_request']:.3f} ms")
    if args.profile:
        print(f"profile (self time, top 15) from {args.profile}:")
        for share, frame in top_frames(Path(args.profile)):
            print(f"  {share * 100:5.1f}%  {frame}")
    print(
        f"ratio gateway/direct: throughput {through['rps'] / direct['rps']:.4f}, "
        f"p50 {through['p50_ms'] / direct['p50_ms']:.1f}x, p99 {through['p99_ms'] / direct['p99_ms']:.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
