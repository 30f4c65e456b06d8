"""What a check found: per-backend verdicts, pairwise cosines, findings with a diagnosis."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Verdict(StrEnum):
    REFERENCE = "reference"  # the yardstick: compatible by definition
    AGREE = "agree"  # every probe at or above warn_cosine
    DRIFT = "drift"  # between agree_cosine and warn_cosine: precision drift, still one space
    RESTRICTED = "restricted"  # wrong on a few scripts only: serves texts in the others
    DISAGREE = "disagree"  # below agree_cosine: quarantined
    ERROR = "error"  # could not be checked (unreachable, failing): not verified
    PENDING = "pending"  # not checked yet
    UNCHECKED = "unchecked"  # the checker is disabled

    @property
    def compatible(self) -> bool:
        return self in (Verdict.REFERENCE, Verdict.AGREE, Verdict.DRIFT, Verdict.RESTRICTED)


@dataclass
class Finding:
    backend: str
    kind: str  # dimension | prompt_missing | prompt_doubled | prompt_wrong | pooling | normalization |
    #            truncation | precision_drift | different_model | static_mismatch | unavailable |
    #            partial_disagreement | tokenization | majority
    severity: str  # info | warning | error
    message: str


@dataclass
class BackendResult:
    name: str
    kind: str
    verdict: Verdict
    min_cosine: float | None = None
    mean_cosine: float | None = None
    dimension: int | None = None
    norm_range: tuple[float, float] | None = None  # of the vectors as the backend returned them
    worst_probe: str | None = None
    error: str | None = None
    per_probe: dict[str, float] = field(default_factory=dict)  # probe -> cosine to the reference (min over prompts)
    per_group: dict[str, float] = field(default_factory=dict)  # probe group (length, script) -> min cosine
    excluded_scripts: list[str] = field(default_factory=list)  # RESTRICTED: requests with these never go there
    # A probe alone against the same probe inside a batch of others: cos >= warn_cosine means its vectors do not
    # depend on batch composition, so it may take coalesced calls. None: not measured.
    batch_cosine: float | None = None


@dataclass
class Report:
    model: str
    reference: str | None
    thresholds: dict[str, float]
    backends: list[BackendResult] = field(default_factory=list)
    matrix_names: list[str] = field(default_factory=list)
    matrix: list[list[float | None]] = field(default_factory=list)  # min cosine over probes, pairwise
    findings: list[Finding] = field(default_factory=list)
    probes: int = 0
    # Backends that agree with each other on every probe; the first group defines the space (unpinned).
    groups: list[list[str]] = field(default_factory=list)
    checked_at: float = field(default_factory=time.time)
    duration_ms: float = 0.0

    def result(self, name: str) -> BackendResult | None:
        return next((b for b in self.backends if b.name == name), None)

    def summary(self) -> str:
        return ", ".join(f"{b.name}={b.verdict}" for b in self.backends) or "no backend checked"

    @property
    def disagreement(self) -> bool:
        return any(b.verdict is Verdict.DISAGREE for b in self.backends)

    @property
    def errors(self) -> bool:
        return any(b.verdict is Verdict.ERROR for b in self.backends) or self.reference is None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["matrix"] = {"backends": self.matrix_names, "min_cosine": self.matrix}
        d.pop("matrix_names")
        d["agree"] = not self.disagreement and not self.errors
        return d


def render(reports: list[Report]) -> str:
    """The table `embedding-gateway check` prints."""
    out: list[str] = []
    for r in reports:
        t = r.thresholds
        out.append(
            f"model {r.model}  reference: {r.reference or '(none available)'}  probes: {r.probes}  "
            f"agree >= {t['agree_cosine']}, warn < {t['warn_cosine']}, config error < {t['error_cosine']}"
        )
        width = max([len(n) for n in r.matrix_names] + [8])
        out.append(" " * (width + 2) + "  ".join(f"{n[:10]:>10}" for n in r.matrix_names))
        for name, row in zip(r.matrix_names, r.matrix, strict=True):
            cells = "  ".join(f"{'—' if c is None else f'{c:.5f}':>10}" for c in row)
            out.append(f"{name:<{width}}  {cells}")
        out.append("")
        for b in r.backends:
            extra = f" min {b.min_cosine:.5f} mean {b.mean_cosine:.5f}" if b.min_cosine is not None else ""
            worst = f" (worst: {b.worst_probe})" if b.worst_probe and b.verdict is not Verdict.REFERENCE else ""
            err = f" — {b.error}" if b.error else ""
            scripts = f" (not for {', '.join(b.excluded_scripts)} text)" if b.excluded_scripts else ""
            out.append(f"  {b.name:<{width}} {b.verdict.upper():<10}{extra}{worst}{scripts}{err}")
        if r.findings:
            out.append("  findings:")
            for f in r.findings:
                out.append(f"    [{f.severity}] {f.backend}: {f.kind}: {f.message}")
        out.append("")
    return "\n".join(out)
