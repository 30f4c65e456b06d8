"""One tokenizer, one length policy (issue 19): the gateway counts, limits and truncates every input with the
model's own tokenizer, before any backend is called. Real llama.cpp, the TEI test server, the real CLI."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from backends.managed.process import LlamaCppProcess
from gateway.tokens import ModelTokenizer, builtin_tokenizer
from tests.helpers import (
    RunningGateway,
    cosines,
    direct_embeddings,
    llamacpp_backend,
    run_gateway,
    settings_for,
    vectors_of,
)
from tests.servers.base import traffic
from tests.servers.tei import TeiServer

TeiFactory = Callable[..., tuple[str, TeiServer]]
TOKENIZER_PATH = builtin_tokenizer("all-minilm-l6-v2")
assert TOKENIZER_PATH is not None
TOKENIZER = ModelTokenizer(TOKENIZER_PATH)
LIMIT = 256  # MiniLM's max_input_tokens

LONG_380 = " ".join(f"alpha{i % 7} beta" for i in range(126))  # about 380 tokens
LONG_WORDS = " ".join(["embedding"] * 2000)


def tei_backend(name: str, url: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": "tei", "model": "minilm", "url": url, **kw}


def post(gw: RunningGateway, path: str, body: dict[str, Any]) -> httpx.Response:
    with gw.client() as c:
        return c.post(path, json=body)


def test_the_texts_are_really_over_the_limit() -> None:
    counts = TOKENIZER.counts([LONG_380, LONG_WORDS])
    assert 360 <= counts[0] <= 400 and counts[1] > 2000


@pytest.mark.parametrize("tei_first", [False, True])
def test_over_long_inputs_get_the_same_answer_on_every_backend_order(
    tei_factory: TeiFactory, primary: LlamaCppProcess, tei_first: bool
) -> None:
    url, server = tei_factory(max_input_length=512)  # it would truncate silently (auto_truncate) or embed
    backends = [llamacpp_backend("llama", primary.url, priority=1), tei_backend("tei", url, priority=0)]
    if not tei_first:
        backends = backends[::-1]
    with run_gateway(settings_for(backends)) as gw:
        for text in (LONG_380, LONG_WORDS):
            r = post(gw, "/v1/embeddings", {"model": "minilm", "input": ["short", text]})
            assert r.status_code == 400, r.text
            message = r.json()["error"]["message"]
            n = TOKENIZER.counts([text])[0]
            assert "Please reduce your prompt; or completion length." in message
            assert f"Input 1 is too long: {n} tokens" in message and f"at most {LIMIT}" in message
            assert "batch size" not in message  # no backend's operator advice
            tei = post(gw, "/embed", {"inputs": text})
            assert tei.status_code == 413 and set(tei.json()) == {"error", "error_type"}
        assert not [b for b in traffic(server) if any(len(t) > 300 for t in b.get("inputs", []))]


def test_truncation_asked_for_gives_one_vector_on_every_backend(
    tei_factory: TeiFactory, primary: LlamaCppProcess
) -> None:
    url, _ = tei_factory(max_input_length=512, auto_truncate=False)
    right = TOKENIZER.fit("", [LONG_WORDS], LIMIT, "right").texts[0]
    left_text = " ".join(f"w{i}" for i in range(600))
    left = TOKENIZER.fit("", [left_text], LIMIT, "left").texts[0]
    want = direct_embeddings(primary.url, [right, left])
    got = []
    for backend in (llamacpp_backend("llama", primary.url), tei_backend("tei", url)):
        with run_gateway(settings_for([backend])) as gw:
            r = post(gw, "/v1/embeddings", {"model": "minilm", "input": LONG_WORDS, "truncate": True})
            assert r.status_code == 200 and r.headers["x-embedding-truncated"] == "1", r.text
            assert r.json()["usage"]["prompt_tokens"] == LIMIT
            got.append(vectors_of(r)[0])
            t = post(gw, "/embed", {"inputs": left_text, "truncate": True, "truncation_direction": "left"})
            assert t.status_code == 200 and t.headers["x-embedding-truncated"] == "1", t.text
            got.append(np.asarray(t.json()[0], dtype=np.float32))
    assert left.endswith("w599") and not left.startswith("w0 ")  # left truncation keeps the end
    assert cosines(np.stack(got[0::2]), np.stack([want[0]] * 2)).min() >= 0.9999
    assert cosines(np.stack(got[1::2]), np.stack([want[1]] * 2)).min() >= 0.9999


def test_a_model_configured_to_truncate_cuts_for_clients_that_cannot_ask(primary: LlamaCppProcess) -> None:
    models = [{"name": "minilm", "profile": "all-minilm-l6-v2", "truncate": "right"}]
    with run_gateway(settings_for([llamacpp_backend("llama", primary.url)], models=models)) as gw:
        r = post(gw, "/v1/embeddings", {"model": "minilm", "input": [LONG_380, "short"]})
        assert r.status_code == 200 and r.headers["x-embedding-truncated"] == "1"
        assert post(gw, "/v1/embeddings", {"model": "minilm", "input": LONG_380, "truncate": False}).status_code == 400
        with gw.client() as c:
            assert c.get("/info").json()["auto_truncate"] is True
            model = c.get("/v1/models/minilm").json()
            assert model["tokenizer"] == str(TOKENIZER_PATH) and model["truncate"] == "right"


def test_usage_is_the_tokenizers_count_for_one_many_and_cached_inputs(
    tei_factory: TeiFactory, primary: LlamaCppProcess
) -> None:
    url, _ = tei_factory()
    texts = [f"document number {i} about the sea, the sky and {i % 13} birds" for i in range(100)]
    for backend in (llamacpp_backend("llama", primary.url), tei_backend("tei", url)):
        settings = {**settings_for([backend]), "cache": {"enabled": True}}
        with run_gateway(settings) as gw:
            one = post(gw, "/v1/embeddings", {"model": "minilm", "input": "hello there"})
            assert one.json()["usage"]["prompt_tokens"] == TOKENIZER.counts(["hello there"])[0]
            many = post(gw, "/v1/embeddings", {"model": "minilm", "input": texts})
            assert many.json()["usage"]["prompt_tokens"] == sum(TOKENIZER.counts(texts))
            again = post(gw, "/v1/embeddings", {"model": "minilm", "input": texts})
            assert again.headers.get("x-embedding-cache") == "hit"
            assert again.json()["usage"]["prompt_tokens"] == sum(TOKENIZER.counts(texts))


def test_a_backend_with_a_smaller_limit_never_gets_a_longer_input(
    tei_factory: TeiFactory, primary: LlamaCppProcess
) -> None:
    url, server = tei_factory(max_input_length=128)
    mid = " ".join(f"gamma{i % 5}" for i in range(90))  # between 128 and 256 tokens
    n = TOKENIZER.counts([mid])[0]
    assert 128 < n <= LIMIT
    backends = [tei_backend("small", url, priority=0), llamacpp_backend("llama", primary.url, priority=1)]
    with run_gateway(settings_for(backends)) as gw:
        short = post(gw, "/v1/embeddings", {"model": "minilm", "input": "a short text"})
        assert short.status_code == 200 and short.headers["x-embedding-backend"] == "small"
        longer = post(gw, "/v1/embeddings", {"model": "minilm", "input": mid})
        assert longer.status_code == 200 and longer.headers["x-embedding-backend"] == "llama", longer.text
        with gw.client() as c:
            limits = {b["name"]: b["max_input_tokens"] for b in c.get("/v1/backends").json()["data"]}
        assert limits["small"] == 128
    assert not [b for b in traffic(server) if mid in str(b.get("inputs"))]
    with run_gateway(settings_for([tei_backend("small", url)])) as gw:  # nobody takes it: the client's fault
        r = post(gw, "/v1/embeddings", {"model": "minilm", "input": mid})
        assert r.status_code == 400 and "small" in r.json()["error"]["message"], r.text


def test_a_missing_tokenizer_file_stops_start_up_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(
        '[[models]]\nname = "minilm"\nprofile = "all-minilm-l6-v2"\ntokenizer = "nope/tokenizer.json"\n'
        '[[backends]]\nname = "b"\nkind = "llamacpp"\nmodel = "minilm"\nurl = "http://127.0.0.1:9"\n'
    )
    r = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[1],
    )
    assert r.returncode == 2 and "models[0].tokenizer" in r.stderr and "Traceback" not in r.stderr


def test_token_ids_are_refused_with_the_fix_langchain_users_need(primary: LlamaCppProcess) -> None:
    with run_gateway(settings_for([llamacpp_backend("llama", primary.url)])) as gw:
        r = post(gw, "/v1/embeddings", {"model": "minilm", "input": [[101, 7592, 102]]})
    assert r.status_code == 400 and "check_embedding_ctx_length=False" in r.json()["error"]["message"]


def test_a_backend_that_truncates_below_the_limit_it_declares_is_quarantined_and_diagnosed(
    tei_factory: TeiFactory, primary: LlamaCppProcess
) -> None:
    """Probes at the model's limit, built with its tokenizer: a TEI that cuts at 128 tokens while its /info says
    512 agrees on every short probe, and only these catch it."""
    url, _ = tei_factory(max_input_length=128, declared_max_input_length=512, silent_truncation=True)
    backends = [llamacpp_backend("llama", primary.url, priority=0), tei_backend("liar", url, priority=1)]
    with run_gateway(settings_for(backends)) as gw, gw.client() as c:
        view = {b["name"]: b for b in c.get("/v1/backends").json()["data"]}
        assert view["liar"]["agreement"] == "disagree", view["liar"]
        report = c.get("/v1/consistency").json()["data"][0]
        finding = next(f for f in report["findings"] if f["backend"] == "liar")
        assert finding["kind"] == "truncation" and "truncation at 128 tokens" in finding["message"], finding
