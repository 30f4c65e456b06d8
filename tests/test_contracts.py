"""The vendored contracts are the team's contracts, and the validators are strict where it matters."""

from __future__ import annotations

import pytest

from tests.contracts import HERE, SHARED, ContractViolation, check, elasticsearch, tei


@pytest.mark.parametrize("name", ["tei-openapi.json", "es-inference-text-embedding.json"])
def test_vendored_copy_matches_shared(name: str) -> None:
    if not SHARED.exists():
        pytest.skip("../shared/contracts is not beside this checkout")
    assert (HERE / name).read_bytes() == (SHARED / name).read_bytes()


def test_validators_reject_wrong_shapes() -> None:
    embed = tei().request_validator("post", "/embed")
    check(embed, {"inputs": ["a"], "truncate": False, "normalize": True, "prompt_name": None}, "ok")
    with pytest.raises(ContractViolation):
        check(embed, {"inputs": ["a"], "truncate": "no"}, "bad truncate")
    with pytest.raises(ContractViolation):
        check(embed, {"input": ["a"]}, "missing inputs")
    es = elasticsearch().request_validator("post", "/_inference/text_embedding/{inference_id}")
    check(es, {"input": ["a"], "input_type": "search"}, "ok")
    with pytest.raises(ContractViolation):
        check(es, {"input": [1]}, "numbers")
    result = elasticsearch().response_validator("post", "/_inference/text_embedding/{inference_id}", 200)
    check(result, {"text_embedding": [{"embedding": [0.1, 0.2]}]}, "ok")
    with pytest.raises(ContractViolation):
        check(result, {"text_embedding": [], "text_embedding_bytes": []}, "two variants")
