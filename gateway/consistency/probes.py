"""The built-in probe set: multilingual (the model card's sunset sentences, one per script group: Latin,
Cyrillic, Greek, Han, Hangul, Devanagari, Arabic, kana, Thai), emoji, code, short and long, one near the
token limit, unicode and whitespace edge cases. Named, so findings can say which probe disagreed; grouped
(judge.probe_groups), so they can say which kind of text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Probe:
    name: str
    text: str
    long: bool = False
    tokens: int | None = None  # counted with the model's tokenizer (with the longest prompt): at-limit probes


SUNSETS = {
    "en": "A beautiful sunset over the beach",
    "ar": "غروب جميل على الشاطئ",
    "zh": "海滩上美丽的日落",
    "fr": "Un beau coucher de soleil sur la plage",
    "de": "Ein wunderschöner Sonnenuntergang am Strand",
    "el": "Ένα όμορφο ηλιοβασίλεμα πάνω από την παραλία",
    "hi": "समुद्र तट पर एक खूबसूरत सूर्यास्त",
    "it": "Un bellissimo tramonto sulla spiaggia",
    "ja": "浜辺に沈む美しい夕日",
    "ko": "해변 위로 아름다운 일몰",
    "ru": "Красивый закат над пляжем",
    "th": "พระอาทิตย์ตกที่สวยงามเหนือชายหาด",
}
_LONG_SENTENCE = (
    "Golden sunlight melts into the horizon, painting waves in warm amber and rose, "
    "while the sky whispers goodnight to the quiet, endless sea. "
)
# Upper bound for the near-limit probe: a 32k-token probe would take minutes on a CPU backend.
_MAX_PROBE_TOKENS = 2048


def probe_set(max_input_tokens: int) -> list[Probe]:
    """Probes for a model whose inputs may be `max_input_tokens` long (the smallest known limit)."""
    probes = [Probe(f"sunset-{lang}", text) for lang, text in SUNSETS.items()]
    probes += [
        Probe("one-word", "hello"),
        Probe("one-char", "a"),
        Probe("unicode", "naïve café résumé: ✓ Ω ≈ ç √ 🙂 — “quotes”"),
        Probe("whitespace-edges", "   padded with spaces   "),
        Probe("inner-whitespace", "tabs\tand\nnew lines\n\nin between"),
        Probe("sentence", "Paris is the capital and most populous city of France."),
        Probe("emoji", "🌅 🏖️ 🌊 ☀️"),
        Probe("code", "def add(a: int, b: int) -> int:\n    return a + b  # sum of two numbers"),
    ]
    budget = min(max_input_tokens, _MAX_PROBE_TOKENS)
    # About 4.5 characters per token for English WordPiece/BPE; stay well inside the limit (the
    # model's prompt and special tokens come on top).
    probes.append(Probe("long", _repeat(int(budget * 0.4 * 4.5)), long=True))
    probes.append(Probe("near-limit", _repeat(int(budget * 0.75 * 4.5)), long=True))
    return probes


def _repeat(chars: int) -> str:
    return (_LONG_SENTENCE * (chars // len(_LONG_SENTENCE) + 1))[:chars].rsplit(" ", 1)[0]


_LIMIT_TEXT = (
    "The lighthouse keeper counted the ships that passed each night, writing their names, flags and the "
    "hour in a worn leather book, and when the fog came in thick from the north he rang the bell by hand. "
)


def limit_probes(tokenizer: Any, prefixes: list[str], max_input_tokens: int) -> list[Probe]:
    """Two probes built with the model's tokenizer: one of exactly the limit (with the longest prompt) and a
    longer text the gateway cuts to the limit, as it would a client's. A backend that truncates below the
    limit without declaring it, or embeds past it, disagrees on these and nowhere else."""
    limit = min(max_input_tokens, _MAX_PROBE_TOKENS)
    prefix = max(prefixes, key=lambda p: tokenizer.counts([p])[0]) if prefixes else ""
    exact = tokenizer.fit(prefix, [_repeat_text(_LONG_SENTENCE, limit * 6)], limit, "right")
    cut = tokenizer.fit(prefix, [_repeat_text(_LIMIT_TEXT, limit * 10)], limit, "right")
    return [
        Probe("at-limit", exact.texts[0], long=True, tokens=exact.tokens[0]),
        Probe("cut-to-limit", cut.texts[0], long=True, tokens=cut.tokens[0]),
    ]


def _repeat_text(sentence: str, chars: int) -> str:
    return (sentence * (chars // len(sentence) + 1))[:chars]
