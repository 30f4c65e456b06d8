"""Splitting a request into sub-batches that fit every candidate backend, and putting it back together."""

from __future__ import annotations

from collections.abc import Sequence


def estimate_tokens(text: str) -> int:
    # Deliberately pessimistic (about 3 characters per token, plus special tokens): a sub-batch that
    # is a little small costs a little; one that is too big costs a failed call.
    return len(text) // 3 + 2


def split(texts: Sequence[str], max_items: int, max_tokens: int | None = None) -> list[slice]:
    """Contiguous slices of at most `max_items` texts and (when given) about `max_tokens` tokens."""
    max_items = max(1, max_items)
    slices: list[slice] = []
    start, tokens = 0, 0
    for i, text in enumerate(texts):
        cost = estimate_tokens(text)
        full = i - start >= max_items or (max_tokens is not None and i > start and tokens + cost > max_tokens)
        if full:
            slices.append(slice(start, i))
            start, tokens = i, 0
        tokens += cost
    if start < len(texts) or not slices:
        slices.append(slice(start, len(texts)))
    return slices
