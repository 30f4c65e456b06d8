"""Real vLLM and Infinity behind the gateway: discovery, limits, exact vectors, failover, check findings."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from backends.managed.process import LlamaCppProcess
from tests.helpers import (
    MINILM_MRL,
    TEXTS,
    cosines,
    llamacpp_backend,
    run_gateway,
    settings_for,
    unit,
    vectors_of,
    wait_until,
)
from tests.peers import PeerServer, recording_proxy, start_infinity

MANY = [f"text number {i}: {TEXTS[i % len(TEXTS)]}" for i in range(100)]
KOREAN = "해변 위로 아름다운 일몰"


def peer(name: str, kind: str, url: str, priority: int = 0, **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "model": "minilm", "url": url, "priority": priority, **kw}


def direct(url: str, texts: list[str], model: str) -> np.ndarray:
    """Vectors straight from the server (no gateway): floats in input order."""
    r = httpx.post(url, json={"input": texts, "model": model}, timeout=60)
    r.raise_for_status()
    return np.asarray([d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])], dtype=np.float32)


def backend_view(gw_url: str, name: str) -> dict[str, Any]:
    data = httpx.get(f"{gw_url}/v1/backends", timeout=10).json()["data"]
    return next(b for b in data if b["name"] == name)


def serves_like_direct(gw_url: str, direct_url: str, served: str) -> None:
    """One text, 64 texts, base64, `dimensions` and a prompt: every vector the server's own (cos >= 0.9999)."""
    with httpx.Client(base_url=gw_url, timeout=120) as c:
        one = c.post("/v1/embeddings", json={"model": "minilm", "input": "just one"})
        assert one.status_code == 200, one.text
        assert cosines(vectors_of(one), direct(direct_url, ["just one"], served)).min() >= 0.9999
        texts = MANY[:64]
        many = vectors_of(c.post("/v1/embeddings", json={"model": "minilm", "input": texts}))
        assert many.shape == (64, 384) and cosines(many, direct(direct_url, texts, served)).min() >= 0.9999
        b64 = c.post("/v1/embeddings", json={"model": "minilm", "input": TEXTS, "encoding_format": "base64"}).json()
        rows = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64["data"]]
        assert cosines(np.stack(rows), direct(direct_url, TEXTS, served)).min() >= 0.9999
        cut = c.post("/v1/embeddings", json={"model": "minilm-mrl", "input": TEXTS, "dimensions": 64})
        full = direct(direct_url, ["passage: " + t for t in TEXTS], served)  # minilm-mrl's default prompt
        assert cosines(vectors_of(cut), unit(full[:, :64])).min() >= 0.9999
        # Usage is the gateway's count with the model's tokenizer, not the server's (Infinity counts characters).
        usage = c.post("/v1/embeddings", json={"model": "minilm", "input": "hello there"}).json()["usage"]
        assert usage["prompt_tokens"] == 4  # [CLS] hello there [SEP]


def both_models(backend: dict[str, Any]) -> dict[str, Any]:
    mrl = {**backend, "name": backend["name"] + "-mrl", "model": "minilm-mrl"}
    return settings_for([backend, mrl], [{"name": "minilm", "profile": "all-minilm-l6-v2"}, MINILM_MRL])


def test_vllm_alone_without_remote_model(vllm: PeerServer) -> None:
    # Served as 'all-minilm-l6-v2', not the gateway's 'minilm': the one listed model is discovered.
    with run_gateway(both_models(peer("vllm", "vllm", vllm.url))) as gw:
        serves_like_direct(gw.url, f"{vllm.url}/v1/embeddings", "all-minilm-l6-v2")
        view = backend_view(gw.url, "vllm")
        assert view["remote_model"] == "all-minilm-l6-v2" and view["url"] == f"{vllm.url}/v1"
        wait_until(lambda: backend_view(gw.url, "vllm")["max_input_tokens"] == 256)  # its max_model_len
        assert view["kind"] == "vllm" and view["healthy"] is True


def test_infinity_alone_batches_within_its_batch_size(infinity: PeerServer) -> None:
    # Infinity serves at its root (no --url-prefix): the adapter finds where its API lives.
    with recording_proxy(infinity.url) as proxy, run_gateway(both_models(peer("inf", "infinity", proxy.url))) as gw:
        serves_like_direct(gw.url, f"{infinity.url}/embeddings", "models/minilm-hf")
        wait_until(lambda: backend_view(gw.url, "inf")["max_batch_size"] == 32)  # stats.batch_size
        view = backend_view(gw.url, "inf")
        assert view["remote_model"] == "models/minilm-hf" and view["url"] == proxy.url
        proxy.batches.clear()
        r = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "minilm", "input": MANY}, timeout=120)
        assert cosines(vectors_of(r), direct(f"{infinity.url}/embeddings", MANY, "m")).min() >= 0.9999
        # 100 texts in calls of at most 32 (besides, a health check may embed one text meanwhile)
        assert max(proxy.batches) <= 32 and proxy.batches.count(32) == 3 and 4 in proxy.batches, proxy.batches


