"""`/schema/openapi.json` (issue 12, item 3): schemathesis against a live gateway on a real llama.cpp backend.

At least 1,000 generated requests; no 5xx other than a documented 503/504; every status, content type and
body as the schema says. `/v1/consistency` is left out: each POST runs a full agreement check (seconds), and
its GET is the same report the consistency tests check."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx

from backends.managed.process import LlamaCppProcess
from tests.helpers import cli_gateway, llamacpp_backend, settings_for

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def test_schema_describes_every_route(primary: LlamaCppProcess) -> None:
    with cli_gateway(settings_for([llamacpp_backend("llama", primary.url)])) as gw:
        spec = httpx.get(f"{gw.url}/schema/openapi.json").json()
    paths = set(spec["paths"])
    assert {"/v1/embeddings", "/embed", "/", "/invocations", "/info", "/v1/models", "/v1/models/{model_id}"} <= paths
    assert {"/v1/backends", "/v1/consistency", "/v1/usage", "/v1/reload", "/health", "/ready", "/metrics"} <= paths
    embeddings = spec["paths"]["/v1/embeddings"]["post"]
    assert {"200", "400", "401", "404", "413", "429", "503", "504"} <= set(embeddings["responses"])
    assert embeddings["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("OpenAIEmbeddingRequest")
    assert "minilm" in spec["components"]["schemas"]["OpenAIEmbeddingRequest"]["properties"]["model"]["examples"]


def test_schemathesis_finds_no_server_errors_or_schema_violations(tmp_path: Path, primary: LlamaCppProcess) -> None:
    cli = Path(sys.executable).parent / "schemathesis"
    with cli_gateway(settings_for([llamacpp_backend("llama", primary.url)], max_inputs=64)) as gw:
        options = ["--checks", CHECKS, "--max-examples", "60", "--exclude-path", "/v1/consistency"]
        options += ["--seed", "20261128", "--request-timeout", "60"]
        r = subprocess.run(
            [str(cli), "run", f"{gw.url}/schema/openapi.json", *options],
            capture_output=True,
            text=True,
            timeout=600,
        )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", out)
    assert counts is not None, out[-3000:]
    assert int(counts.group(1)) >= 1000 and counts.group(1) == counts.group(2), counts.group(0)
