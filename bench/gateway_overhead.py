"""Gateway overhead: wrk against an nginx stub directly, then through the gateway, in the same run.

The stub answers every POST with one fixed OpenAI-shaped body holding a 1024-dim vector, so the
backend costs almost nothing and the gateway's own cost shows. Phases, all in one run:

- direct: the stub itself, at `--connections` and at 1 connection (the p50 baseline);
- the gateway with `--workers 1` and `--workers 2`: req/s, p50/p99, CPU ms per request (the whole
  process tree: control plane and workers), the added p50 at 1 connection;
- `--litellm`: LiteLLM's proxy with 2 workers through the same stub (installed into a throw-away venv
  under ~/.cache on first use; it is not a dependency of the gateway);
- `--rss`: resident memory of every gateway process after 10k and after 100k requests;
- `--auth`: the 1-worker gateway again with caller keys and quotas, counted in memory and in a real
  Redis (Debian's redis-server), against auth off (the plain 1-worker phase) in the same run.
- `--audit`: the 1-worker gateway with two backends (both the stub) and the live-traffic audit at
  audit_sample 0 (off), 0.01 and 0.1, in the same run (each audit re-embeds on the other backend).
- `--tokenizer`: the 1-worker gateway with a model tokenizer (counting every input, enforcing the length
  policy) against none, for one short text and for 256 texts of 200 characters, in the same run.

    make bench                      # or: python bench/gateway_overhead.py --duration 10 --litellm --rss
Needs Debian's nginx and wrk (`apt-get install nginx-light wrk`); not part of `make test`.
CPU per request is the fairest figure on a small shared box: the load generator and the stub take
cores the gateway would otherwise use.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backends.managed.process import free_port  # noqa: E402
from bench.cli_gateway import wait_ready  # noqa: E402
from gateway.tokens import builtin_tokenizer  # noqa: E402

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
    location /many/ {{ root {dir}; try_files /body256.json =404; error_page 405 =200 /body256.json; }}
    location = /body256.json {{ root {dir}; }}
  }}
}}
"""

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
wrk.body = '{"model": "bench", "input": ["The quick brown fox jumps over the lazy dog."], "encoding_format": "float"}'
"""


def stub_body(dim: int = 1024, rows: int = 1) -> bytes:
    vec = np.random.default_rng(0).normal(size=dim).astype(np.float32)
    vec /= np.linalg.norm(vec)
    body = {
        "object": "list",
        "model": "stub",
        "usage": {"prompt_tokens": 12, "total_tokens": 12},
        "data": [{"object": "embedding", "index": i, "embedding": vec.tolist()} for i in range(rows)],
    }
    return json.dumps(body).encode()


LUA_256 = LUA.replace(
    '"input": ["The quick brown fox jumps over the lazy dog."]',
    '"input": [' + ", ".join(['"' + ("A long document about the sea and the sky, " * 5)[:200] + '"'] * 256) + "]",
)


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


def tree(pid: int) -> list[int]:
    """The process and all its descendants."""
    out = [pid]
    for p in out:
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        with suppress(OSError):
            total += _cpu_seconds(p)
    return total


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


LITELLM_KEY = "sk-bench-" + "5f3c9a1e7b2d4c6f8a0b1c2d3e4f5a6b"  # LiteLLM refuses to start without a master key
LITELLM_VENV = Path.home() / ".cache" / "embedding-gateway" / "bench-litellm"


def litellm_binary() -> Path:
    """LiteLLM's proxy in a venv of its own: never a dependency of the gateway."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        print("installing litellm[proxy] into a throw-away venv (first run only)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        pip = [str(LITELLM_VENV / "bin" / "pip"), "install", "-q"]
        subprocess.run([*pip, "litellm[proxy]"], check=True)
    return exe


@dataclass
class Result:
    name: str
    load: dict[str, float]
    one: dict[str, float] | None = None
    cpu_ms: float | None = None
    rss: dict[str, list[float]] = field(default_factory=dict)


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


