"""The built-in probe set: multilingual (the model card's sunset sentences), short and long, one near the
token limit, unicode and whitespace edge cases. Named, so findings can say which probe disagreed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Probe:
    name: str
    text: str
    long: bool = False


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
    ]
    budget = min(max_input_tokens, _MAX_PROBE_TOKENS)
    # About 4.5 characters per token for English WordPiece/BPE; stay well inside the limit (the
    # model's prompt and special tokens come on top).
    probes.append(Probe("long", _repeat(int(budget * 0.4 * 4.5)), long=True))
    probes.append(Probe("near-limit", _repeat(int(budget * 0.75 * 4.5)), long=True))
    return probes


def _repeat(chars: int) -> str:
    return (_LONG_SENTENCE * (chars // len(_LONG_SENTENCE) + 1))[:chars].rsplit(" ", 1)[0]
