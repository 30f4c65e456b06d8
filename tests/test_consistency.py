"""The agreement checker on real llama.cpp servers (MiniLM GGUF: f16, q8_0, other poolings, perturbed
weights) and the TEI / Elasticsearch test servers over them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.managed.process import LlamaCppProcess, free_port
from tests.helpers import MINILM_MRL, RunningGateway, embed, llamacpp_backend, run_gateway, settings_for
from tests.servers.base import Fault
from tests.servers.elastic import ElasticServer
from tests.servers.tei import TeiServer

Factory = Callable[..., LlamaCppProcess]
PROMPTS = {"query": "query: ", "document": "passage: "}


def report_for(gw: RunningGateway, model: str) -> dict[str, Any]:
    r = httpx.post(f"{gw.url}/v1/consistency", params={"model": model}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["data"][0]  # type: ignore[no-any-return]


def verdicts(report: dict[str, Any]) -> dict[str, str]:
    return {b["name"]: b["verdict"] for b in report["backends"]}


def findings(report: dict[str, Any], backend: str) -> list[dict[str, str]]:
    return [f for f in report["findings"] if f["backend"] == backend]


def test_f16_vs_q8_agree_without_false_alarm(
    llama_factory: Factory, primary: LlamaCppProcess, variants: dict[str, Path]
) -> None:
    q8 = llama_factory("q8", gguf=variants["q8"])
    backends = [llamacpp_backend("f16", primary.url), llamacpp_backend("q8", q8.url, priority=1)]
    with run_gateway(settings_for(backends)) as gw:
        report = report_for(gw, "minilm")
        assert verdicts(report)["f16"] == "reference"
        assert verdicts(report)["q8"] in ("agree", "drift")
        assert all(f["severity"] != "error" for f in report["findings"]), report["findings"]
        assert {f["kind"] for f in report["findings"]} <= {"precision_drift", "input_limit"}
        # q8 vs f16: ~0.9985 on the probes of [UNK]s (emoji, Thai), above 0.9995 elsewhere
        assert report["agree"] is True and 0.998 <= report["matrix"]["min_cosine"][0][1] < 1.0
        per_probe = report["backends"][1]["per_probe"]
        assert {"sunset-en", "sunset-ja", "unicode", "near-limit"} <= set(per_probe)
        assert min(per_probe.values()) == report["backends"][1]["min_cosine"]
        # both serve: the compatible set holds both
        listed = {b["name"]: b for b in httpx.get(f"{gw.url}/v1/backends").json()["data"]}
        assert listed["q8"]["agreement"] in ("agree", "drift")
    q8.stop()


def test_pooling_mismatch_is_named(llama_factory: Factory, primary: LlamaCppProcess, minilm_gguf: Path) -> None:
    cls, last = llama_factory("cls", pooling="cls"), llama_factory("last", pooling="last")
    backends = [
        llamacpp_backend("mean", primary.url),
        llamacpp_backend("cls", cls.url, priority=1),
        llamacpp_backend("last", last.url, priority=2),
    ]
    models = [{"name": "minilm", "profile": "all-minilm-l6-v2", "reference_gguf": str(minilm_gguf)}]
    with run_gateway(settings_for(backends, models)) as gw:
        report = report_for(gw, "minilm")
        assert verdicts(report) == {"mean": "reference", "cls": "disagree", "last": "disagree"}
        for name in ("cls", "last"):
            (finding,) = findings(report, name)
            assert finding["kind"] == "pooling" and f"pools with '{name}'" in finding["message"]
            assert "--pooling mean" in finding["message"]
        ready = httpx.get(f"{gw.url}/ready").json()
        assert sorted(ready["quarantined"]) == ["cls", "last"]
    cls.stop()
    last.stop()


def test_different_weights_same_dimension_is_a_different_model(
    llama_factory: Factory, primary: LlamaCppProcess, variants: dict[str, Path], minilm_gguf: Path
) -> None:
    other = llama_factory("perturbed", gguf=variants["perturbed"])
    backends = [llamacpp_backend("real", primary.url), llamacpp_backend("impostor", other.url, priority=1)]
    models = [{"name": "minilm", "profile": "all-minilm-l6-v2", "reference_gguf": str(minilm_gguf)}]
    with run_gateway(settings_for(backends, models)) as gw:
        report = report_for(gw, "minilm")
    assert verdicts(report)["impostor"] == "disagree"
    (finding,) = findings(report, "impostor")
    assert finding["kind"] == "different_model" and "same dimension" in finding["message"]
    other.stop()


def test_prompt_doubled_by_tei_and_missing_on_eis(
    primary: LlamaCppProcess,
    tei_factory: Callable[..., tuple[str, TeiServer]],
    es_factory: Callable[..., tuple[str, ElasticServer]],
) -> None:
    # TEI started with a default prompt while the gateway (prompt_mode = "gateway") adds one too.
    tei_url, _ = tei_factory(prompts=PROMPTS, default_prompt="passage: ")
    # An inference endpoint that does not apply any prompt, although EIS is expected to.
    es_url, _ = es_factory(prompts={})
    backends = [
        llamacpp_backend("llama", primary.url, "minilm-mrl"),
        {"name": "tei", "kind": "tei", "model": "minilm-mrl", "url": tei_url, "priority": 1},
        {
            "name": "eis",
            "kind": "elastic",
            "model": "minilm-mrl",
            "url": es_url,
            "inference_id": "eis-minilm",
            "priority": 2,
        },
    ]
    with run_gateway(settings_for(backends, [MINILM_MRL])) as gw:
        report = report_for(gw, "minilm-mrl")
        assert verdicts(report) == {"llama": "reference", "tei": "disagree", "eis": "disagree"}
        (doubled,) = findings(report, "tei")
        assert doubled["kind"] == "prompt_doubled" and "--default-prompt" in doubled["message"]
        (missing,) = findings(report, "eis")
        assert missing["kind"] == "prompt_missing" and "input_type" in missing["message"]


def test_prompt_mode_backend_with_the_right_prompts_agrees(
    primary: LlamaCppProcess, tei_factory: Callable[..., tuple[str, TeiServer]]
) -> None:
    tei_url, _ = tei_factory(prompts=PROMPTS)
    backends = [
        llamacpp_backend("llama", primary.url, "minilm-mrl"),
        {"name": "tei", "kind": "tei", "model": "minilm-mrl", "url": tei_url, "priority": 1, "prompt_mode": "backend"},
    ]
    with run_gateway(settings_for(backends, [MINILM_MRL])) as gw:
        report = report_for(gw, "minilm-mrl")
    assert verdicts(report)["tei"] in ("agree", "drift"), report["findings"]


def test_dimension_mismatch(primary: LlamaCppProcess, tei_factory: Callable[..., tuple[str, TeiServer]]) -> None:
    url, server = tei_factory()
    server.faults_hit_probes = True
    server.inject(Fault("wrong_dimension", dimension=256, times=-1))
    backends = [
        llamacpp_backend("llama", primary.url),
        {"name": "tei", "kind": "tei", "model": "minilm", "url": url, "priority": 1},
    ]
    with run_gateway(settings_for(backends)) as gw:
        report = report_for(gw, "minilm")
    assert verdicts(report)["tei"] == "disagree"
    assert any(f["kind"] == "dimension" and "256" in f["message"] for f in findings(report, "tei"))


def test_truncation_difference(primary: LlamaCppProcess, tei_factory: Callable[..., tuple[str, TeiServer]]) -> None:
    """TEI's OpenAI route always auto-truncates: long inputs come back embedded, but cut."""
    url, _ = tei_factory(max_input_length=64, auto_truncate=True)
    backends = [
        llamacpp_backend("llama", primary.url),
        {
            "name": "tei-openai",
            "kind": "openai",
            "model": "minilm",
            "url": url,
            "priority": 1,
            "remote_model": "sentence-transformers/all-MiniLM-L6-v2",
        },
    ]
    with run_gateway(settings_for(backends)) as gw:
        report = report_for(gw, "minilm")
    assert verdicts(report)["tei-openai"] == "disagree"
    (finding,) = findings(report, "tei-openai")
    assert finding["kind"] == "truncation" and "long" in finding["message"]