def test_infinity_with_url_prefix(peers_tmp: Path) -> None:
    server = start_infinity(peers_tmp, url_prefix="/v1")
    try:
        with run_gateway(settings_for([peer("inf-v1", "infinity", server.url)])) as gw:
            r = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "minilm", "input": TEXTS}, timeout=60)
            assert cosines(vectors_of(r), direct(f"{server.url}/v1/embeddings", TEXTS, "m")).min() >= 0.9999
            assert backend_view(gw.url, "inf-v1")["url"] == f"{server.url}/v1"
        # Told where it is, the openai kind reaches it too; told wrong, it says so.
        with run_gateway(settings_for([peer("o", "openai", server.url, path_prefix="")]), wait_ready=False) as gw:
            wait_until(lambda: backend_view(gw.url, "o")["last_error"] is not None)
            assert "not found (404)" in backend_view(gw.url, "o")["last_error"]
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["vllm", "infinity"])
def test_failover_from_llamacpp_under_load_loses_nothing(
    kind: str, request: pytest.FixtureRequest, llama_factory: Callable[..., LlamaCppProcess]
) -> None:
    server: PeerServer = request.getfixturevalue(kind)
    doomed = llama_factory(f"doomed-{kind}")
    backends = [llamacpp_backend("llama", doomed.url, priority=0), peer(kind, kind, server.url, priority=1)]
    # The agreement check is off here: with llama.cpp as the reference it quarantines both real servers
    # over its Korean tokenization (the checker's judgement is tested in test_consistency.py).
    settings = {**settings_for(backends), "consistency": {"enabled": False}}
    with run_gateway(settings) as gw:
        wait_until(lambda: backend_view(gw.url, kind)["healthy"] is True)
        served: list[tuple[float, int, str]] = []  # (started at, status, backend)
        killed_at: list[float] = []
        lock = threading.Lock()

        def client(n: int) -> None:
            with httpx.Client(base_url=gw.url, timeout=60) as c:
                for i in range(12):
                    started = time.monotonic()
                    r = c.post("/v1/embeddings", json={"model": "minilm", "input": [f"client {n} request {i}"] * 4})
                    with lock:
                        served.append((started, r.status_code, r.headers.get("x-embedding-backend", r.text)))
                        kill = len(served) == 16
                    if kill:
                        doomed.kill()  # mid-load: the other clients' calls in flight fail over too
                        killed_at.append(time.monotonic())

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(client, range(4)))
        assert [s for s in served if s[1] != 200] == []
        before = [b for t, _, b in served if t < killed_at[0]]
        after = [b for t, _, b in served if t >= killed_at[0]]
        # Before: llama.cpp first (the idle peer takes overflow when llama.cpp's slots are busy); after: the peer.
        assert "llama" in before and len(after) >= 20 and set(after) == {kind}, served


def write_config(tmp: Path, backends: list[dict[str, Any]]) -> Path:
    lines = ["[[models]]", 'name = "minilm"', 'profile = "all-minilm-l6-v2"']
    for b in backends:
        lines += ["[[backends]]"] + [f"{k} = {json.dumps(v)}" for k, v in b.items()]
    path = tmp / "check.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def check(config: Path, wait_s: float = 20) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", "--config", str(config), "--json", "--wait", str(wait_s)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
    )
    return done.returncode, json.loads(done.stdout)


def test_wrong_remote_model_is_a_config_error_naming_the_served_ids(
    tmp_path: Path, vllm: PeerServer, primary: LlamaCppProcess
) -> None:
    config = write_config(
        tmp_path,
        [llamacpp_backend("llama", primary.url), peer("vllm", "vllm", vllm.url, priority=1, remote_model="minilm")],
    )
    code, body = check(config, wait_s=3)  # it will not get healthy: no use waiting
    assert code == 2 and body["result"] == "error"  # could not check: not "disagree"
    finding = next(f for f in body["models"][0]["findings"] if f["backend"] == "vllm")
    assert "'minilm' is not served here; served: ['all-minilm-l6-v2'] (set remote_model)" in finding["message"]


def test_tokenization_evidence_names_both_token_counts(
    tmp_path: Path, vllm: PeerServer, primary: LlamaCppProcess
) -> None:
    # llama.cpp's WordPiece skips BERT's NFD accent stripping on Hangul: fewer tokens, another vector. With
    # two backends there is no majority: the one whose tokens match the model's tokenizer defines the space.
    backends = [llamacpp_backend("llama", primary.url), peer("vllm", "vllm", vllm.url, priority=1)]
    _, body = check(write_config(tmp_path, backends))
    model = body["models"][0]
    assert model["reference"] == "vllm"
    llama_ids = httpx.post(f"{primary.url}/tokenize", json={"content": KOREAN, "add_special": True}).json()["tokens"]
    vllm_ids = httpx.post(f"{vllm.url}/tokenize", json={"model": "all-minilm-l6-v2", "prompt": KOREAN}).json()["tokens"]
    assert len(llama_ids) != len(vllm_ids)
    (partial,) = [f for f in model["findings"] if f["kind"] == "partial_disagreement"]
    assert partial["backend"] == "llama"
    # vLLM tokenizes as the model does: its count is the model tokenizer's.
    assert f"Hangul: {len(llama_ids)} tokens vs {len(vllm_ids)} in the model's tokenizer" in partial["message"]
