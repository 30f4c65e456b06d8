"""Live-traffic audit: a backend that lies only off the probe texts is caught from client traffic."""

from __future__ import annotations

import json
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from backends.managed.process import LlamaCppProcess
from tests.helpers import (
    cosines,
    direct_embeddings,
    llamacpp_backend,
    record_space,
    run_gateway,
    settings_for,
    vectors_of,
)
from tests.peers import RecordingProxy, recording_proxy

WORD = "zebra"


def lying_proxy(upstream: str) -> AbstractContextManager[RecordingProxy]:
    """An OpenAI-compatible proxy in front of a real llama.cpp that embeds every text containing WORD as
    another text (the text reversed): right on every probe, wrong for some clients."""
    return recording_proxy(upstream, rewrite=lambda texts: [t[::-1] if WORD in t else t for t in texts])


def view(url: str, name: str) -> dict[str, Any]:
    return next(b for b in httpx.get(f"{url}/v1/backends").json()["data"] if b["name"] == name)


def test_a_backend_lying_off_the_probes_is_quarantined_and_its_vectors_leave_the_cache(
    primary: LlamaCppProcess,
) -> None:
    with lying_proxy(primary.url) as liar:
        liar_url = liar.url
        backends = [
            {"name": "liar", "kind": "openai", "model": "minilm", "url": liar_url, "priority": 0},
            llamacpp_backend("honest", primary.url, priority=1),
        ]
        models = [{"name": "minilm", "profile": "all-minilm-l6-v2", "audit_sample": 0.2}]
        settings = {**settings_for(backends, models), "cache": {"enabled": True}}
        with run_gateway(settings) as gw, httpx.Client(base_url=gw.url, timeout=60) as c:
            assert view(gw.url, "liar")["agreement"] == "reference"  # it passes every probe
            texts = [f"request {i}: the {WORD} crossed the road at dawn" for i in range(50)]
            started = time.time()
            served_by_liar: list[str] = []
            for n, text in enumerate(texts, 1):  # noqa: B007 - n: how many it took
                r = c.post("/v1/embeddings", json={"model": "minilm", "input": [text, "an ordinary sentence"]})
                assert r.status_code == 200
                if r.headers["x-embedding-backend"] == "liar":
                    served_by_liar.append(text)
                time.sleep(0.05)  # the audit runs after the response
                if view(gw.url, "liar")["agreement"] == "disagree":
                    break
            quarantined_after = n
            assert view(gw.url, "liar")["agreement"] == "disagree", "not caught in 50 requests"
            detail = view(gw.url, "liar")["agreement_detail"]
            # Caught by an audit ("live audit: cos 0.07 on a 48-character text …") or, when a check ran first,
            # on the client texts the checks include (traffic-N); never the text itself.
            # (or the audit's verdict standing over a check that started before it); never the text itself.
            assert ("live audit" in detail or "traffic-" in detail) and WORD not in detail
            # What it served is no longer a cache hit: asked again, the honest backend embeds it.
            again = c.post("/v1/embeddings", json={"model": "minilm", "input": served_by_liar})
            assert again.headers["x-embedding-cache"] == "miss" and again.headers["x-embedding-backend"] == "honest"
            assert cosines(vectors_of(again), direct_embeddings(primary.url, served_by_liar)).min() >= 0.9999
            audits = [
                ln for ln in c.get("/metrics").text.splitlines() if ln.startswith("embedding_gateway_audits_total")
            ]
            assert any('backend="liar"' in ln and 'outcome="fail"' in ln and not ln.endswith(" 0.0") for ln in audits)
            # The next checks include the text it failed on: it stays out (the probes alone would re-admit it).
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                report = c.get("/v1/consistency").json()["data"][0]
                if report["checked_at"] > started and report["reference"] == "honest":
                    break
                time.sleep(0.2)
            verdicts = {b["name"]: b["verdict"] for b in report["backends"]}
            assert verdicts == {"liar": "disagree", "honest": "reference"}, report
            # Why: its vectors for the text it failed on (traffic-N), or the audit's verdict standing over a check
            # that started before it.
            assert any(f["backend"] == "liar" and f["severity"] == "error" for f in report["findings"]), report
            assert WORD not in json.dumps(report)
            print(f"quarantined after {quarantined_after} requests ({len(served_by_liar)} served by the liar)")
            assert np.isfinite(quarantined_after)


