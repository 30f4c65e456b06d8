"""The official `openai` SDK against the gateway: its default base64 path equals the float path."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from openai import NotFoundError, OpenAI

from backends.managed.process import LlamaCppProcess
from tests.helpers import RunningGateway, cosines, llamacpp_backend, run_gateway, settings_for


@pytest.fixture(scope="module")
def gw(primary: LlamaCppProcess) -> Iterator[RunningGateway]:
    with run_gateway(settings_for([llamacpp_backend("p", primary.url)])) as g:
        yield g


def test_sdk_default_base64_equals_float(gw: RunningGateway) -> None:
    client = OpenAI(base_url=gw.url + "/v1", api_key="unused")
    texts = ["first sentence", "second, different sentence", "ümlaut ✓"]
    default = client.embeddings.create(model="minilm", input=texts)  # the SDK asks for base64
    floats = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    a = np.asarray([d.embedding for d in default.data], dtype=np.float32)
    b = np.asarray([d.embedding for d in floats.data], dtype=np.float32)
    assert a.shape == (3, 384)
    # Two requests to llama.cpp, whose last bits vary with batch composition (llama.cpp #26282);
    # that both encodings carry identical float32 bits is proven on one result in test_api.py.
    assert cosines(a, b).min() >= 0.99999 and np.abs(a - b).max() < 1e-3
    assert default.usage.prompt_tokens > 0 and default.model == "minilm"


def test_sdk_sees_errors_in_openai_shape(gw: RunningGateway) -> None:
    client = OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(NotFoundError) as info:
        client.embeddings.create(model="does-not-exist", input="x")
    assert "known models" in str(info.value)
