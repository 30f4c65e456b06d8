"""The parts every contract test server shares: raw ASGI plumbing, fault injection, the upstream."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs

import httpx
import numpy as np

from gateway.consistency.probes import probe_set
from tests.contracts import ContractViolation, check

FaultKind = Literal["latency", "status", "drop", "malformed", "wrong_count", "wrong_dimension", "nan"]


@dataclass
class Fault:
    """One injected misbehaviour of the next `times` embedding requests (-1: until cleared)."""

    kind: FaultKind
    status: int = 500
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    dimension: int = 0
    times: int = 1


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = "application/json"


@dataclass
class Incoming:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


class DropConnection(Exception):
    """Raised after a partial body: uvicorn then closes the socket mid-response."""


class ContractServer:
    """ASGI app base. Subclasses implement `route()`; embedding routes call `embed_upstream()`."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults: list[Fault] = []
        self.received: list[Incoming] = []
        self.violations: list[str] = []
        self.faults_hit_probes = False
        self._client: httpx.AsyncClient | None = None

    def _checked(self, validator: Any, payload: Any, what: str) -> None:
        """Validate against the contract; a violation is recorded (the fixture fails the test) and raised."""
        try:
            check(validator, payload, what)
        except ContractViolation as exc:
            self.violations.append(str(exc))
            raise

    # -- fault injection ------------------------------------------------------------------------
    def inject(self, fault: Fault) -> None:
        self.faults.append(dataclasses.replace(fault))  # a copy: tests share Fault constants

    def clear(self) -> None:
        self.faults.clear()

    def take_fault(self) -> Fault | None:
        if not self.faults:
            return None
        fault = self.faults[0]
        if fault.times > 0:
            fault.times -= 1
            if fault.times == 0:
                self.faults.pop(0)
        return fault

    # -- upstream (a real llama.cpp server) --------------------------------------------------------
    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.upstream, timeout=60)
        return self._client

    async def embed_upstream(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Raw (unnormalized) pooled vectors from llama.cpp, and its token count."""
        r = await self.client.post("/v1/embeddings", json={"input": texts, "embd_normalize": -1})
        r.raise_for_status()
        data = sorted(r.json()["data"], key=lambda d: d["index"])
        return np.asarray([d["embedding"] for d in data], dtype=np.float32), int(r.json()["usage"]["prompt_tokens"])

    async def count_tokens(self, text: str) -> int:
        r = await self.client.post("/tokenize", json={"content": text, "add_special": True})
        return len(r.json()["tokens"])

    async def truncate(self, text: str, max_tokens: int) -> str:
        r = await self.client.post("/tokenize", json={"content": text, "add_special": False})
        ids = r.json()["tokens"][: max(0, max_tokens - 2)]  # room for the model's special tokens
        d = await self.client.post("/detokenize", json={"tokens": ids})
        return str(d.json()["content"]).strip()

    # -- ASGI ------------------------------------------------------------------------------------
    async def route(self, req: Incoming) -> Reply:  # pragma: no cover - abstract
        raise NotImplementedError

    def fault_body(self, fault: Fault, good: Reply) -> Reply | None:
        """Turn a good embedding reply into a faulty one; None when the fault is not a body fault."""
        return None

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    if self._client is not None:
                        await self._client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        req = Incoming(scope["method"], scope["path"], parse_qs(scope["query_string"].decode()), headers, body)
        self.received.append(req)
        reply = await self.route(req)
        await self._send(send, reply)

    async def apply_fault(self, good: Callable[[], Awaitable[Reply]], req: Incoming | None = None) -> Reply:
        """Run an embedding handler under the next injected fault, if any.

        The gateway's own health and agreement probes are spared unless `faults_hit_probes` is set, so a
        one-shot fault meets the client request the test sends rather than a background probe.
        """
        if req is not None and not self.faults_hit_probes and is_probe(req.body):
            return await good()
        fault = self.take_fault()
        if fault is None:
            return await good()
        if fault.kind == "latency":
            await asyncio.sleep(fault.seconds)
            return await good()
        if fault.kind == "status":
            return Reply(
                fault.status,
                fault.body,
                fault.headers,
                "application/json" if fault.body.startswith((b"{", b"[")) else "text/plain",
            )
        reply = await good()
        if reply.status != 200:
            return reply
        if fault.kind == "drop":
            reply.headers["x-test-drop"] = "1"
            return reply
        if fault.kind == "malformed":
            return Reply(200, reply.body[: len(reply.body) // 2] + b"}}garbage")
        bad = self.fault_body(fault, reply)
        assert bad is not None, f"fault {fault.kind} not supported by {type(self).__name__}"
        return bad

    async def _send(self, send: Callable[[dict[str, Any]], Awaitable[None]], reply: Reply) -> None:
        headers = [(k.lower().encode(), v.encode()) for k, v in reply.headers.items() if k != "x-test-drop"]
        if reply.content_type:
            headers.append((b"content-type", reply.content_type.encode()))
        headers.append((b"content-length", str(len(reply.body)).encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        if reply.headers.get("x-test-drop"):
            await send({"type": "http.response.body", "body": reply.body[: len(reply.body) // 3], "more_body": True})
            raise DropConnection("connection dropped mid-body (injected)")
        await send({"type": "http.response.body", "body": reply.body})


def json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(payload).encode(), headers or {})


def nan_json(rows: list[list[float]]) -> list[list[float]]:
    rows = [list(r) for r in rows]
    rows[0][0] = math.nan  # serialized by json.dumps as the non-standard literal NaN
    return rows


PROBE_TEXT = "embedding-gateway health probe"
# Every batch of the agreement checker's probes holds one of these (gateway/consistency/probes.py).
# Every built-in probe long enough to be unmistakable (as it appears in a JSON body): a chunk of the
# checker's may hold none of the marks below.
_PROBE_MARKS = tuple(json.dumps(p.text, ensure_ascii=False)[1:-1] for p in probe_set(256) if len(p.text) >= 10)
_CHECKER_MARKS = (
    "A beautiful sunset over the beach",
    "Golden sunlight melts into the horizon",
    "The lighthouse keeper counted the ships",  # the probes at the model's token limit
)


def is_probe(body: bytes) -> bool:
    text = body.decode("utf-8", "replace")
    return any(m in text for m in (PROBE_TEXT, *_CHECKER_MARKS)) or any(m in text for m in _PROBE_MARKS)


def traffic(server: ContractServer, method: str = "POST") -> list[dict[str, Any]]:
    """JSON bodies the server received, leaving out the gateway's health and agreement probes."""
    return [json.loads(r.body) for r in server.received if r.method == method and r.body and not is_probe(r.body)]