def test_quarantined_backend_gets_no_traffic_even_when_the_reference_fails(
    llama_factory: Factory, minilm_gguf: Path
) -> None:
    reference, wrong = llama_factory("ref"), llama_factory("wrong", pooling="cls")
    backends = [llamacpp_backend("ref", reference.url), llamacpp_backend("wrong", wrong.url, priority=1)]
    with run_gateway(settings_for(backends)) as gw:
        assert embed(gw, "minilm", "x").headers["x-embedding-backend"] == "ref"
        entry = {b["name"]: b for b in httpx.get(f"{gw.url}/v1/backends").json()["data"]}["wrong"]
        assert entry["agreement"] == "disagree" and entry["agreement_detail"]
        reference.kill()  # a fallback-worthy failure on the reference
        for _ in range(5):
            r = embed(gw, "minilm", "still no mixing")
            assert r.status_code == 503  # never served by the disagreeing backend
        entries = {b["name"]: b for b in httpx.get(f"{gw.url}/v1/backends").json()["data"]}
        assert entries["wrong"]["requests"] == 0 and entries["wrong"]["agreement"] == "disagree"
        # the disagreeing backend did not become the reference
        report = httpx.get(f"{gw.url}/v1/consistency").json()["data"][0]
        assert report["reference"] in ("ref", None)
        reference.start()
        reference.wait_ready()
        wait = __import__("time").monotonic() + 20
        while embed(gw, "minilm", "back").status_code != 200:
            assert __import__("time").monotonic() < wait
        assert embed(gw, "minilm", "back").headers["x-embedding-backend"] == "ref"
    wrong.stop()


