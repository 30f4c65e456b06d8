"""An Elasticsearch inference-API stand-in (POST/GET _inference), for the official Python client.

Faithful to the spec subset in tests/contracts and research §3: strict request parser (unknown fields
400), `input_type` values, ES error bodies, `X-Elastic-Product: Elasticsearch` on every response (the
client refuses servers without it), ApiKey auth with WWW-Authenticate on 401. Like EIS, the server
applies the model's prompt itself according to `input_type`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np

from tests.contracts import ContractViolation, elasticsearch
from tests.servers.base import ContractServer, Fault, Incoming, Reply, json_reply, nan_json

INPUT_TYPES = ("search", "ingest", "classification", "clustering")
_TEXT_EMBEDDING = re.compile(r"^/_inference/(?:(?P<task>[^/]+)/)?(?P<id>[^/_][^/]*)$")


@dataclass
class ElasticConfig:
    inference_id: str = "eis-minilm"
    model_id: str = "all-minilm-l6-v2"
    service: str = "elastic"
    dimensions: int = 384
    similarity: str = "cosine"
    api_key: str | None = None  # the encoded key: clients send "Authorization: ApiKey <key>"
    prompts: dict[str, str] = field(default_factory=dict)  # input_type -> prefix EIS applies


class ElasticServer(ContractServer):
    def __init__(self, upstream: str, config: ElasticConfig | None = None) -> None:
        super().__init__(upstream)
        self.config = config or ElasticConfig()
        self.contract = elasticsearch()
        self._req = self.contract.request_validator("post", "/_inference/text_embedding/{inference_id}")
        self._resp = self.contract.response_validator("post", "/_inference/text_embedding/{inference_id}", 200)
        self._error = self.contract.schema_validator("_types.ErrorResponseBase")
        self._get = self.contract._validator(
            self.contract.doc["components"]["responses"]["inference.get-200"]["content"]["application/json"]["schema"]
        )

    def error(self, status: int, etype: str, reason: str, headers: dict[str, str] | None = None) -> Reply:
        cause = {"type": etype, "reason": reason}
        payload = {"error": {"root_cause": [cause], **cause}, "status": status}
        self._checked(self._error, payload, "error response")
        return json_reply(status, payload, {"X-Elastic-Product": "Elasticsearch", **(headers or {})})

    async def route(self, req: Incoming) -> Reply:
        reply = await self._route(req)
        reply.headers.setdefault("X-Elastic-Product", "Elasticsearch")
        return reply

    async def _route(self, req: Incoming) -> Reply:
        c = self.config
        if c.api_key and req.headers.get("authorization") != f"ApiKey {c.api_key}":
            return self.error(
                401,
                "security_exception",
                "unable to authenticate with provided credentials and anonymous access is not allowed for this request",
                {"WWW-Authenticate": 'ApiKey, Basic realm="security" charset="UTF-8"'},
            )
        if req.method == "GET" and req.path == "/":
            return json_reply(
                200,
                {
                    "name": "test",
                    "cluster_name": "test",
                    "version": {"number": "9.4.0"},
                    "tagline": "You Know, for Search",
                },
            )
        m = _TEXT_EMBEDDING.match(req.path)
        if not m:
            return self.error(400, "illegal_argument_exception", f"request [{req.method} {req.path}] is not supported")
        task, inference_id = m.group("task"), m.group("id")
        if inference_id != c.inference_id:
            return self.error(404, "resource_not_found_exception", f"Inference endpoint not found [{inference_id}]")
        if task not in (None, "text_embedding"):
            return self.error(
                400,
                "status_exception",
                f"Incompatible task_type, the requested type [{task}] does not match the model type [text_embedding]",
            )
        if req.method == "GET":
            return self.endpoint_info()
        if req.method == "POST":
            return await self.apply_fault(lambda: self.infer(req), req)
        return self.error(405, "illegal_argument_exception", f"method [{req.method}] not allowed")

    def endpoint_info(self) -> Reply:
        c = self.config
        payload = {
            "endpoints": [
                {
                    "inference_id": c.inference_id,
                    "task_type": "text_embedding",
                    "service": c.service,
                    "service_settings": {
                        "model_id": c.model_id,
                        "dimensions": c.dimensions,
                        "similarity": c.similarity,
                        "rate_limit": {"requests_per_minute": 10000},
                    },
                    "chunking_settings": {"strategy": "sentence", "max_chunk_size": 250, "sentence_overlap": 1},
                }
            ]
        }
        self._checked(self._get, payload, "GET _inference response")
        return json_reply(200, payload)

    async def infer(self, req: Incoming) -> Reply:
        try:
            body = json.loads(req.body)
        except ValueError as exc:
            return self.error(400, "x_content_parse_exception", f"[1:1] failed to parse: {exc}")
        try:
            self._checked(self._req, body, "text_embedding request")
        except ContractViolation as exc:
            return self.error(400, "x_content_parse_exception", str(exc))
        unknown = sorted(set(body) - {"input", "input_type", "task_settings"})
        if unknown:
            self.violations.append(f"unknown request fields {unknown}")
            return self.error(
                400, "x_content_parse_exception", f"[1:2] [inference_request] unknown field [{unknown[0]}]"
            )
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        if not texts:
            return self.error(
                400,
                "action_request_validation_exception",
                "Validation Failed: 1: Field [input] cannot be an empty array;",
            )
        input_type = body.get("input_type")
        if input_type is not None and input_type.strip().lower() not in INPUT_TYPES:
            return self.error(400, "illegal_argument_exception", f"Unrecognized input_type [{input_type}]")
        prefix = self.config.prompts.get((input_type or "").strip().lower(), "")
        raw, _tokens = await self.embed_upstream([prefix + t for t in texts])
        rows = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).tolist()
        payload = {"text_embedding": [{"embedding": r} for r in rows]}
        self._checked(self._resp, payload, "text_embedding response")
        return json_reply(200, payload)

    def fault_body(self, fault: Fault, good: Reply) -> Reply | None:
        rows = [d["embedding"] for d in json.loads(good.body)["text_embedding"]]
        if fault.kind == "wrong_count":
            rows = rows[:-1] if len(rows) > 1 else rows * 2
        elif fault.kind == "wrong_dimension":
            rows = [r[: fault.dimension] for r in rows]
        elif fault.kind == "nan":
            rows = nan_json(rows)
        else:
            return None
        return json_reply(200, {"text_embedding": [{"embedding": r} for r in rows]})