GATEWAY_CONFIG = """
[server]
port = {port}
log_level = "warning"
[cache]
enabled = false  # measure the path to the backends, not the cache (bench/cache.py does that)
[[models]]
name = "bench"
profile = "jina-embeddings-v5-text-small-text-matching"
[[backends]]
name = "stub"
kind = "llamacpp"
model = "bench"
url = "http://127.0.0.1:{stub}"
max_concurrency = 256
[consistency]
enabled = false  # the stub answers one fixed vector: nothing to check
"""

SECOND_STUB = """enabled = true
require_verification = false
interval_s = 3600
[[backends]]
name = "stub2"
kind = "llamacpp"
model = "bench"
url = "http://127.0.0.1:{stub}"
priority = 1
max_concurrency = 256
"""

AUTH_CONFIG = """
[auth]
enabled = true
storage = "{storage}"
[[auth.keys]]
name = "bench"
hash = "{hash}"
rpm = 1000000000
texts_per_minute = 1000000000
"""

LITELLM_CONFIG = """
model_list:
  - model_name: bench
    litellm_params:
      model: openai/stub
      api_base: http://127.0.0.1:{stub}/v1
      api_key: none
litellm_settings:
  drop_params: true
"""


@contextmanager
def process(cmd: list[str], url: str, ready_path: str, env: dict[str, str] | None = None) -> Iterator[int]:
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
    try:
        wait_ready(url, 120, ready_path)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(
    name: str, url: str, pid: int, lua: Path, args: argparse.Namespace, rss: bool = False, texts: int = 1
) -> Result:
    endpoint = f"{url}/v1/embeddings"
    auth = {"Authorization": f"Bearer {LITELLM_KEY}"}
    check = httpx.post(endpoint, json={"model": "bench", "input": ["x"] * texts}, headers=auth, timeout=30).json()
    assert len(check["data"][0]["embedding"]) == 1024, check
    wrk(endpoint, lua, 2, args.connections, args.threads)  # warm up
    before = tree_cpu(pid)
    load = wrk(endpoint, lua, args.duration, args.connections, args.threads)
    cpu_ms = (tree_cpu(pid) - before) * 1000 / max(1.0, load["rps"] * args.duration)
    one = wrk(endpoint, lua, max(3, args.duration // 2), 1, 1)
    result = Result(name, load, one, cpu_ms)
    if rss:
        result.rss = rss_growth(endpoint, pid, lua, args)
    return result


def rss_growth(endpoint: str, pid: int, lua: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    """RSS of each gateway process after 10k and 100k requests in all (wrk runs until the count is reached)."""
    out: dict[str, list[float]] = {}
    sent = 0
    for target in (10_000, 100_000):
        while sent < target:
            r = wrk(endpoint, lua, 5, args.connections, args.threads)
            sent += int(r["rps"] * 5)
        out[f"{target // 1000}k"] = [round(rss_mb(p), 1) for p in tree(pid)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--litellm", action="store_true", help="also measure LiteLLM's proxy (2 workers)")
    ap.add_argument("--rss", action="store_true", help="RSS per process after 10k and 100k requests")
    ap.add_argument("--auth", action="store_true", help="also auth + memory quotas and auth + Redis quotas")
    ap.add_argument("--profile", help="write a py-spy collapsed-stack profile of the 1-worker gateway here")
    ap.add_argument("--audit", action="store_true", help="also the live-traffic audit at 0, 0.01 and 0.1")
    ap.add_argument("--tokenizer", action="store_true", help="also with a model tokenizer vs none, 1 and 256 texts")
    args = ap.parse_args()
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} not found: apt-get install nginx-light wrk", file=sys.stderr)
            return 2
    litellm = litellm_binary() if args.litellm else None
    work = Path(tempfile.mkdtemp(prefix="eg-bench-"))
    work.chmod(0o755)  # nginx workers run unprivileged and must read body.json
    (work / "body.json").write_bytes(stub_body())
    (work / "body256.json").write_bytes(stub_body(rows=256))
    lua256 = work / "post256.lua"
    lua256.write_text(LUA_256.replace("{key}", LITELLM_KEY))
    lua = work / "post.lua"
    lua.write_text(LUA.replace("{key}", LITELLM_KEY))
    stub_port = free_port()
    (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, port=stub_port))
    nginx = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(work / "nginx.conf")])
    results: list[Result] = []
    redis = None
    try:
        stub = f"http://127.0.0.1:{stub_port}"
        wait_ready(stub, 30, "/health")
        wrk(f"{stub}/v1/embeddings", lua, 2, args.connections, args.threads)
        direct = wrk(f"{stub}/v1/embeddings", lua, args.duration, args.connections, args.threads)
        results.append(Result("direct", direct, wrk(f"{stub}/v1/embeddings", lua, max(3, args.duration // 2), 1, 1)))
        redis = start_redis(work) if args.auth else None
        phases: list[tuple[str, int, str]] = [("", 1, ""), ("", 2, "")]
        if redis is not None:
            key_hash = hashlib.sha256(LITELLM_KEY.encode()).hexdigest()
            phases += [
                (" auth mem", 1, AUTH_CONFIG.format(storage="memory://", hash=key_hash)),
                (" auth redis", 1, AUTH_CONFIG.format(storage=redis[0], hash=key_hash)),
            ]
        for suffix, workers, auth in phases:
            port = free_port()
            config = work / f"gateway-{workers}{suffix.replace(' ', '-')}.toml"
            config.write_text(GATEWAY_CONFIG.format(port=port, stub=stub_port) + auth)
            cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--workers", str(workers)]
            url = f"http://127.0.0.1:{port}"
            with process(cmd, url, "/ready") as pid:
                spy = None
                if args.profile and workers == 1 and not suffix:  # py-spy (pip install py-spy; not a dependency)
                    spy_cmd = ["py-spy", "record", "--format", "raw", "-o", args.profile]
                    spy = subprocess.Popen(
                        [*spy_cmd, "-d", str(args.duration + 2), "-p", str(pid)],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                rss = args.rss and workers == 2 and not suffix
                results.append(measure(f"gateway w{workers}{suffix}", url, pid, lua, args, rss=rss))
                if spy is not None:
                    spy.wait(timeout=60)
        if args.audit:
            for sample in (0.0, 0.01, 0.1):
                port = free_port()
                config = work / f"gateway-audit-{port}.toml"
                text = GATEWAY_CONFIG.format(port=port, stub=stub_port).replace(
                    'profile = "jina', f'audit_sample = {sample}\nprofile = "jina'
                )
                # Two backends (the same stub), checks on but not required (the stub answers one fixed
                # vector, so the probe check cannot pass): what is measured is the audit's own cost.
                text = text.replace("enabled = false  # the stub answers one fixed vector: nothing to check", "")
                text += SECOND_STUB.format(stub=stub_port)
                config.write_text(text)
                cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)]
                url = f"http://127.0.0.1:{port}"
                with process(cmd, url, "/health") as pid:
                    results.append(measure(f"gateway w1 audit {sample:g}", url, pid, lua, args))
        if args.tokenizer:
            tok = builtin_tokenizer("all-minilm-l6-v2")  # any tokenizer.json: the cost is the mechanism's
            for suffix, script, stub_path, extra, n in (
                (" 1 text, no tokenizer", lua, "", "", 1),
                (" 1 text, tokenizer", lua, "", f'tokenizer = "{tok}"\n', 1),
                (" 256 texts, no tokenizer", lua256, "/many", "", 256),
                (" 256 texts, tokenizer", lua256, "/many", f'tokenizer = "{tok}"\n', 256),
            ):
                port = free_port()
                config = work / f"gateway-tok-{port}.toml"
                text = GATEWAY_CONFIG.format(port=port, stub=stub_port).replace(
                    f"127.0.0.1:{stub_port}", f"127.0.0.1:{stub_port}{stub_path}"
                )
                text = text.replace('profile = "jina', extra + 'profile = "jina')
                # The /many stub answers 256 rows to anything, health probes too: one call per request, no probes.
                many = "[resilience]\nbatch_size = 256\nhealth_interval_s = 3600\n"
                config.write_text(text + (many if n > 1 else ""))
                cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)]
                url = f"http://127.0.0.1:{port}"
                with process(cmd, url, "/ready" if n == 1 else "/health") as pid:
                    results.append(measure(f"gateway w1{suffix}", url, pid, script, args, texts=n))
        if litellm is not None:
            port = free_port()
            (work / "litellm.yaml").write_text(LITELLM_CONFIG.format(stub=stub_port))
            cmd = [str(litellm), "--config", str(work / "litellm.yaml"), "--port", str(port), "--num_workers", "2"]
            env = {"LITELLM_MASTER_KEY": LITELLM_KEY}
            with process(cmd, f"http://127.0.0.1:{port}", "/health/liveliness", env) as pid:
                results.append(measure("litellm w2", f"http://127.0.0.1:{port}", pid, lua, args))
    finally:
        if redis is not None:
            redis[1].kill()
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    report(results, args)
    return 0


def start_redis(work: Path) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(work)],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    return f"redis://127.0.0.1:{port}/0", proc


