"""The pure judge on synthetic unit vectors: majority, ties, per-group verdicts, restriction."""

from __future__ import annotations

import numpy as np

from gateway.consistency.judge import judge_probes, majority, probe_groups, restriction
from gateway.consistency.probes import Probe, probe_set
from gateway.consistency.scripts import scripts_in, scripts_of

PROBES = probe_set(256)
KO = next(i for i, p in enumerate(PROBES) if p.name == "sunset-ko")
HI = next(i for i, p in enumerate(PROBES) if p.name == "sunset-hi")
LONG = next(i for i, p in enumerate(PROBES) if p.name == "long")
rng = np.random.default_rng(3)


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


TRUTH = {(None, i): unit(rng.normal(size=16)) for i in range(len(PROBES))}


def bent(rows: dict, which: dict[int, float]) -> dict:
    """`rows` with probe i moved to cosine ~which[i] from where it was."""
    out = dict(rows)
    for i, target in which.items():
        v = rows[(None, i)]
        noise = unit(rng.normal(size=v.shape) - (rng.normal(size=v.shape) @ v) * v)
        out[(None, i)] = unit(target * v + np.sqrt(max(0.0, 1 - target**2)) * noise)
    return out


def test_the_largest_agreeing_group_wins_over_the_preferred_backend() -> None:
    rows = {"llama": bent(TRUTH, {KO: 0.69}), "vllm": TRUTH, "infinity": TRUTH}
    m = majority(rows, ["llama", "vllm", "infinity"], 0.99)
    assert m.truth == "vllm" and m.groups == [["vllm", "infinity"], ["llama"]]


def test_a_tie_goes_to_the_tokenization_that_matches_the_model_then_to_preference() -> None:
    rows = {"llama": bent(TRUTH, {KO: 0.69}), "vllm": TRUTH}
    assert majority(rows, ["llama", "vllm"], 0.99).truth == "llama"  # no evidence: the preferred one
    tokens = {"llama": {KO: False}, "vllm": {KO: True}}
    assert majority(rows, ["llama", "vllm"], 0.99, tokens).truth == "vllm"


def test_every_backend_in_one_group_keeps_the_preferred_truth() -> None:
    rows = {"a": TRUTH, "b": bent(TRUTH, {0: 0.9995})}
    assert majority(rows, ["b", "a"], 0.99).truth == "b"


def test_per_probe_judgement_and_restriction_by_script() -> None:
    llama = bent(TRUTH, {KO: 0.69, HI: 0.9976})
    j = judge_probes(llama, TRUTH, PROBES, 0.99, 0.999, {HI: False, KO: False})
    assert j.bad == sorted([KO, HI]) and j.excluded == {"Hangul", "Devanagari"}
    assert j.group_min["Hangul"] < 0.7 and j.group_min["Latin"] > 0.9999
    # Without token evidence the Hindi probe is precision drift, not a disagreement.
    assert judge_probes(llama, TRUTH, PROBES, 0.99, 0.999).excluded == {"Hangul"}


def test_no_restriction_for_long_latin_or_widespread_disagreement() -> None:
    assert restriction([LONG], PROBES, len(PROBES)) is None
    latin = next(i for i, p in enumerate(PROBES) if p.name == "sentence")
    assert restriction([latin], PROBES, len(PROBES)) is None
    assert restriction(list(range(12)), PROBES, len(PROBES)) is None
    assert restriction([], PROBES, len(PROBES)) is None


def test_scripts_and_groups() -> None:
    assert scripts_of("plain ascii") == frozenset() and scripts_of("naïve café") == frozenset()
    assert scripts_of("浜辺に沈む") == {"Han", "Kana"} and scripts_of("Привет") == {"Cyrillic"}
    assert scripts_of("sunset 🌅") == {"Emoji"} and scripts_of("พระอาทิตย์") == {"Thai"}
    assert scripts_in(["english", "해변", "غروب"]) == {"Hangul", "Arabic"}
    assert probe_groups(Probe("sunset-ko", "해변 위로")) == ["short", "Hangul"]
    assert probe_groups(Probe("long", "words " * 50, long=True)) == ["long", "Latin"]
    assert probe_groups(Probe("code", "def f(): pass")) == ["short", "code"]
