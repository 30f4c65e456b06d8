"""The canonical pipeline's math and request resolution, property-tested."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from config import BUILTIN_PROFILES
from gateway.errors import InvalidRequest
from gateway.pipeline import Prompt, apply_prompt, finish, resolve_dimensions, resolve_prompt

JINA = BUILTIN_PROFILES["jina-embeddings-v5-text-small-text-matching"]
MINILM = BUILTIN_PROFILES["all-minilm-l6-v2"]

finite = st.one_of(st.floats(0.125, 1024.0, width=32), st.floats(-1024.0, -0.125, width=32))


@settings(max_examples=60, deadline=None)
@given(
    m=arrays(np.float32, st.tuples(st.integers(1, 5), st.just(1024)), elements=finite),
    dims=st.sampled_from(JINA.allowed_dimensions),
)
def test_finish_slices_and_renormalizes_to_unit_float32(m: np.ndarray, dims: int) -> None:
    out = finish(m, JINA, dims)
    assert out.dtype == np.float32 and out.shape == (m.shape[0], dims) and out.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    # the slice keeps direction: same as slicing the raw vector and normalizing once
    raw = m[:, :dims].astype(np.float64)
    # float32 throughout and normalised twice: each element within a few ulps (rtol), never more
    np.testing.assert_allclose(out, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5, atol=2e-6)


def test_finish_does_not_depend_on_backend_scale() -> None:
    rng = np.random.default_rng(0)
    m = rng.normal(size=(3, 1024)).astype(np.float32)
    np.testing.assert_allclose(finish(m, JINA, 256), finish(m * 17.5, JINA, 256), atol=1e-6)


def test_prompt_resolution() -> None:
    assert resolve_prompt(JINA, None) == Prompt("document", "Document: ")
    assert resolve_prompt(JINA, "query") == Prompt("query", "Query: ")
    assert resolve_prompt(MINILM, None) == Prompt(None, "")
    with pytest.raises(InvalidRequest, match=r"\['document', 'query'\]"):
        resolve_prompt(JINA, "passage")
    with pytest.raises(InvalidRequest, match="no prompts"):
        resolve_prompt(MINILM, "query")
    assert apply_prompt("Query: ", ["a", "b"]) == ["Query: a", "Query: b"]


def test_dimension_resolution_lists_allowed_values() -> None:
    assert resolve_dimensions(JINA, None) == 1024 and resolve_dimensions(JINA, 256) == 256
    with pytest.raises(InvalidRequest, match=r"allowed values: \[32, 64, 128, 256, 512, 768, 1024\]"):
        resolve_dimensions(JINA, 100)
    with pytest.raises(InvalidRequest, match=r"\[384\]"):
        resolve_dimensions(MINILM, 128)