def test_a_pinned_model_judges_client_texts_too_and_readmits_a_liar_that_stopped(
    primary: LlamaCppProcess, tmp_path: Path
) -> None:
    """A pinned space holds no vectors of client texts: the backends that agree with it stand for them, so
    the texts a backend failed on can clear it again (a check of the pinned probes alone never could)."""
    lying = {"on": True}

    def rewrite(texts: list[str]) -> list[str]:
        return [t[::-1] if lying["on"] and WORD in t else t for t in texts]

    space = record_space(tmp_path, llamacpp_backend("honest", primary.url))
    with recording_proxy(primary.url, rewrite=rewrite) as liar:
        backends = [
            {"name": "liar", "kind": "openai", "model": "minilm", "url": liar.url, "priority": 0},
            llamacpp_backend("honest", primary.url, priority=1),
        ]
        models = [{"name": "minilm", "profile": "all-minilm-l6-v2", "audit_sample": 1.0, "space": str(space)}]
        settings = {**settings_for(backends, models), "consistency": {"interval_s": 2.0}}
        with run_gateway(settings) as gw, httpx.Client(base_url=gw.url, timeout=60) as c:
            assert view(gw.url, "liar")["agreement"] == "agree"  # every pinned probe passes
            for i in range(20):
                c.post("/v1/embeddings", json={"model": "minilm", "input": f"request {i}: the {WORD} at dawn"})
                if view(gw.url, "liar")["agreement"] == "disagree":
                    break
            assert view(gw.url, "liar")["agreement"] == "disagree"
            lying["on"] = False  # fixed: the next check that includes the texts it failed on re-admits it
            deadline = time.monotonic() + 60
            while view(gw.url, "liar")["agreement"] != "agree" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert view(gw.url, "liar")["agreement"] == "agree", view(gw.url, "liar")
            report = c.get("/v1/consistency").json()["data"][0]
            liar_result = next(b for b in report["backends"] if b["name"] == "liar")
            assert any(k.startswith("traffic-") for k in liar_result["per_probe"]), liar_result
            assert WORD not in json.dumps(report)


def test_with_two_backends_the_model_breaks_the_tie_not_who_served(primary: LlamaCppProcess) -> None:
    """The honest backend serves and the liar re-embeds for the audit: they disagree, and with no third
    backend the halves of the text (which the liar answers honestly) decide. The server is not blamed."""
    with lying_proxy(primary.url) as liar:
        backends = [
            llamacpp_backend("honest", primary.url, priority=0),
            {"name": "liar", "kind": "openai", "model": "minilm", "url": liar.url, "priority": 1},
        ]
        models = [{"name": "minilm", "profile": "all-minilm-l6-v2", "audit_sample": 1.0}]
        with run_gateway(settings_for(backends, models)) as gw, httpx.Client(base_url=gw.url, timeout=60) as c:
            served = []
            for i in range(20):
                r = c.post("/v1/embeddings", json={"model": "minilm", "input": f"request {i}: the {WORD} at dawn"})
                assert r.status_code == 200
                served.append(r.headers["x-embedding-backend"])
                assert view(gw.url, "honest")["agreement"] in ("reference", "agree")  # never blamed for serving
                if view(gw.url, "liar")["agreement"] == "disagree":
                    break
                time.sleep(0.1)
            assert "honest" in served and view(gw.url, "liar")["agreement"] == "disagree", served
            assert "re-embedded on honest" in view(gw.url, "liar")["agreement_detail"]
