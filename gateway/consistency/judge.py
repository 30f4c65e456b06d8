"""The judgement, pure and synchronous: arrays in, verdict material out (no I/O, no clock).

Who is right: for a pinned model the recorded space; otherwise the largest group of backends whose
vectors agree with each other on every probe (ties: the group whose tokenization matches the model's
tokenizer on the disputed probes, then the preferred backend - the configured reference or the one
that defined the space so far - then priority). A backend is then judged per probe against that truth:
a probe disagrees below `agree_cosine`, or below `warn_cosine` when the backend's tokens differ from the
model's there (a tokenizer difference is categorical, not precision noise). Disagreement confined to a
few probes of scripts the gateway can route around is a restriction, not a quarantine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from gateway.consistency.probes import Probe
from gateway.consistency.scripts import scripts_of

Key = tuple[str | None, int]  # (prompt name, probe index)
Rows = Mapping[Key, np.ndarray]  # unit vectors
# backend -> probe index -> its token count equals the model tokenizer's (absent: unknown)
TokenMatch = Mapping[str, Mapping[int, bool]]


def probe_groups(probe: Probe) -> list[str]:
    """The groups a probe belongs to: its length class, and its scripts (Latin when it has none)."""
    size = "at-limit" if probe.name in ("at-limit", "cut-to-limit") else "long" if probe.long else "short"
    if probe.name.startswith("code"):
        return [size, "code"]
    return [size, *(sorted(scripts_of(probe.text)) or ["Latin"])]


def cosines(a: Rows, b: Rows) -> dict[Key, float]:
    return {k: float(a[k] @ b[k]) for k in a.keys() & b.keys()}


@dataclass
class Majority:
    truth: str | None
    groups: list[list[str]] = field(default_factory=list)  # backends that agree with each other, truth's first


def majority(
    rows: Mapping[str, Rows], preference: Sequence[str], agree: float, tokens: TokenMatch | None = None
) -> Majority:
    """The group of backends that defines the space (see the module doc); `preference` orders all names."""
    names = sorted(rows, key=lambda n: preference.index(n) if n in preference else len(preference))
    if not names:
        return Majority(None)

    def agrees(a: str, b: str) -> bool:
        c = cosines(rows[a], rows[b])
        return not c or min(c.values()) >= agree

    def token_score(group: list[str]) -> int:
        marks = [ok for n in group for ok in (tokens or {}).get(n, {}).values()]
        return sum(1 if ok else -1 for ok in marks)

    candidates = {tuple(n for n in names if agrees(seed, n)) for seed in names}
    ranked = sorted(candidates, key=lambda g: (-len(g), -token_score(list(g)), min(names.index(n) for n in g)))
    best = list(ranked[0])
    # The truth is the group's preferred member whose own tokenization is not known to be wrong.
    sound = [n for n in best if not any(ok is False for ok in (tokens or {}).get(n, {}).values())]
    truth = (sound or best)[0]
    groups = [best]
    rest = [n for n in names if n not in best]
    while rest:
        g = [n for n in rest if agrees(rest[0], n)]
        groups.append(g)
        rest = [n for n in rest if n not in g]
    return Majority(truth, groups)


@dataclass
class ProbeJudgement:
    cos: dict[Key, float]
    bad: list[int]  # probe indexes that disagree
    group_min: dict[str, float]  # group -> min cosine over its probes
    excluded: frozenset[str] | None  # scripts to route around; None: not explainable by scripts


def judge_probes(
    rows: Rows,
    truth: Rows,
    probes: Sequence[Probe],
    agree: float,
    warn: float,
    token_match: Mapping[int, bool] | None = None,
) -> ProbeJudgement:
    cos = cosines(rows, truth)
    by_probe: dict[int, float] = {}
    for (_, i), c in cos.items():
        by_probe[i] = min(c, by_probe.get(i, 1.0))
    tm = token_match or {}
    bad = sorted(i for i, c in by_probe.items() if c < agree or (c < warn and tm.get(i) is False))
    group_min: dict[str, float] = {}
    for i, c in by_probe.items():
        for g in probe_groups(probes[i]):
            group_min[g] = round(min(c, group_min.get(g, 1.0)), 6)
    return ProbeJudgement(cos, bad, group_min, restriction(bad, probes, len(by_probe)))


def restriction(bad: Sequence[int], probes: Sequence[Probe], judged: int) -> frozenset[str] | None:
    """Scripts that explain every disagreeing probe, when the disagreement is confined to a few short
    probes in scripts a request can be routed by; None when it is not (long inputs, Latin, code, most
    probes: the backend is wrong in general)."""
    if not bad or len(bad) * 4 > judged:
        return None
    scripts: set[str] = set()
    for i in bad:
        found = scripts_of(probes[i].text)
        if probes[i].long or not found or probes[i].name.startswith("code"):
            return None
        scripts |= found
    return frozenset(scripts)
