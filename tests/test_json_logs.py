"""`[server] log_format = "json"` (issue 12, item 8): every line one JSON object; one access line per request."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from backends.managed.process import LlamaCppProcess
from tests.helpers import cli_gateway, embed_url, llamacpp_backend, settings_for


def test_json_log_lines(primary: LlamaCppProcess) -> None:
    settings = settings_for([llamacpp_backend("llama", primary.url)], log_format="json")
    with cli_gateway(settings) as gw:
        ok = embed_url(gw.url, ["a", "b"])
        bad = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "nope", "input": "x"})
        assert ok.status_code == 200 and bad.status_code == 404
        time.sleep(0.5)
        lines = [line for line in gw.lines if line.strip()]
    parsed: list[dict[str, Any]] = [json.loads(line) for line in lines]  # every line, uvicorn's included
    assert all({"time", "level", "logger", "request_id", "message"} <= set(p) for p in parsed)
    access = {p["request_id"]: p for p in parsed if p["logger"] == "embedding_gateway.access"}
    served = access[ok.headers["x-request-id"]]
    assert served["route"] == "/v1/embeddings" and served["status"] == 200 and served["model"] == "minilm"
    assert served["backends"] == ["llama"] and served["texts"] == 2 and served["latency_ms"] > 0
    refused = access[bad.headers["x-request-id"]]
    assert refused["status"] == 404 and refused["model"] == "nope"
