"""Quantized outputs from the one float pipeline (and from the cache): the client's type, not the backend's.

binary / ubinary   the packed sign bits (x > 0), 8 dimensions per byte, first dimension in the high bit:
                   ubinary as uint8, binary as int8 (the byte minus 128) - exactly sentence-transformers'
                   `quantize_embeddings(..., precision="binary" | "ubinary")`
int8 / uint8       a fixed range, so a text's codes never depend on the batch it came in: the components of a
                   unit vector of dimension d are about N(0, 1/d), so x * sqrt(d) is scaled to [-4, 4] ->
                   int8 = clip(round(x * sqrt(d) * 127 / 4), -128, 127); uint8 = int8 + 128
base64             the little-endian float32 bytes of each vector, base64-encoded (OpenAI's, Cohere's)
base64-<type>      the bytes of <type>'s codes, base64-encoded (Voyage's encoding_format with output_dtype)
Dimensions (Matryoshka) apply first: d is the dimension returned.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

_RANGE = 4.0  # standard deviations each side that int8/uint8 cover
TYPES = ("float", "base64", "int8", "uint8", "binary", "ubinary")  # every output type a client may ask for


def quantize(vectors: np.ndarray, kind: str) -> np.ndarray:
    """(n, d) float32 unit vectors -> the integer codes of `kind` (int8, uint8, binary, ubinary)."""
    if kind in ("binary", "ubinary"):
        packed: np.ndarray = np.packbits(vectors > 0, axis=-1)
        return packed if kind == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
    scale = np.sqrt(vectors.shape[1]) * 127.0 / _RANGE
    codes: np.ndarray = np.clip(np.rint(vectors.astype(np.float64) * scale), -128, 127)
    if kind == "int8":
        out: np.ndarray = codes.astype(np.int8)
        return out
    if kind == "uint8":
        shifted: np.ndarray = (codes + 128).astype(np.uint8)
        return shifted
    raise ValueError(f"unknown quantization {kind!r}")


def rows(vectors: np.ndarray, kind: str) -> Any:
    """What goes into a JSON body for `kind`: the float matrix itself (orjson writes float32 exactly), base64
    strings, or an integer matrix."""
    if kind == "float":
        return vectors
    if kind.startswith("base64"):
        packed = vectors.astype("<f4", copy=False) if kind == "base64" else quantize(vectors, kind[len("base64-") :])
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in packed]
    return quantize(vectors, kind)
