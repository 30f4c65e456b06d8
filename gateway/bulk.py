"""`embedding-gateway embed`: embed a JSONL file of documents through a gateway, resumably.

- Memory stays bounded whatever the file's size: lines are read as they are needed, at most
  `concurrency` batches are in flight, and finished batches are written in input order.
- Written in input order, one batch per write: the output is always a prefix of the (valid) input. Each
  output line records its input line number (`line`), so a re-run resumes after the last line written
  (not by looking its id up: ids can repeat), and a trailing partial line (a killed run) is cut off first.
  Ids that repeat are reported (`--strict`: stop), never silently merged.
- 429/503 and connection failures are retried, honouring Retry-After, for at most `--max-retry-s` per
  batch; then the run stops with exit 2 naming what failed. A batch the gateway refuses (400, or 413 for
  a body over its limit) is retried line by line so the bad line is named (line number and why) and
  skipped, as are lines that are not JSON objects with a string text; `--strict` stops at the first bad
  line instead.
- Every output line records the embedding space (`space_id`, from x-embedding-space); a resumed run
  whose gateway now serves another space stops: mixing the two in one index is the failure this
  gateway exists to prevent.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

_RETRY_STATUSES = {429, 502, 503, 504}
_REFUSED = {400, 413}  # the input itself: split the batch to find the line, never retry as it is
_MAX_WAIT_S = 60.0


class BulkError(Exception):
    """Stops the run with a message (exit code 2)."""


@dataclass
class Doc:
    line: int
    id: Any
    text: str


@dataclass
class Stats:
    total_lines: int
    done: int = 0
    skipped: int = 0
    bad: int = 0
    duplicates: int = 0
    started: float = field(default_factory=time.monotonic)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("embed", help="embed a JSONL file through a gateway (resumable)")
    p.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8080")
    p.add_argument("--model", required=True)
    p.add_argument("--in", dest="inp", required=True, help="JSONL input, one document per line")
    p.add_argument("--out", required=True, help="JSONL output: {id, embedding, space_id} per line")
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--dimensions", type=int)
    p.add_argument("--prompt-name")
    p.add_argument(
        "--api-key", default=os.environ.get("EMBEDDING_GATEWAY_API_KEY"), help="or $EMBEDDING_GATEWAY_API_KEY"
    )
    p.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per batch request")
    p.add_argument(
        "--max-retry-s",
        type=float,
        default=300.0,
        help="give up (exit 2) when one batch has been retried for this long (429/503, connection errors)",
    )
    p.set_defaults(func=cmd_embed)


def cmd_embed(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.concurrency < 1:
        print("embedding-gateway embed: --batch and --concurrency must be at least 1", file=sys.stderr)
        return 2
    try:
        return asyncio.run(Bulk(args).run())
    except BulkError as exc:
        print(f"\nembedding-gateway embed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130


def _count_lines(path: Path) -> int:
    n = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n


@dataclass(frozen=True)
class Resume:
    line: int | None  # the input line of the last record written (files written before `line` existed: None)
    id: str | None  # its id as JSON text
    space: str | None
    written: int


def resume_point(out: Path) -> Resume:
    """Cut a partial last line; where the output ends."""
    if not out.exists():
        return Resume(None, None, None, 0)
    with out.open("rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return Resume(None, None, None, 0)
        # Walk back to the last newline: anything after it is a line a killed run did not finish.
        pos = size
        tail = b""
        while pos > 0 and b"\n" not in tail:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
        end = pos + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        if end != size:
            f.truncate(end)
        if end == 0:
            return Resume(None, None, None, 0)
        # The last complete line.
        f.seek(max(0, end - (1 << 20)))
        last = f.read(end - max(0, end - (1 << 20))).rstrip(b"\n").rsplit(b"\n", 1)[-1]
    record = json.loads(last)
    return Resume(record.get("line"), json.dumps(record["id"]), record.get("space_id"), _count_lines(out))


class Bulk:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.inp = Path(args.inp)
        self.out = Path(args.out)
        if not self.inp.is_file():
            raise BulkError(f"--in {self.inp}: no such file")
        self.space: str | None = None
        self.stats = Stats(_count_lines(self.inp))
        self._last_progress = 0.0

    def docs(self, resume: Resume) -> Iterator[Doc]:
        """Valid documents after the resume point; bad lines and repeated ids reported (or fatal with --strict)."""
        after_id = resume.id if resume.line is None else None  # only for output written without line numbers
        skipping = resume.line is not None or after_id is not None
        first_seen: dict[int, int] = {}  # hash of the id's JSON -> its first line (bounded: 2 ints per line)
        with self.inp.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                    doc_id = obj[self.args.id_field]
                    text = obj[self.args.text_field]
                    if not isinstance(obj, dict) or not isinstance(text, str):
                        raise TypeError(f"field {self.args.text_field!r} is not a string")
                except (ValueError, KeyError, TypeError) as exc:
                    if skipping:
                        continue
                    why = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
                    self.bad_line(number, why)
                    continue
                as_json = json.dumps(doc_id)
                seen_at = first_seen.setdefault(hash(as_json), number)
                if seen_at != number and not skipping:
                    self.duplicate(number, as_json, seen_at)
                if skipping:
                    self.stats.skipped += 1
                    if number == resume.line or (resume.line is None and as_json == after_id):
                        skipping = False
                    continue
                yield Doc(number, doc_id, text)
        if skipping:
            where = f"line {resume.line}" if resume.line is not None else f"id {after_id}"
            raise BulkError(f"the last record in {self.out} ({where}) is not in {self.inp}: is it the same input?")

    def duplicate(self, number: int, doc_id: str, first: int) -> None:
        self.stats.duplicates += 1
        message = f"{self.inp}:{number}: id {doc_id[:100]} repeats the id of line {first}"
        if self.args.strict:
            raise BulkError(f"{message} (--strict)")
        print(f"\nwarning: {message}; both are written", file=sys.stderr)

    def bad_line(self, number: int, why: str) -> None:
        self.stats.bad += 1
        message = f"{self.inp}:{number}: {why}"
        if self.args.strict:
            raise BulkError(f"{message} (--strict)")
        print(f"\nskipped {message}", file=sys.stderr)

    async def run(self) -> int:
        resume = resume_point(self.out)
        self.space = resume.space
        if resume.written:
            where = f"input line {resume.line}" if resume.line is not None else f"id {resume.id}"
            print(f"resuming after {resume.written} lines already in {self.out} ({where})", file=sys.stderr)
        headers = {"Authorization": f"Bearer {self.args.api_key}"} if self.args.api_key else {}
        limits = httpx.Limits(max_connections=self.args.concurrency)
        async with httpx.AsyncClient(
            base_url=self.args.url, headers=headers, timeout=self.args.timeout, limits=limits
        ) as http:
            with self.out.open("ab") as out:
                await self._pipeline(http, out, resume)
        self.progress(final=True)
        if self.stats.duplicates:
            print(f"{self.stats.duplicates} lines repeat an earlier id (see the warnings above)", file=sys.stderr)
        return 1 if self.stats.bad and self.args.strict else 0

    async def _pipeline(self, http: httpx.AsyncClient, out: Any, resume: Resume) -> None:
        batches = _batched(self.docs(resume), self.args.batch)
        pending: dict[int, asyncio.Task[list[bytes]]] = {}
        next_to_write = 0
        number = 0
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.args.concurrency:
                batch = next(batches, None)
                if batch is None:
                    exhausted = True
                    break
                pending[number] = asyncio.create_task(self._embed_batch(http, batch))
                number += 1
            if next_to_write not in pending:
                break
            try:
                lines = await pending.pop(next_to_write)
            except BaseException:
                for task in pending.values():
                    task.cancel()
                raise
            if lines:
                out.write(b"".join(lines))  # one write per batch: a kill leaves at most one partial line
                out.flush()
            self.stats.done += len(lines)
            next_to_write += 1
            self.progress()

    async def _embed_batch(self, http: httpx.AsyncClient, batch: list[Doc]) -> list[bytes]:
        status, payload = await self._post(http, [d.text for d in batch])
        if status in _REFUSED and len(batch) > 1:  # find the bad line(s): one request per line
            lines: list[bytes] = []
            for doc in batch:
                lines += await self._embed_batch(http, [doc])
            return lines
        if status in _REFUSED:
            self.bad_line(batch[0].line, f"the gateway refused it ({status}): {payload}")
            return []
        return [
            orjson.dumps(
                {"id": d.id, "embedding": v, "space_id": self.space, "line": d.line}, option=orjson.OPT_SERIALIZE_NUMPY
            )
            + b"\n"
            for d, v in zip(batch, payload, strict=True)
        ]

    async def _post(self, http: httpx.AsyncClient, texts: list[str]) -> tuple[int, Any]:
        body: dict[str, Any] = {"model": self.args.model, "input": texts, "encoding_format": "base64"}
        if self.args.dimensions:
            body["dimensions"] = self.args.dimensions
        if self.args.prompt_name:
            body["prompt_name"] = self.args.prompt_name
        delay = 0.5
        give_up_at = None
        while True:
            try:
                r = await http.post("/v1/embeddings", json=body)
            except httpx.TransportError as exc:
                wait, why = delay, f"{type(exc).__name__}"
            else:
                if r.status_code == 200:
                    return 200, self._vectors(r, len(texts))
                message = _error_message(r)
                if r.status_code not in _RETRY_STATUSES:
                    if r.status_code in _REFUSED:
                        return r.status_code, message
                    raise BulkError(f"the gateway answered {r.status_code}: {message}")
                wait = _retry_after(r.headers.get("retry-after"), delay)
                why = f"HTTP {r.status_code} ({message[:200]})"
            now = time.monotonic()
            give_up_at = give_up_at or now + self.args.max_retry_s
            if now + wait > give_up_at:
                raise BulkError(
                    f"gave up after retrying a batch for {self.args.max_retry_s:.0f}s (--max-retry-s): last answer "
                    f"{why}; run the same command again to resume"
                )
            print(f"\n{why}: retrying in {wait:.1f}s", file=sys.stderr)
            await asyncio.sleep(wait)
            delay = min(delay * 2, _MAX_WAIT_S)

    def _vectors(self, r: httpx.Response, n: int) -> list[np.ndarray]:
        space = r.headers.get("x-embedding-space")
        if self.space is None:
            self.space = space
        elif space is not None and space != self.space:
            raise BulkError(
                f"the gateway now serves embedding space {space}, but {self.out} holds vectors of {self.space}: "
                "vectors of two spaces must never share an index. Write to a new file (and re-embed everything), "
                "or roll the backends back"
            )
        data = r.json()["data"]
        if len(data) != n:
            raise BulkError(f"the gateway returned {len(data)} vectors for {n} texts")
        return [
            np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in sorted(data, key=lambda d: d["index"])
        ]

    def progress(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last_progress < 0.5:
            return
        self._last_progress = now
        s = self.stats
        elapsed = max(1e-9, now - s.started)
        rate = s.done / elapsed
        left = max(0, s.total_lines - s.skipped - s.bad - s.done)
        eta = f"{left / rate:.0f}s" if rate > 0 and not final else "-"
        print(
            f"\r{s.done + s.skipped}/{s.total_lines} lines  {rate:.0f} texts/s  ETA {eta}  bad {s.bad}   ",
            end="\n" if final else "",
            file=sys.stderr,
            flush=True,
        )


def _batched(docs: Iterator[Doc], size: int) -> Iterator[list[Doc]]:
    batch: list[Doc] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _retry_after(value: str | None, default: float) -> float:
    try:
        return min(_MAX_WAIT_S, max(0.0, float(value))) if value else default
    except ValueError:
        return default


def _error_message(r: httpx.Response) -> str:
    try:
        body = r.json()
        err = body.get("error")
        return str(err.get("message") if isinstance(err, dict) else err)
    except (ValueError, AttributeError):
        return r.text[:300]