def report(results: list[Result], args: argparse.Namespace) -> None:
    print(f"cpus={os.cpu_count()} connections={args.connections} duration={args.duration}s body=1024-dim float JSON")
    print(f"{'path':<22} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'1-conn p50':>11} {'CPU ms/req':>11}")
    for r in results:
        one = f"{r.one['p50_ms']:.3f}" if r.one else "-"
        cpu = f"{r.cpu_ms:.3f}" if r.cpu_ms is not None else "-"
        line = f"{r.name:<22} {r.load['rps']:>9.0f} {r.load['p50_ms']:>8.2f} {r.load['p99_ms']:>8.2f}"
        print(f"{line} {r.load['non_2xx']:>8.0f} {one:>11} {cpu:>11}")
    by = {r.name: r for r in results}
    direct = by["direct"]
    assert direct.one is not None
    for name in ("gateway w1", "gateway w2"):
        g = by.get(name)
        if g is None or g.one is None:
            continue
        print(f"{name}: added p50 at 1 connection {g.one['p50_ms'] - direct.one['p50_ms']:.3f} ms over direct")
        for k, v in g.rss.items():
            print(f"{name}: RSS after {k} requests (MB, per process, parent first): {v}")
    if "gateway w1" in by and "gateway w2" in by:
        w1, w2 = by["gateway w1"], by["gateway w2"]
        print(
            f"workers 2 vs 1: req/s x{w2.load['rps'] / w1.load['rps']:.2f}, "
            f"CPU per request x{(w2.cpu_ms or 0) / (w1.cpu_ms or 1):.2f}"
        )
    plain = by.get("gateway w1")
    for name in ("gateway w1 auth mem", "gateway w1 auth redis"):
        if name in by and plain is not None and plain.one is not None and by[name].one is not None:
            a = by[name]
            assert a.one is not None
            print(
                f"{name} vs auth off: req/s x{a.load['rps'] / plain.load['rps']:.3f}, "
                f"added p50 at 1 connection {a.one['p50_ms'] - plain.one['p50_ms']:+.3f} ms, "
                f"CPU per request x{(a.cpu_ms or 0) / (plain.cpu_ms or 1):.3f}"
            )
    if "litellm w2" in by:
        lite = by["litellm w2"]
        for name in ("gateway w1", "gateway w2"):
            if name in by:
                g = by[name]
                print(
                    f"{name} vs litellm w2: req/s x{g.load['rps'] / lite.load['rps']:.1f}, "
                    f"CPU per request x{(lite.cpu_ms or 0) / (g.cpu_ms or 1):.1f} less"
                )
    for texts in ("1 text", "256 texts"):
        off, on = by.get(f"gateway w1 {texts}, no tokenizer"), by.get(f"gateway w1 {texts}, tokenizer")
        if off is not None and on is not None:
            print(
                f"tokenizer on vs off, {texts}: CPU per request x{(on.cpu_ms or 0) / (off.cpu_ms or 1):.3f} "
                f"({off.cpu_ms or 0:.3f} -> {on.cpu_ms or 0:.3f} ms), req/s x{on.load['rps'] / off.load['rps']:.3f}"
            )
    if args.profile:
        print(f"profile of gateway w1 (self time, top 15) from {args.profile}:")
        for share, frame in top_frames(Path(args.profile)):
            print(f"  {share * 100:5.1f}%  {frame}")


if __name__ == "__main__":
    sys.exit(main())
