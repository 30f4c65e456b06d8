"""The production compose stack, validated without a container engine."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from config import ElasticBackend, LlamaCppBackend, TeiBackend, VllmBackend, load_settings

COMPOSE = Path(__file__).resolve().parents[1] / "compose"


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    return data


def command(service: dict[str, Any]) -> str:
    cmd = service.get("command", [])
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


def test_services_and_images(stack: dict[str, Any]) -> None:
    services = stack["services"]
    backends = {"tei-gpu", "tei-cpu", "llamacpp", "vllm", "elasticsearch", "es-setup"}
    assert set(services) == backends | {"redis", "gateway", "prometheus", "grafana"}
    assert services["tei-gpu"]["image"] == "ghcr.io/huggingface/text-embeddings-inference:cuda-1.9"
    assert services["tei-cpu"]["image"] == "ghcr.io/huggingface/text-embeddings-inference:cpu-1.9"
    assert services["llamacpp"]["image"].startswith("ghcr.io/ggml-org/llama.cpp:server")
    assert services["elasticsearch"]["image"].startswith("docker.elastic.co/elasticsearch/elasticsearch:9.")
    assert services["vllm"]["image"].startswith("vllm/vllm-openai:v")
    for name in ("tei-gpu", "tei-cpu", "llamacpp", "vllm", "elasticsearch"):
        assert ":" in services[name]["image"] and not services[name]["image"].endswith(":latest")


def test_backend_flags_match_the_model(stack: dict[str, Any]) -> None:
    s = stack["services"]
    for tei in ("tei-gpu", "tei-cpu"):
        cmd = command(s[tei])
        assert "--pooling=last-token" in cmd and "jina-embeddings-v5-text-small-text-matching" in cmd
        assert "default-prompt" not in cmd  # prompt_mode = "gateway": TEI must not add its own
    llama = command(s["llamacpp"])
    assert "--embedding" in llama and re.search(r"--pooling last\b", llama)
    for on_gpu in ("tei-gpu", "vllm"):
        gpu = s[on_gpu]["deploy"]["resources"]["reservations"]["devices"][0]
        assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    vllm = command(s["vllm"])
    assert "--runner=pooling" in vllm and "--model=jinaai/jina-embeddings-v5-text-small-text-matching" in vllm
    # The served name is what the gateway sends as `model` (it would discover it anyway).
    assert "--served-model-name=jina-embeddings-v5-text-small-text-matching" in vllm
    assert "deploy" not in s["tei-cpu"]
    setup = command(s["es-setup"])
    assert "_inference/text_embedding/jina-v5" in setup and '"service": "elastic"' in setup
    assert s["es-setup"]["depends_on"]["elasticsearch"]["condition"] == "service_healthy"


def test_health_checks_and_volumes(stack: dict[str, Any]) -> None:
    declared = set(stack["volumes"])
    for name, svc in stack["services"].items():
        if name != "es-setup":
            assert "healthcheck" in svc and svc["healthcheck"]["test"], name
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"
    assert stack["services"]["gateway"]["ports"] == ["8080:8080"]


def test_gateway_never_waits_for_backends(stack: dict[str, Any]) -> None:
    deps = stack["services"]["gateway"].get("depends_on", {})
    assert not any(d.get("condition") == "service_healthy" for d in deps.values())


def test_mounted_gateway_config_lists_all_five_backends(stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    gw = stack["services"]["gateway"]
    mount = next(v for v in gw["volumes"] if v.endswith(":ro"))
    source, target = mount.split(":")[:2]
    assert gw["environment"]["EMBEDDING_GATEWAY_CONFIG"] == target
    monkeypatch.setenv("ELASTIC_PASSWORD", "from-env")
    for var in ("PLATFORM_API_KEY_SHA256", "OPS_KEY_SHA256"):
        assert var in gw["environment"]
        monkeypatch.setenv(var, hashlib.sha256(var.encode()).hexdigest())
    settings = load_settings(COMPOSE / source)
    assert settings.auth.enabled and settings.auth.storage == "redis://redis:6379/0"
    assert "redis" in stack["services"] and any(k.admin for k in settings.auth.keys)
    backends = {b.name: b for b in settings.backends}
    assert {type(b) for b in backends.values()} == {TeiBackend, LlamaCppBackend, VllmBackend, ElasticBackend}
    assert set(backends) == {"tei-gpu", "tei-cpu", "llamacpp", "vllm", "eis"}
    services = stack["services"]
    for name, b in backends.items():
        url = urlsplit(str(b.url))
        host, port = url.hostname, str(url.port or 80)
        assert host in services, f"{name} points at {host}, which is not a service"
        if host.startswith("tei"):
            assert port == "80"  # TEI images listen on 80 (PORT=80)
        if host in ("llamacpp", "vllm"):
            assert port in command(services[host])
    eis = backends["eis"]
    assert isinstance(eis, ElasticBackend) and eis.inference_id == "jina-v5"
    assert eis.password is not None and eis.password.get_secret_value() == "from-env"
    assert settings.profile(settings.models[0].name).dimension == 1024


def test_dockerfile_copies_what_exists() -> None:
    text = (COMPOSE / "Dockerfile").read_text()
    root = COMPOSE.parent
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (root / src).exists(), src
    assert 'CMD ["embedding-gateway", "serve"]' in text
