"""A TEI (text-embeddings-inference) stand-in, faithful to router/src/http/server.rs behaviour.

Routes: GET /health (public), GET /info, POST /embed, /tokenize, /v1/embeddings (Bearer auth when api_key
is set). Vectors come
from a real llama.cpp server; prompts, truncation, Matryoshka `dimensions` and normalization are
applied here the way TEI applies them (prompt before tokenization; normalize after truncating dims).
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tests.contracts import ContractViolation, tei
from tests.servers.base import ContractServer, Fault, Incoming, Reply, json_reply, nan_json

PAYLOAD_LIMIT = 2_000_000


@dataclass
class TeiConfig:
    model_id: str = "sentence-transformers/all-MiniLM-L6-v2"
    pooling: str = "mean"  # as /info reports it: cls | mean | splade | last_token
    prompts: dict[str, str] = field(default_factory=dict)  # config_sentence_transformers.json
    default_prompt: str | None = None  # --default-prompt / --default-prompt-name
    max_input_length: int = 256
    declared_max_input_length: int | None = None  # what /info says, when it lies (default: the real limit)
    silent_truncation: bool = False  # cut at max_input_length whatever the request says (as Infinity does)
    max_client_batch_size: int = 32
    auto_truncate: bool = True
    api_key: str | None = None
    basic_auth: str | None = None  # "user:password" a reverse proxy in front of TEI asks for (Basic auth)
    max_concurrent_requests: int = 512
    # Capacity (like a real server's compute): `slots` calls at once, each busy for `seconds_per_call` plus
    # `seconds_per_text` per text; calls beyond the slots queue inside the server. 0 slots: unlimited.
    slots: int = 0
    seconds_per_call: float = 0.0
    seconds_per_text: float = 0.0
    version: str = "1.9.3"  # >= 1.9 answers validation errors with 422, older with 413
    # A server whose vectors depend on what else is in the batch (padding effects, vLLM #15393): each vector
    # is pulled towards the batch's mean by this share when the batch holds several texts.
    batch_mixing: float = 0.0
    reject_text: str | None = None  # a call with an input containing this is refused (422 Validation)


class TeiServer(ContractServer):
    def __init__(self, upstream: str, config: TeiConfig | None = None) -> None:
        super().__init__(upstream)
        self.config = config or TeiConfig()
        self._slots: asyncio.Semaphore | None = None
        self.served_texts = 0
        self.contract = tei()
        self._embed_req = self.contract.request_validator("post", "/embed")
        self._embed_resp = self.contract.response_validator("post", "/embed", 200)
        self._error = self.contract.schema_validator("ErrorResponse")
        self._info = self.contract.schema_validator("Info")
        self._openai_req = self.contract.request_validator("post", "/v1/embeddings")
        self._tokenize_req = self.contract.request_validator("post", "/tokenize")
        self._tokenize_resp = self.contract.response_validator("post", "/tokenize", 200)
        self._openai_resp = self.contract.response_validator("post", "/v1/embeddings", 200)

    @property
    def validation_status(self) -> int:
        major, minor = (int(x) for x in self.config.version.split(".")[:2])
        return 422 if (major, minor) >= (1, 9) else 413

    def error(self, status: int, message: str, error_type: str) -> Reply:
        payload = {"error": message, "error_type": error_type}
        self._checked(self._error, payload, "error response")
        return json_reply(status, payload)

    async def route(self, req: Incoming) -> Reply:
        if req.method == "GET" and req.path in ("/health", "/", "/ping"):
            return Reply(200, b"", content_type=None)
        if self.config.api_key and req.headers.get("authorization") != f"Bearer {self.config.api_key}":
            return Reply(401, b"", content_type=None)  # TEI's auth middleware: bare 401
        basic = "Basic " + base64.b64encode((self.config.basic_auth or "").encode()).decode()
        if self.config.basic_auth and req.headers.get("authorization") != basic:
            return Reply(401, b"", content_type=None)
        if req.method == "GET" and req.path == "/info":
            return self.info()
        if req.method == "POST" and req.path == "/embed":
            return await self.apply_fault(lambda: self.embed(req), req)
        if req.method == "POST" and req.path == "/tokenize":
            return await self.tokenize(req)
        if req.method == "POST" and req.path in ("/v1/embeddings", "/embeddings"):
            return await self.apply_fault(lambda: self.openai_embed(req), req)
        return Reply(404, b"", content_type=None)

    def info(self) -> Reply:
        c = self.config
        payload = {
            "model_id": c.model_id,
            "model_sha": None,
            "model_dtype": "float32",
            "served_model_name": c.model_id,
            "model_type": {"embedding": {"pooling": c.pooling}},
            "max_concurrent_requests": self.config.max_concurrent_requests,
            "max_input_length": c.declared_max_input_length or c.max_input_length,
            "max_batch_tokens": 16384,
            "max_batch_requests": None,
            "max_client_batch_size": c.max_client_batch_size,
            "auto_truncate": c.auto_truncate,
            "tokenization_workers": 1,
            "version": c.version,
            "sha": None,
            "docker_label": None,
        }
        self._checked(self._info, payload, "/info response")
        return json_reply(200, payload)

    async def embed(self, req: Incoming) -> Reply:
        if len(req.body) > PAYLOAD_LIMIT:
            return Reply(413, b"Failed to buffer the request body: length limit exceeded", content_type="text/plain")
        if "application/json" not in req.headers.get("content-type", ""):
            return Reply(415, b"Expected request with `Content-Type: application/json`", content_type="text/plain")
        try:
            body = json.loads(req.body)
        except ValueError as exc:
            return Reply(400, f"Failed to parse the request body as JSON: {exc}".encode(), content_type="text/plain")
        if isinstance(body, dict) and body.get("inputs") == []:
            # serde takes [] as an empty batch; the OpenAPI `oneOf` is ambiguous for it (both arms match).
            return self.error(400, "`inputs` cannot be empty", "Empty")
        try:
            self._checked(self._embed_req, body, "/embed request")
        except ContractViolation as exc:
            return Reply(
                422,
                f"Failed to deserialize the JSON body into the target type: {exc}".encode(),
                content_type="text/plain",
            )
        inputs = body["inputs"]
        texts: list[Any] = [inputs] if isinstance(inputs, str) else inputs
        if not texts:
            return self.error(400, "`inputs` cannot be empty", "Empty")
        if not all(isinstance(t, str) for t in texts):
            self.violations.append("the gateway sent token ids; it must only send text")
            return self.error(self.validation_status, "token ids are not supported by this test server", "Validation")
        c = self.config
        if len(texts) > c.max_client_batch_size:
            msg = f"batch size {len(texts)} > maximum allowed batch size {c.max_client_batch_size}"
            return self.error(self.validation_status, msg, "Validation")
        prompt_name = body.get("prompt_name")
        if prompt_name is not None:
            if prompt_name not in c.prompts:
                msg = (
                    f"Input validation error: `default-prompt-name` is set to `{prompt_name}` but it was not found "
                    f"in the Sentence Transformers prompts. Available prompts: {list(c.prompts)}"
                )
                return self.error(self.validation_status, msg, "Validation")
            prefix = c.prompts[prompt_name]
        else:
            prefix = c.default_prompt or ""
        if any(t == "" for t in texts):
            return self.error(400, "Input validation error: `inputs` cannot be empty", "Empty")
        truncate = body.get("truncate")
        truncate = c.auto_truncate if truncate is None else truncate
        truncate = truncate or c.silent_truncation
        prompted = [prefix + t for t in texts]
        for i, text in enumerate(prompted):
            n = await self.count_tokens(text)
            if n > c.max_input_length:
                if not truncate:
                    msg = (
                        f"Input validation error: `inputs` must have less than {c.max_input_length} tokens. Given: {n}"
                    )
                    return self.error(self.validation_status, msg, "Validation")
                prompted[i] = await self.truncate(text, c.max_input_length)
        if c.reject_text is not None and any(c.reject_text in t for t in texts):
            return self.error(self.validation_status, "Input validation error: unsupported input", "Validation")
        await self.compute(len(prompted))
        raw, tokens = await self.embed_upstream(prompted)
        if c.batch_mixing and len(prompted) > 1:
            unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
            raw = (1 - c.batch_mixing) * unit + c.batch_mixing * unit.mean(axis=0)
        dims = body.get("dimensions")
        if dims is not None:
            if dims <= 0:
                return self.error(422, "`dimensions` should be positive", "Validation")
            if dims > raw.shape[1]:
                return self.error(
                    422, "`dimensions` should be smaller than the maximum embedding dimension.", "Validation"
                )
            raw = raw[:, :dims]
        if body.get("normalize", True):
            raw = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        rows = raw.tolist()
        self._checked(self._embed_resp, rows, "/embed response")
        return json_reply(200, rows, {"x-compute-tokens": str(tokens), "x-compute-type": "cpu"})

    async def tokenize(self, req: Incoming) -> Reply:
        """POST /tokenize: the upstream's tokens in TEI's shape (one list of tokens per input)."""
        try:
            body = json.loads(req.body)
            self._checked(self._tokenize_req, body, "/tokenize request")
        except (ValueError, ContractViolation) as exc:
            return self.error(self.validation_status, f"Failed to deserialize the JSON body: {exc}", "Validation")
        texts = [body["inputs"]] if isinstance(body["inputs"], str) else body["inputs"]
        special = body.get("add_special_tokens", True)
        rows = []
        for text in texts:
            r = await self.client.post("/tokenize", json={"content": text, "add_special": special, "with_pieces": True})
            rows.append(
                [
                    {"id": t["id"], "text": t["piece"] if isinstance(t["piece"], str) else "", "special": False}
                    for t in r.json()["tokens"]
                ]
            )
        self._checked(self._tokenize_resp, rows, "/tokenize response")
        return json_reply(200, rows)

    async def compute(self, texts: int) -> None:
        """Hold one of the server's slots for as long as `texts` texts take (queueing inside, as TEI does)."""
        c = self.config
        if not c.slots:
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(c.slots)
        async with self._slots:
            await asyncio.sleep(c.seconds_per_call + c.seconds_per_text * texts)
            self.served_texts += texts

    async def openai_embed(self, req: Incoming) -> Reply:
        """TEI's OpenAI route: no prompt_name (default prompt only), always normalized, and truncation
        as `auto_truncate` says — a client cannot turn it off here."""
        try:
            body = json.loads(req.body)
            self._checked(self._openai_req, body, "/v1/embeddings request")
        except (ValueError, ContractViolation) as exc:
            return Reply(
                422,
                f"Failed to deserialize the JSON body into the target type: {exc}".encode(),
                content_type="text/plain",
            )
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        c = self.config
        prompted = [(c.default_prompt or "") + t for t in texts]
        for i, text in enumerate(prompted):
            if await self.count_tokens(text) > c.max_input_length:
                if not c.auto_truncate:
                    return json_reply(
                        self.validation_status,
                        {
                            "message": "Input validation error: too long",
                            "code": self.validation_status,
                            "type": "Validation",
                        },
                    )
                prompted[i] = await self.truncate(text, c.max_input_length)
        raw, tokens = await self.embed_upstream(prompted)
        unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        if body.get("encoding_format") == "base64":
            import base64

            items: list[Any] = [base64.b64encode(r.astype("<f4").tobytes()).decode() for r in unit]
        else:
            items = unit.tolist()
        payload = {
            "object": "list",
            "model": c.model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(items)],
        }
        self._checked(self._openai_resp, payload, "/v1/embeddings response")
        return json_reply(200, payload)

    def fault_body(self, fault: Fault, good: Reply) -> Reply | None:
        rows = json.loads(good.body)
        if fault.kind == "wrong_count":
            return json_reply(200, rows[:-1] if len(rows) > 1 else rows * 2)
        if fault.kind == "wrong_dimension":
            return json_reply(200, [r[: fault.dimension] for r in rows])
        if fault.kind == "nan":
            return json_reply(200, nan_json(rows))
        return None
