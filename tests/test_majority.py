"""The model is the truth, not the first backend: with real llama.cpp, vLLM and Infinity serving MiniLM.

llama.cpp's tokenizer is wrong on Hangul and Devanagari for this model (see ../shared/research/peers.md);
vLLM and Infinity agree with each other and with sentence-transformers everywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.managed.process import LlamaCppProcess
from tests.helpers import llamacpp_backend, record_space, run_gateway, settings_for
from tests.peers import PeerServer

KOREAN = ["해변 위로 아름다운 일몰", "서울은 한국의 수도입니다"]
HINDI_AND_ENGLISH = ["the beach at dusk", "समुद्र तट पर एक खूबसूरत सूर्यास्त"]
ENGLISH = ["the beach at dusk", "a quiet evening by the sea"]


def peer(name: str, kind: str, url: str, priority: int, model: str = "minilm") -> dict[str, Any]:
    return {"name": name, "kind": kind, "model": model, "url": url, "priority": priority}


def trio(primary: LlamaCppProcess, vllm: PeerServer, infinity: PeerServer) -> list[dict[str, Any]]:
    """llama.cpp first by priority: under the old rule it was the truth."""
    return [
        llamacpp_backend("llama", primary.url, priority=0),
        peer("vllm", "vllm", vllm.url, 1),
        peer("infinity", "infinity", infinity.url, 2),
    ]


def consistency(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/consistency", timeout=60).json()["data"][0]  # type: ignore[no-any-return]


def backends(url: str) -> dict[str, dict[str, Any]]:
    return {b["name"]: b for b in httpx.get(f"{url}/v1/backends", timeout=10).json()["data"]}


def served_by(url: str, texts: list[str]) -> str:
    r = httpx.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": texts}, timeout=60)
    assert r.status_code == 200, r.text
    return r.headers["x-embedding-backend"]


def test_the_majority_defines_the_space_and_llamacpp_is_restricted_on_two_scripts(
    primary: LlamaCppProcess, vllm: PeerServer, infinity: PeerServer
) -> None:
    with run_gateway(settings_for(trio(primary, vllm, infinity))) as gw:
        report = consistency(gw.url)
        assert report["reference"] == "vllm" and report["groups"][0] == ["vllm", "infinity"]
        verdicts = {b["name"]: b for b in report["backends"]}
        assert verdicts["vllm"]["verdict"] == "reference" and verdicts["infinity"]["verdict"] == "agree"
        llama = verdicts["llama"]
        assert llama["verdict"] == "restricted" and llama["excluded_scripts"] == ["Devanagari", "Hangul"]
        assert llama["per_group"]["Hangul"] < 0.9 and llama["per_group"]["Latin"] >= 0.9999
        kinds = {f["kind"]: f["message"] for f in report["findings"] if f["backend"] == "llama"}
        assert "was the reference, but vllm defines the space" in kinds["majority"]
        assert "tokenization differs on Hangul" in kinds["partial_disagreement"]
        assert "different_model" not in kinds
        view = backends(gw.url)["llama"]
        assert view["agreement"] == "restricted" and view["excluded_scripts"] == ["Devanagari", "Hangul"]
        # Korean (or Hindi in a batch) never reaches llama.cpp; English still does (it is first).
        # (vLLM first; the idle Infinity may take overflow)
        assert {served_by(gw.url, KOREAN) for _ in range(5)} <= {"vllm", "infinity"}
        assert served_by(gw.url, HINDI_AND_ENGLISH) in ("vllm", "infinity")
        assert served_by(gw.url, ENGLISH) == "llama"
        router = gw.runtime.service.router
        assert [st.backend.name for st in router._agreeing("minilm", router.members("minilm"), ENGLISH)] == [
            "llama",
            "vllm",
            "infinity",
        ]
        excluded = 'embedding_gateway_backend_excluded_script{backend="llama",model="minilm",script="Hangul"} 1.0'
        assert excluded in httpx.get(f"{gw.url}/metrics").text


def test_quarantine_instead_of_restriction(primary: LlamaCppProcess, vllm: PeerServer, infinity: PeerServer) -> None:
    settings = settings_for(
        trio(primary, vllm, infinity),
        [{"name": "minilm", "profile": "all-minilm-l6-v2", "on_partial_disagreement": "quarantine"}],
    )
    with run_gateway(settings) as gw:
        llama = next(b for b in consistency(gw.url)["backends"] if b["name"] == "llama")
        assert llama["verdict"] == "disagree" and llama["excluded_scripts"] == []
        assert served_by(gw.url, ENGLISH) == "vllm"


def test_pinned_space_from_vllm_restricts_llamacpp_and_quarantines_a_cls_pooled_one(
    tmp_path: Path, vllm: PeerServer, primary: LlamaCppProcess, llama_factory: Callable[..., LlamaCppProcess]
) -> None:
    space = record_space(tmp_path, peer("vllm", "vllm", vllm.url, 0))
    cls = llama_factory("cls-pooled", pooling="cls")
    backends_ = [llamacpp_backend("llama", primary.url), llamacpp_backend("cls", cls.url, priority=1)]
    settings = settings_for(backends_, [{"name": "minilm", "profile": "all-minilm-l6-v2", "space": str(space)}])
    with run_gateway(settings) as gw:
        report = consistency(gw.url)
        assert report["reference"].startswith("space minilm@")
        verdicts = {b["name"]: b for b in report["backends"]}
        assert verdicts["llama"]["verdict"] == "restricted"
        assert verdicts["llama"]["excluded_scripts"] == ["Devanagari", "Hangul"]
        assert verdicts["cls"]["verdict"] == "disagree"
        assert served_by(gw.url, ENGLISH) == "llama"
        # Nobody in service agrees with the space on Hangul: refused, naming the divergence.
        r = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "minilm", "input": KOREAN}, timeout=60)
        assert r.status_code == 503 and r.headers["retry-after"]
        assert "agrees with the model on Hangul text (llama disagrees on Hangul)" in r.json()["error"]["message"]
    cls.stop()


@pytest.mark.parametrize("order", ["vllm-first", "infinity-first"])
def test_vllm_and_infinity_alone_agree_whoever_is_first(order: str, vllm: PeerServer, infinity: PeerServer) -> None:
    pair = [peer("vllm", "vllm", vllm.url, 0), peer("infinity", "infinity", infinity.url, 0)]
    with run_gateway(settings_for(pair if order == "vllm-first" else pair[::-1])) as gw:
        report = consistency(gw.url)
        assert {b["verdict"] for b in report["backends"]} == {"reference", "agree"}
        assert all(b["min_cosine"] >= 0.99999 for b in report["backends"])


def test_vllm_only_and_infinity_only_gateways_report_one_space_id(
    tmp_path: Path, vllm: PeerServer, infinity: PeerServer
) -> None:
    """Their vectors differ in last bits (23 near-zero components flip sign): the id must not."""
    alone = [[peer("vllm", "vllm", vllm.url, 0)], [peer("infinity", "infinity", infinity.url, 0)]]

    def space_of(settings: dict[str, Any]) -> str:
        with run_gateway(settings) as gw:
            r = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "minilm", "input": "hello"}, timeout=60)
            assert r.status_code == 200, r.text
            return r.headers["x-embedding-space"]

    # Unpinned, one spaces directory (one machine, or replicas sharing Redis): the first agreement recorded.
    assert space_of(settings_for(alone[1])) == space_of(settings_for(alone[0]))
    # Pinned to one recording made on vLLM: both serve its id.
    space = record_space(tmp_path, alone[0][0])
    recorded = json.loads(space.read_text())["space_id"]
    for backends_ in alone:
        pinned = settings_for(backends_, [{"name": "minilm", "profile": "all-minilm-l6-v2", "space": str(space)}])
        assert space_of(pinned) == recorded


def test_space_record_from_several_backends_refuses_when_they_disagree(
    tmp_path: Path, primary: LlamaCppProcess, vllm: PeerServer, infinity: PeerServer
) -> None:
    config = tmp_path / "record.toml"
    lines = ["[[models]]", 'name = "minilm"', 'profile = "all-minilm-l6-v2"']
    for b in trio(primary, vllm, infinity):
        lines += ["[[backends]]"] + [f"{k} = {json.dumps(v)}" for k, v in b.items()]
    config.write_text("\n".join(lines) + "\n")

    def record(*backends: str) -> subprocess.CompletedProcess[str]:
        flags = [x for b in backends for x in ("--backend", b)]
        cmd = [sys.executable, "-m", "gateway.cli", "space", "record", "--config", str(config), "--model", "minilm"]
        return subprocess.run(
            [*cmd, *flags, "--out", str(tmp_path / "s.json")],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=Path(__file__).parents[1],
        )

    refused = record("vllm", "llama")
    assert refused.returncode == 1 and "vllm and llama disagree" in refused.stderr
    assert "sunset-ko" in refused.stderr and not (tmp_path / "s.json").exists()
    agreed = record("vllm", "infinity")
    assert agreed.returncode == 0, agreed.stderr
    assert json.loads((tmp_path / "s.json").read_text())["recorded"]["confirmed_by"] == ["infinity"]
