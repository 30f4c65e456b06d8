"""Grafana dashboard and Prometheus alert rules (issue 12, item 2): the rules pass `promtool`, and every
metric the dashboard and the rules name is one a live gateway exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from backends.managed.process import LlamaCppProcess
from tests.helpers import embed_url, llamacpp_backend, run_gateway, settings_for

COMPOSE = Path(__file__).resolve().parents[1] / "compose"
DASHBOARD = COMPOSE / "grafana" / "dashboards" / "embedding-gateway.json"
RULES = COMPOSE / "prometheus" / "alerts.yml"
_NAME = re.compile(r"\bembedding_gateway_[a-z_]+\b")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: `make test` installs Debian's prometheus package")
    return found


def test_alert_rules_and_prometheus_config_pass_promtool() -> None:
    for args in (["check", "rules", str(RULES)], ["check", "config", str(COMPOSE / "prometheus" / "prometheus.yml")]):
        r = subprocess.run([promtool(), *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def _named_in_dashboard() -> set[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {m for p in panels for t in p["targets"] for m in _NAME.findall(t["expr"])}


def _named_in_rules() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {m for g in groups for r in g["rules"] for m in _NAME.findall(r["expr"])}


def _exported(text: str) -> set[str]:
    """Every series name the exposition can carry: counters as *_total, histograms as _bucket/_sum/_count."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        if kind == "counter":
            names |= {name, name.removesuffix("_total") + "_total"}
        elif kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


def test_every_metric_in_the_dashboard_and_rules_is_exported(primary: LlamaCppProcess) -> None:
    with run_gateway(settings_for([llamacpp_backend("llama", primary.url)])) as gw:
        assert embed_url(gw.url, "traffic").status_code == 200
        exported = _exported(httpx.get(f"{gw.url}/metrics").text)
    named = _named_in_dashboard() | _named_in_rules()
    assert len(_named_in_dashboard()) >= 15 and len(_named_in_rules()) >= 8
    assert named - exported == set()


def test_dashboard_covers_what_ops_asked_for() -> None:
    titles = " ".join(p["title"].lower() for p in json.loads(DASHBOARD.read_text())["panels"])
    for topic in (
        "traffic",
        "errors",
        "latency",
        "backend calls",
        "circuits",
        "fallbacks",
        "health",
        "agreement",
        "shadow",
    ):
        assert topic in titles, topic
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert {
        "EmbeddingBackendDown",
        "EmbeddingCircuitOpen",
        "EmbeddingBackendDisagrees",
        "EmbeddingSpaceDrift",
    } <= alerts
    assert {"EmbeddingHigh5xxRatio", "EmbeddingHighP99Latency", "EmbeddingHighFallbackRate"} <= alerts
