"""deploy/kubernetes validated offline: every manifest against the Kubernetes schemas, the gateway config
inside the ConfigMap through the gateway's own loader, and the pieces that must agree with each other."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from config.settings import load_settings
from gateway.cli import build_parser

HERE = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
KUBERNETES = kubernetes_validate.latest_version()


def manifests() -> dict[str, dict[str, Any]]:
    files = yaml.safe_load((HERE / "kustomization.yaml").read_text())["resources"] + ["secret.example.yaml"]
    return {name: yaml.safe_load((HERE / name).read_text()) for name in files}


@pytest.mark.parametrize("name", sorted(manifests()))
def test_manifest_validates_against_the_kubernetes_schema(name: str) -> None:
    kubernetes_validate.validate(manifests()[name], KUBERNETES, strict=True)


def _deployment() -> dict[str, Any]:
    return manifests()["deployment.yaml"]


def _container() -> dict[str, Any]:
    return _deployment()["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def _secret_value(var: str) -> str:
    """What the Secret would hold: key hashes are SHA-256s, the quota store a Redis URL."""
    secret = manifests()["secret.example.yaml"]["stringData"]
    return str(secret[var.lower().replace("_", "-")]) if var.lower().replace("_", "-") in secret else "from-a-secret"


def _config_text() -> str:
    return manifests()["configmap.yaml"]["data"]["gateway.toml"]  # type: ignore[no-any-return]


def test_the_config_in_the_configmap_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    referenced = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", _config_text()))
    provided = {e["name"] for e in _container()["env"]}
    assert referenced <= provided, f"the Deployment does not provide {referenced - provided}"
    for var in referenced:
        monkeypatch.setenv(var, _secret_value(var))
    path = tmp_path / "gateway.toml"
    path.write_text(_config_text())
    settings = load_settings(path)
    assert settings.server.host == "0.0.0.0" and settings.server.port == 8080
    assert {b.kind for b in settings.backends} == {"tei", "llamacpp", "vllm", "elastic"}
    assert settings.auth.enabled and settings.auth.storage.startswith("redis://")


def test_a_changed_config_rolls_the_pods() -> None:
    import hashlib

    annotation = _deployment()["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    expected = hashlib.sha256(_config_text().encode()).hexdigest()
    assert annotation == expected, "run: python deploy/kubernetes/checksum.py --write"


def test_the_container_runs_the_gateway_as_configured(tmp_path: Path) -> None:
    c = _container()
    args = build_parser().parse_args(c["args"][1:])
    assert c["args"][0] == "embedding-gateway" and args.command == "serve"
    assert args.config == "/etc/embedding-gateway/gateway.toml"
    # One CPU requested per worker; /tmp writable (the workers' control socket and metrics live there).
    assert args.workers == 2 and int(c["resources"]["requests"]["cpu"]) >= args.workers
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
    assert any(m["mountPath"] == "/etc/embedding-gateway" for m in c["volumeMounts"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["ports"][0]["containerPort"] == 8080 and c["resources"]["requests"]["cpu"]
    secret_keys = set(manifests()["secret.example.yaml"]["stringData"])
    assert {e["valueFrom"]["secretKeyRef"]["key"] for e in c["env"]} <= secret_keys


def test_shutdown_fits_in_the_termination_grace_period(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", _config_text()):
        monkeypatch.setenv(var, _secret_value(var))
    path = tmp_path / "gateway.toml"
    path.write_text(_config_text())
    grace = load_settings(path).server.shutdown_grace_s
    pod = _deployment()["spec"]["template"]["spec"]
    pre_stop = _container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > grace + pre_stop


def test_the_service_hpa_and_pdb_select_the_deployment() -> None:
    m = manifests()
    labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    for name in ("service.yaml", "pdb.yaml"):
        selector = m[name]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), name
    assert m["hpa.yaml"]["spec"]["scaleTargetRef"]["name"] == _deployment()["metadata"]["name"]
    assert m["hpa.yaml"]["spec"]["minReplicas"] >= 2 and m["pdb.yaml"]["spec"]["minAvailable"] == 1


def test_the_vllm_backend_is_deployed_where_the_config_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = manifests()
    deployment, service = m["vllm-deployment.yaml"], m["vllm-service.yaml"]
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    args = " ".join(container["args"])
    assert "--runner=pooling" in args and "jina-embeddings-v5-text-small-text-matching" in args
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {container["readinessProbe"]["httpGet"]["path"], container["startupProbe"]["httpGet"]["path"]} == {"/health"}
    for var in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", _config_text()):
        monkeypatch.setenv(var, _secret_value(var))
    path = tmp_path / "gateway.toml"
    path.write_text(_config_text())
    vllm = next(b for b in load_settings(path).backends if b.kind == "vllm")
    assert (
        vllm.url is not None
        and vllm.url.host == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    )
    assert vllm.url.port == service["spec"]["ports"][0]["port"] == int(args.split("--port=")[1].split()[0])
