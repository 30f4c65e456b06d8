"""Torch-free conversion of a Hugging Face BERT sentence-embedding model to GGUF.

llama.cpp's own converter (`convert_hf_to_gguf.py`) needs torch, which `make run` must not install.
A BERT encoder such as all-MiniLM-L6-v2 is simple enough to write with the `gguf` package alone;
the pitfalls below are the ones that make a file differ from the official converter's output.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

OutType = Literal["f32", "f16", "q8_0"]
_POOLING = {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS, "last": gguf.PoolingType.LAST}
_FILE_TYPE = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
# Kept in float32 whatever the output type, as llama.cpp's converter does.
_KEEP_F32 = ("position_embd", "token_types")


def _pooling_of(model_dir: Path) -> str:
    cfg_path = model_dir / "1_Pooling" / "config.json"
    if not cfg_path.exists():
        return "cls"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    if cfg.get("pooling_mode_lasttoken"):
        return "last"
    return "cls"


def _vocab(model_dir: Path) -> tuple[list[bytes], list[int], bool]:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # tokenizer.json ships with truncation/padding at 128: never let them touch the vocabulary.
    tok.no_truncation()
    tok.no_padding()
    vocab = tok.get_vocab(with_added_tokens=True)
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    tokens: list[bytes] = []
    types: list[int] = []
    for text, _id in sorted(vocab.items(), key=lambda kv: kv[1]):
        if text in special:
            tokens.append(text.encode())
            types.append(gguf.TokenType.CONTROL)
        elif text.startswith("##"):
            # llama.cpp's WordPiece uses a "phantom space": continuation pieces lose '##',
            # word-initial pieces gain U+2581.
            tokens.append(text[2:].encode())
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(("\u2581" + text).encode())
            types.append(gguf.TokenType.NORMAL)
    normalizer = json.loads(tok.to_str()).get("normalizer") or {}
    lowercase = bool(normalizer.get("lowercase", False))
    return tokens, types, lowercase


def _tensor_name(name_map: gguf.TensorNameMap, hf_name: str) -> str | None:
    name = hf_name.removeprefix("bert.")
    if name.startswith("pooler.") or name == "embeddings.position_ids":
        return None  # not used by llama.cpp for sentence embeddings
    name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
    return name_map.get_name(name, try_suffixes=(".weight", ".bias"))


def _encode_tensor(
    gguf_name: str, data: np.ndarray, outtype: OutType
) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    data = data.astype(np.float32)
    if outtype == "f32" or data.ndim < 2 or any(k in gguf_name for k in _KEEP_F32):
        return data, None
    if outtype == "f16":
        return data.astype(np.float16), None
    if data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] != 0:
        return data.astype(np.float16), None
    quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
    return quantized, gguf.GGMLQuantizationType.Q8_0


def convert_bert(
    model_dir: Path,
    out_path: Path,
    *,
    outtype: OutType = "f16",
    pooling: str | None = None,
    name: str | None = None,
    transform: Callable[[str, np.ndarray], np.ndarray] | None = None,
) -> Path:
    """Write `model_dir` (HF BERT: config.json, model.safetensors, tokenizer.json) as GGUF."""
    cfg = json.loads((model_dir / "config.json").read_text())
    arch = gguf.MODEL_ARCH.BERT
    n_blocks = int(cfg["num_hidden_layers"])
    name_map = gguf.TensorNameMap(arch, n_blocks)
    pooling = pooling or _pooling_of(model_dir)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or model_dir.name)
    writer.add_context_length(int(cfg["max_position_embeddings"]))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_block_count(n_blocks)
    writer.add_head_count(int(cfg["num_attention_heads"]))
    writer.add_layer_norm_eps(float(cfg["layer_norm_eps"]))
    writer.add_causal_attention(False)
    writer.add_pooling_type(_POOLING[pooling])
    writer.add_file_type(_FILE_TYPE[outtype])
    writer.add_token_type_count(int(cfg.get("type_vocab_size", 2)))

    tokens, types, lowercase = _vocab(model_dir)
    writer.add_tokenizer_model("bert")
    # llama.cpp's WordPiece ignores the pre-tokenizer name; the official converter derives it from a
    # hash table we do not have, so write the neutral value.
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # The PyPI gguf package's SpecialVocab does not write this key; llama.cpp assumes lowercase when
    # it is missing, which would be wrong for cased models.
    writer.add_bool(
        gguf.Keys.Tokenizer.LOWERCASE
        if hasattr(gguf.Keys.Tokenizer, "LOWERCASE")
        else "tokenizer.ggml.normalizer.lowercase",
        lowercase,
    )
    gguf.SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(writer)

    for hf_name, data in load_file(str(model_dir / "model.safetensors")).items():
        gguf_name = _tensor_name(name_map, hf_name)
        if gguf_name is None:
            continue
        if transform is not None:  # e.g. the agreement checker's tests make a "different model"
            data = transform(gguf_name, data)
        encoded, qtype = _encode_tensor(gguf_name, data, outtype)
        writer.add_tensor(gguf_name, encoded, raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out_path)  # atomic: a crash never leaves a half-written model in the cache
    return out_path
