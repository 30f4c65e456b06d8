"""Validation against the backends' published contracts (../shared/contracts, vendored here).

Both files are OpenAPI 3.0 documents. Their schemas are JSON Schema plus OpenAPI's `nullable`,
which is rewritten here into `anyOf [..., null]` so that `jsonschema` can check them. `oneOf` is read
as `anyOf`: both generators emit `oneOf` for plain unions whose arms overlap (the ES spec's
`reason: oneOf [string, nullable string]`, TEI's `Input` for `[]`), which real servers accept.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

HERE = Path(__file__).parent
SHARED = HERE.parents[2] / "shared" / "contracts"  # the team's copy, beside the repository


class ContractViolation(AssertionError):
    pass


def _nullable(node: Any) -> Any:
    if isinstance(node, dict):
        node = {("anyOf" if k == "oneOf" else k): _nullable(v) for k, v in node.items()}
        if node.pop("nullable", False):
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


class Contract:
    def __init__(self, filename: str) -> None:
        self.doc: dict[str, Any] = json.loads((HERE / filename).read_text())
        self._components = _nullable(copy.deepcopy(self.doc["components"]))

    def _validator(self, schema: dict[str, Any]) -> jsonschema.Draft7Validator:
        return jsonschema.Draft7Validator({**_nullable(schema), "components": self._components})

    def _deref(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            parts = node["$ref"].removeprefix("#/").split("/")
            target: Any = self.doc
            for p in parts:
                target = target[p]
            node = target
        return node

    def request_validator(self, method: str, path: str) -> jsonschema.Draft7Validator:
        body = self._deref(self.doc["paths"][path][method]["requestBody"])
        return self._validator(body["content"]["application/json"]["schema"])

    def response_validator(self, method: str, path: str, status: int) -> jsonschema.Draft7Validator:
        resp = self._deref(self.doc["paths"][path][method]["responses"][str(status)])
        return self._validator(resp["content"]["application/json"]["schema"])

    def schema_validator(self, name: str) -> jsonschema.Draft7Validator:
        return self._validator({"$ref": f"#/components/schemas/{name}"})


def check(validator: jsonschema.Draft7Validator, instance: Any, what: str) -> None:
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        raise ContractViolation(f"{what} violates the contract at {list(e.path)}: {e.message}")


@cache
def tei() -> Contract:
    return Contract("tei-openapi.json")


@cache
def elasticsearch() -> Contract:
    return Contract("es-inference-text-embedding.json")