# -- the CLI deploy gate ---------------------------------------------------------------------------


def write_config(tmp: Path, backends: list[dict[str, Any]], gguf: Path | None = None) -> Path:
    lines = ["[[models]]", 'name = "minilm"', 'profile = "all-minilm-l6-v2"']
    if gguf:
        lines.append(f'reference_gguf = "{gguf}"')
    for b in backends:
        lines.append("[[backends]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in b.items()]
    path = tmp / "check.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_check(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=Path(__file__).parents[1],
    )


@pytest.fixture(scope="module")
def trio(llama_factory: Factory, variants: dict[str, Path]) -> Iterator[dict[str, LlamaCppProcess]]:
    servers = {"q8": llama_factory("gate-q8", gguf=variants["q8"]), "last": llama_factory("gate-last", pooling="last")}
    yield servers
    for s in servers.values():
        s.stop()


def test_cli_check_two_agree_one_misconfigured_exits_1(
    tmp_path: Path, primary: LlamaCppProcess, trio: dict[str, LlamaCppProcess], minilm_gguf: Path
) -> None:
    config = write_config(
        tmp_path,
        [
            llamacpp_backend("llama-f16", primary.url, priority=0),
            llamacpp_backend("llama-q8", trio["q8"].url, priority=1),
            llamacpp_backend("llama-last", trio["last"].url, priority=2),
        ],
        minilm_gguf,
    )
    r = run_check(config)
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert "llama-f16" in out and "llama-q8" in out and "llama-last" in out
    assert out.count("\n") > 8 and "REFERENCE" in out and "DISAGREE" in out
    assert "pooling: pools with 'last'" in out and "Traceback" not in r.stderr
    j = run_check(config, "--json")
    assert j.returncode == 1
    body = json.loads(j.stdout)
    assert body["result"] == "disagree"
    report = body["models"][0]
    assert len(report["matrix"]["min_cosine"]) == 3 and report["matrix"]["backends"][0] == "llama-f16"


def test_cli_check_exit_codes_0_and_2(
    tmp_path: Path, primary: LlamaCppProcess, trio: dict[str, LlamaCppProcess]
) -> None:
    agree = write_config(
        tmp_path, [llamacpp_backend("a", primary.url), llamacpp_backend("b", trio["q8"].url, priority=1)]
    )
    assert run_check(agree).returncode == 0
    dead = write_config(
        tmp_path,
        [llamacpp_backend("a", primary.url), llamacpp_backend("gone", f"http://127.0.0.1:{free_port()}", priority=1)],
    )
    r = run_check(dead, "--wait", "1")
    assert r.returncode == 2 and "could not be checked" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[[models]]\nname = 1\n")
    r = run_check(bad)
    assert r.returncode == 2 and "models[0].name" in r.stderr


def test_cli_check_gives_its_verdict_on_a_busy_machine(
    tmp_path: Path,
    primary: LlamaCppProcess,
    trio: dict[str, LlamaCppProcess],
    llama_factory: Factory,
    variants: dict[str, Path],
) -> None:
    """Busy loops on every core: still 1 on perturbed weights and 0 on q8_0, never 2 ("could not be checked")."""
    perturbed = llama_factory("gate-perturbed", gguf=variants["perturbed"])
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        disagree = write_config(
            tmp_path, [llamacpp_backend("a", primary.url), llamacpp_backend("odd", perturbed.url, priority=1)]
        )
        r = run_check(disagree)
        assert r.returncode == 1, r.stdout + r.stderr
        agree = write_config(
            tmp_path, [llamacpp_backend("a", primary.url), llamacpp_backend("q8", trio["q8"].url, priority=1)]
        )
        r = run_check(agree)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        for p in busy:
            p.kill()
            p.wait()
        perturbed.stop()


def test_static_metadata_mismatch_is_reported_but_vectors_decide(
    primary: LlamaCppProcess, tei_factory: Callable[..., tuple[str, TeiServer]]
) -> None:
    url, _ = tei_factory(pooling="cls", max_input_length=128)  # what /info says; its vectors are mean-pooled
    backends = [
        llamacpp_backend("llama", primary.url),
        {"name": "tei", "kind": "tei", "model": "minilm", "url": url, "priority": 1},
    ]
    with run_gateway(settings_for(backends)) as gw:
        report = report_for(gw, "minilm")
    assert verdicts(report)["tei"] in ("agree", "drift")
    kinds = {f["kind"]: f for f in findings(report, "tei")}
    assert kinds["pooling"]["severity"] == "warning" and "reports pooling 'cls'" in kinds["pooling"]["message"]
    assert kinds["input_limit"]["severity"] == "info" and "128" in kinds["input_limit"]["message"]
