"""Writing systems a text uses, for probe groups and for routing around a backend that is wrong on one.

Only scripts a backend can be restricted on are named (Latin is never: a backend wrong on Latin text is
wrong, full stop). The hot path pays one `str.isascii()` per text for the common case.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

# (first code point, last code point, script); sorted, not overlapping.
_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x0370, 0x03FF, "Greek"),
    (0x0400, 0x052F, "Cyrillic"),
    (0x0600, 0x06FF, "Arabic"),
    (0x0750, 0x077F, "Arabic"),
    (0x08A0, 0x08FF, "Arabic"),
    (0x0900, 0x097F, "Devanagari"),
    (0x0E00, 0x0E7F, "Thai"),
    (0x1100, 0x11FF, "Hangul"),
    (0x1F00, 0x1FFF, "Greek"),
    (0x2600, 0x27BF, "Emoji"),
    (0x2DE0, 0x2DFF, "Cyrillic"),
    (0x2E80, 0x2FDF, "Han"),
    (0x3040, 0x30FF, "Kana"),
    (0x3130, 0x318F, "Hangul"),
    (0x31F0, 0x31FF, "Kana"),
    (0x3400, 0x4DBF, "Han"),
    (0x4E00, 0x9FFF, "Han"),
    (0xA640, 0xA69F, "Cyrillic"),
    (0xA8E0, 0xA8FF, "Devanagari"),
    (0xA960, 0xA97F, "Hangul"),
    (0xAC00, 0xD7FF, "Hangul"),
    (0xF900, 0xFAFF, "Han"),
    (0xFB50, 0xFDFF, "Arabic"),
    (0xFE70, 0xFEFF, "Arabic"),
    (0xFF66, 0xFF9F, "Kana"),
    (0x1F000, 0x1FAFF, "Emoji"),
    (0x20000, 0x2FA1F, "Han"),
)
_STARTS = [r[0] for r in _RANGES]
SCRIPTS = frozenset(r[2] for r in _RANGES)
NONE: frozenset[str] = frozenset()


def scripts_of(text: str) -> frozenset[str]:
    """The restrictable scripts in `text` (empty for ASCII, Latin with accents, digits, punctuation)."""
    if text.isascii():
        return NONE
    found: set[str] = set()
    for ch in set(text):
        code = ord(ch)
        if code < 0x0370:
            continue
        i = bisect_right(_STARTS, code) - 1
        if i >= 0 and code <= _RANGES[i][1]:
            found.add(_RANGES[i][2])
    return frozenset(found)


def scripts_in(texts: Iterable[str]) -> frozenset[str]:
    """Every restrictable script in any of `texts`."""
    found: frozenset[str] = NONE
    for text in texts:
        if not text.isascii():
            found = found | scripts_of(text)
    return found
