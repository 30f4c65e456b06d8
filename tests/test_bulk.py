"""`embedding-gateway embed` (issue 12, item 7): 10,000 lines, killed mid-run, resumed: every id exactly once,
no partial line, vectors equal to a direct call, bad lines named and skipped."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from backends.managed.process import LlamaCppProcess
from tests.helpers import cli_gateway, cosines, embed_url, llamacpp_backend, settings_for

ROOT = Path(__file__).parent.parent


def run_embed(url: str, inp: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "gateway.cli", "embed", "--url", url, "--model", "minilm"]
    cmd += ["--in", str(inp), "--out", str(out), "--batch", "64", "--concurrency", "3", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bulk_embed_killed_and_resumed(tmp_path: Path, primary: LlamaCppProcess) -> None:
    inp, out = tmp_path / "docs.jsonl", tmp_path / "vectors.jsonl"
    with inp.open("w") as f:
        for i in range(10_000):
            f.write(json.dumps({"id": f"doc-{i}", "text": f"document number {i}"}) + "\n")
            if i == 5000:
                f.write("{not json\n")  # a bad line: named and skipped
            if i == 7000:
                f.write(json.dumps({"id": "no-text"}) + "\n")
    with cli_gateway(settings_for([llamacpp_backend("llama", primary.url)])) as gw:
        first = run_embed(gw.url, inp, out)
        deadline = time.monotonic() + 120
        while (not out.exists() or out.stat().st_size < 2_000_000) and time.monotonic() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)  # no chance to finish a line or clean up
        first.wait()
        with out.open("ab") as f:
            f.write(b'{"id": "doc-partial", "embe')  # what a kill mid-write would leave behind
        second = run_embed(gw.url, inp, out)
        _, err = second.communicate(timeout=600)
        assert second.returncode == 0, err
        assert "resuming after" in err
        assert f"{inp}:5002: " in err and f"{inp}:7003: missing field 'text'" in err
        records = lines_of(out)
        ids = [r["id"] for r in records]
        assert len(ids) == len(set(ids)) == 10_000  # every id exactly once, no partial line
        assert ids == [f"doc-{i}" for i in range(10_000)]  # in input order
        assert {r["space_id"] for r in records} == {records[0]["space_id"]} and records[0]["space_id"]
        sample = [0, 1, 4999, 5000, 7001, 9999]
        direct = embed_url(gw.url, [f"document number {i}" for i in sample]).json()["data"]
        want = np.asarray([d["embedding"] for d in direct], dtype=np.float32)
        got = np.asarray([records[i]["embedding"] for i in sample], dtype=np.float32)
        assert cosines(got, want).min() > 0.9999
        # Run again: nothing left to do, nothing written twice.
        third = run_embed(gw.url, inp, out)
        third.communicate(timeout=120)
        assert third.returncode == 0 and len(lines_of(out)) == 10_000


def test_bulk_embed_strict_stops_at_the_first_bad_line(tmp_path: Path, primary: LlamaCppProcess) -> None:
    inp, out = tmp_path / "docs.jsonl", tmp_path / "vectors.jsonl"
    inp.write_text('{"id": 1, "text": "fine"}\n{"id": 2, "text": 5}\n{"id": 3, "text": "never"}\n')
    with cli_gateway(settings_for([llamacpp_backend("llama", primary.url)])) as gw:
        proc = run_embed(gw.url, inp, out, "--strict")
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and f"{inp}:2: " in err and "--strict" in err


def test_one_huge_line_is_named_and_skipped_and_the_rest_written(tmp_path: Path, primary: LlamaCppProcess) -> None:
    """Issue 17, item 6a: a 20 MB line made the gateway answer 413 for its batch, and the run stopped with 0
    lines written; the batch is now retried line by line like a 400."""
    inp, out = tmp_path / "docs.jsonl", tmp_path / "vectors.jsonl"
    with inp.open("w") as f:
        for i in range(60):
            text = "x " * 10_000_000 if i == 30 else f"document {i}"
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    with cli_gateway(settings_for([llamacpp_backend("llama", primary.url)])) as gw:
        proc = run_embed(gw.url, inp, out)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"{inp}:31: the gateway refused it (413)" in err
    assert [r["id"] for r in lines_of(out)] == [i for i in range(60) if i != 30]


def test_repeated_ids_are_reported_and_a_resume_goes_by_line_number(tmp_path: Path, primary: LlamaCppProcess) -> None:
    """Issue 17, item 6b: ids a,b,DUP,c,d,DUP,e,f cut after 6 lines were resumed after the *first* DUP, writing
    a,b,DUP,c,d,DUP,c,d,DUP,e,f."""
    ids = ["a", "b", "DUP", "c", "d", "DUP", "e", "f"]
    inp, out = tmp_path / "docs.jsonl", tmp_path / "vectors.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "text": f"text {n}"}) + "\n" for n, i in enumerate(ids)))
    with cli_gateway(settings_for([llamacpp_backend("llama", primary.url)])) as gw:
        first = run_embed(gw.url, inp, out, "--batch", "2")
        _, err = first.communicate(timeout=120)
        assert first.returncode == 0 and f'{inp}:6: id "DUP" repeats the id of line 3' in err
        out.write_text("".join(out.read_text().splitlines(keepends=True)[:6]))  # as if cut after 6 lines
        second = run_embed(gw.url, inp, out, "--batch", "2")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 0, err
        assert [r["id"] for r in lines_of(out)] == ids
        assert [r["line"] for r in lines_of(out)] == list(range(1, 9))
        strict = run_embed(gw.url, inp, tmp_path / "strict.jsonl", "--strict")
        _, err = strict.communicate(timeout=120)
        assert strict.returncode == 2 and "repeats the id of line 3" in err


def test_retries_are_bounded_and_the_run_fails_naming_why(tmp_path: Path) -> None:
    """Issue 17, item 6c: a gateway answering 503 was retried for 10 minutes with no end."""
    from backends.managed.process import free_port
    from tests.helpers import run_gateway

    inp, out = tmp_path / "docs.jsonl", tmp_path / "vectors.jsonl"
    inp.write_text(json.dumps({"id": 1, "text": "never served"}) + "\n")
    dead = llamacpp_backend("dead", f"http://127.0.0.1:{free_port()}")
    with run_gateway(settings_for([dead]), wait_ready=False) as gw:
        started = time.monotonic()
        proc = run_embed(gw.url, inp, out, "--max-retry-s", "3")
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "gave up after retrying a batch for 3s" in err and "HTTP 503" in err
    assert time.monotonic() - started < 60
