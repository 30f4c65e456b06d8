"""One agreement check of one model's backends: who defines the space, and who agrees with it.

The check in three parts: probe I/O (gather.py: metadata and probe vectors through the guarded call
path), the pure judge (judge.py: majority over backends, per-probe-group verdicts), and diagnosis
experiments (diagnose.py: why a backend disagrees). This module runs them in order and writes a Report;
it writes no backend state (the consistency service applies the report).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backends.errors import BackendError, BadBackendOutput
from config.profiles import ModelProfile
from gateway.calls import BackendCalls
from gateway.consistency.diagnose import Diagnosis
from gateway.consistency.gather import ProbeIO, ProbeVectors, cosines
from gateway.consistency.judge import judge_probes, majority, probe_groups
from gateway.consistency.probes import Probe, limit_probes, probe_set
from gateway.consistency.report import BackendResult, Finding, Report, Verdict
from gateway.consistency.space import Space
from gateway.metrics import Metrics
from gateway.state import BackendState
from gateway.tokens import ModelTokenizer


@dataclass(frozen=True)
class RecordedReference:
    """The reference's probe vectors from its last live check: what a backend is judged against while
    the reference itself is down (so a healthy, identical fallback can still be verified)."""

    backend: str
    probe_texts: tuple[str, ...]
    vectors: ProbeVectors
    recorded_at: float


class Checker:
    def __init__(
        self,
        model: str,
        profile: ModelProfile,
        states: Sequence[BackendState],
        reference: str | None = None,
        gguf: Path | None = None,
        calls: BackendCalls | None = None,
        recorded: RecordedReference | None = None,
        only: set[str] | None = None,
        space: Space | None = None,
        probes: list[Probe] | None = None,
        tokenizer: ModelTokenizer | None = None,
        on_partial: str = "restrict",
        traffic: Sequence[str] = (),
        distrusted: set[str] | None = None,
    ) -> None:
        # Texts from recent traffic (never logged, named traffic-N): a backend cannot tell them from clients'.
        self._traffic = [Probe(f"traffic-{i + 1}", t, long=len(t) > 600) for i, t in enumerate(traffic)]
        self.builtin: list[Probe] = []
        self.builtin_probes = 0  # how many of the probes are the built-in (or pinned) set, traffic after them
        self._distrusted = distrusted or set()  # failed a live audit: never the truth while another can be
        self._majority_backed = True  # partial checks: the truth is not a bare preference
        self.traffic_judged = False  # a truth for the traffic texts existed (always, unpinned with a truth)
        self.model = model
        self.on_partial = on_partial  # "restrict" | "quarantine": a backend wrong on a few scripts only
        self.tokenizer = tokenizer  # the model's: probes at its limit, and where a backend truncates
        self.profile = profile
        self.states = sorted(states, key=lambda st: st.backend.priority)
        self.reference_name = reference or (self.states[0].backend.name if self.states else None)
        self.io = ProbeIO(profile, calls or BackendCalls({model: profile.dimension}, Metrics()))
        self.diagnosis = Diagnosis(profile, self.io, tokenizer, gguf)
        self.recorded = recorded
        self.only = only  # check just these backends (and the reference), e.g. to rescue a request
        self.recording: RecordedReference | None = None  # the reference's vectors when it answered live
        # A pinned space: every backend (the one it was recorded on included) is judged against its
        # recorded vectors; there is no live reference.
        self.space = space
        if space is not None:
            self.reference_name = None
        self._probes = probes  # a fixed probe set (a quick admission gate), else the full one

    # -- the check -------------------------------------------------------------------------------
    async def run(self) -> Report:
        started = time.perf_counter()
        p = self.profile
        report = Report(
            self.model,
            None,
            {"agree_cosine": p.agree_cosine, "warn_cosine": p.warn_cosine, "error_cosine": p.error_cosine},
        )
        # Which backends are down is read once: the health monitor may change it while this check awaits,
        # and two reads that disagree misaligned the describe results (StopIteration in the old _align).
        reachable = [st for st in self.states if not st.unreachable]
        described = await asyncio.gather(*(self.io.describe(st) for st in reachable))
        by_name = {st.backend.name: info for st, info in zip(reachable, described, strict=True)}
        infos = [by_name.get(st.backend.name) for st in self.states]
        limits = [p.max_input_tokens] + [i.max_input_tokens for i in infos if i and i.max_input_tokens]
        if self._probes is not None:
            probes = self._probes
        elif self.space is not None:
            probes = list(self.space.probes)
        else:
            probes = probe_set(min(limits))
            if self.tokenizer is not None:
                probes += limit_probes(self.tokenizer, list(p.prompts.values()), p.max_input_tokens)
        self.builtin_probes = len(probes)
        self.builtin = list(probes)  # what a recording of the space holds
        if self._probes is None:
            probes = probes + self._traffic
        report.probes = len(probes)
        for st, info in zip(self.states, infos, strict=True):
            report.findings += self.diagnosis.static(st, info)
        prompt_names: list[str | None] = list(p.prompts) or [None]
        vectors: dict[str, ProbeVectors | BackendError] = {}
        # A backend known to be down is not waited for: it is checked again when it recovers.
        down = BackendError("", "unhealthy: it will be checked when it recovers")
        live = [st for st in reachable if self.only is None or st.backend.name in self.only | {self.reference_name}]
        results = await asyncio.gather(
            *(self.io.vectors(st, probes, prompt_names, by_name.get(st.backend.name)) for st in live)
        )
        for st in self.states:
            # Why it is down (a misconfiguration names its fix: "set remote_model", served ids...).
            vectors[st.backend.name] = (
                BackendError(st.backend.name, f"unhealthy: {st.last_error}")
                if (st.unreachable and st.last_error)
                else down
            )
        for st, res in zip(live, results, strict=True):
            vectors[st.backend.name] = res
        batch_cosines: dict[str, float | None] = {}
        if self.only is None and self._probes is None:
            cosines_ = await asyncio.gather(*(self._batch_cosine(st, vectors[st.backend.name], probes) for st in live))
            batch_cosines = {st.backend.name: c for st, c in zip(live, cosines_, strict=True)}
        if self.only is None:
            measured = {
                st.backend.name: (st, v) for st in live if isinstance(v := vectors[st.backend.name], ProbeVectors)
            }
            pinned = ProbeVectors(self.space.rows, [], set()).only(len(probes)) if self.space is not None else None
            await self.diagnosis.token_evidence(measured, probes, pinned)
            if self.space is None:
                self._elect(vectors, report)
        ref_state = next((st for st in self.states if st.backend.name == self.reference_name), None)
        ref = vectors.get(self.reference_name or "")
        texts = tuple(pr.text for pr in probes)
        if self.space is not None:
            index = {t: i for i, t in enumerate(self.space.probe_texts)}
            ref = ProbeVectors(
                {
                    (n, i): self.space.rows[(n, index[t])]
                    for i, t in enumerate(texts)
                    for n in prompt_names
                    if (n, index.get(t, -1)) in self.space.rows
                },
                [],
                set(),
            )
            report.reference = f"space {self.space.space_id}"
            ref_state = self._helper(vectors, ref)
            ref = self._pinned_traffic(vectors, ref)
        elif isinstance(ref, ProbeVectors) and ref_state is not None:
            report.reference = self.reference_name
            self.traffic_judged = self.reference_name not in self._distrusted
            # The built-in probes only: traffic texts change from check to check.
            builtin = ref.only(self.builtin_probes)
            self.recording = RecordedReference(
                ref_state.backend.name, texts[: self.builtin_probes], builtin, time.time()
            )
        elif (
            (rec := self.recorded) is not None
            and rec.backend == self.reference_name
            and rec.probe_texts == texts[: self.builtin_probes]
        ):
            ref = rec.vectors
            report.reference = self.reference_name
            when = time.strftime("%H:%M:%S", time.localtime(rec.recorded_at))
            report.findings.append(
                Finding(
                    rec.backend,
                    "recorded_reference",
                    "info",
                    f"the reference could not be embedded now; the others are judged against its vectors "
                    f"recorded at {when}",
                )
            )
        for st in self.states:
            name = st.backend.name
            res = vectors[name]
            if self.only is not None and name not in self.only and name != self.reference_name:
                continue  # not part of this (partial) check
            if isinstance(res, BackendError):
                report.backends.append(self._failed(st, res, report))
                continue
            norms = (round(min(res.norms), 4), round(max(res.norms), 4)) if res.norms else None
            dim = next(iter(res.rows.values())).shape[0] if res.rows else None
            if name == self.reference_name:
                report.backends.append(BackendResult(name, st.backend.kind, Verdict.REFERENCE, 1.0, 1.0, dim, norms))
            elif not isinstance(ref, ProbeVectors) or (ref_state is None and self.space is None):
                err = "the reference could not be checked, so this backend cannot be verified"
                report.backends.append(
                    BackendResult(name, st.backend.kind, Verdict.ERROR, dimension=dim, norm_range=norms, error=err)
                )
            else:
                report.backends.append(
                    await self._judge(st, res, ref, probes, prompt_names, report, ref_state, norms, dim)
                )
            if norms and (norms[0] < 0.98 or norms[1] > 1.02):
                report.findings.append(
                    Finding(
                        name,
                        "normalization",
                        "info",
                        f"returns unnormalized vectors (norms {norms[0]} to {norms[1]}); the gateway "
                        "L2-normalizes every vector, so this alone does not change the space",
                    )
                )
        for f in report.findings:  # metadata that disagrees while the vectors agree: worth a look, no more
            judged = report.result(f.backend)
            if f.severity == "error" and f.kind in ("dimension", "pooling") and judged and judged.verdict.compatible:
                f.severity = "warning"
                f.message += " (but its vectors agree with the reference, so it stays in service)"
        for b in report.backends:
            b.batch_cosine = batch_cosines.get(b.name)
        report.matrix_names = [st.backend.name for st in self.states]
        report.matrix = [
            [self._pair_min(vectors[a], vectors[b]) for b in report.matrix_names] for a in report.matrix_names
        ]
        report.duration_ms = round((time.perf_counter() - started) * 1000, 1)
        return report

    async def _batch_cosine(
        self, st: BackendState, res: ProbeVectors | BackendError, probes: list[Probe]
    ) -> float | None:
        """The first short probe embedded alone against its vector from the probe batch (it came in a call with
        other probes): whether the backend's vectors depend on what else is in the batch (vLLM #15393)."""
        if not isinstance(res, ProbeVectors) or (st.batch_limit() or 2) < 2:
            return None
        pname = next(iter(self.profile.prompts), None)
        key = (pname, 0)
        if probes[0].long or key not in res.rows:
            return None
        prefix = self.profile.prompts.get(pname, "") if pname else ""
        try:
            alone = (await self.io.embed(st, [self.io.send(st, prefix, probes[0].text)], pname))[0]
        except BackendError:
            return None
        return round(float(alone @ res.rows[key]) / float(np.linalg.norm(alone)), 6)

    def _helper(self, vectors: dict[str, ProbeVectors | BackendError], space: ProbeVectors) -> BackendState | None:
        """Against a pinned space: a backend that agrees with it, to re-embed prompt variants when
        diagnosing another one (there is no live reference)."""
        for st in self.states:
            res = vectors.get(st.backend.name)
            if isinstance(res, ProbeVectors):
                cos = cosines(res, space)
                if cos and min(cos.values()) >= self.profile.agree_cosine:
                    return st
        return None

    def _pinned_traffic(self, vectors: dict[str, ProbeVectors | BackendError], space: ProbeVectors) -> ProbeVectors:
        """A pinned space holds no vectors of client texts: their truth is what the backends that agree with the
        space make of them (the largest group that agrees, a backend that failed a live audit never the truth).
        They judge a backend only when two or more stand behind them, or it failed a live audit."""
        n = self.builtin_probes
        supporters = {}
        for st in self.states:
            res = vectors.get(st.backend.name)
            if st.shadow or st.backend.name in self._distrusted or not isinstance(res, ProbeVectors):
                continue
            cos = cosines(res.only(n), space)
            if cos and min(cos.values()) >= self.profile.agree_cosine:
                supporters[st.backend.name] = {k: v for k, v in res.rows.items() if k[1] >= n}
        self._majority_backed = False
        if not supporters or not self._traffic:
            return space
        elected = majority(supporters, [st.backend.name for st in self.states], self.profile.agree_cosine)
        assert elected.truth is not None
        self._majority_backed = len(elected.groups[0]) >= 2
        self.traffic_judged = True
        return ProbeVectors({**space.rows, **supporters[elected.truth]}, [], set())

    def _elect(self, vectors: dict[str, ProbeVectors | BackendError], report: Report) -> None:
        """Unpinned: the largest group of backends that agree with each other defines the space, not the
        first backend (see judge.py). A preferred reference outvoted is judged like any other backend."""
        rows = {
            st.backend.name: res.rows
            for st in self.states
            if isinstance(res := vectors.get(st.backend.name), ProbeVectors) and not st.shadow
        }
        if not rows:
            return
        names = [st.backend.name for st in self.states]
        preferred = self.reference_name
        if preferred not in rows and self.recorded is not None and self.recorded.backend == preferred:
            # The reference is down but its vectors are recorded: the others are judged against those. A
            # backend never verified must not become the truth just by being the one still up.
            return
        preference = ([preferred] if preferred else []) + [n for n in names if n != preferred]
        preference = [n for n in preference if n not in self._distrusted] + [
            n for n in preference if n in self._distrusted
        ]
        elected = majority(rows, preference, self.profile.agree_cosine, self.diagnosis.token_match())
        report.groups = elected.groups
        self._majority_backed = len(elected.groups[0]) >= 2
        if elected.truth is not None and elected.truth != preferred:
            if preferred in rows:
                why = (
                    f"the group {elected.groups[0]} agrees with each other"
                    if len(elected.groups[0]) > 1
                    else "its tokenization matches the model's tokenizer where they differ"
                )
                report.findings.append(
                    Finding(
                        preferred,
                        "majority",
                        "warning",
                        f"was the reference, but {elected.truth} defines the space now: {why}; "
                        f"{preferred} is judged like any other backend",
                    )
                )
            self.reference_name = elected.truth

    async def probe_vectors(self, st: BackendState, probes: list[Probe]) -> ProbeVectors | BackendError:
        """The probe set embedded on one backend, for each of the model's prompts (to record a space)."""
        return await self.io.vectors(st, probes, list(self.profile.prompts) or [None])

    # -- judging ---------------------------------------------------------------------------------
    def _pair_min(self, a: ProbeVectors | BackendError, b: ProbeVectors | BackendError) -> float | None:
        if not isinstance(a, ProbeVectors) or not isinstance(b, ProbeVectors):
            return None
        cos = cosines(a, b)
        return round(min(cos.values()), 6) if cos else None

    def _failed(self, st: BackendState, exc: BackendError, report: Report) -> BackendResult:
        name = st.backend.name
        if isinstance(exc, BadBackendOutput) and "dimension" in exc.message:
            report.findings.append(Finding(name, "dimension", "error", exc.message))
            return BackendResult(name, st.backend.kind, Verdict.DISAGREE, error=exc.message)
        report.findings.append(Finding(name, "unavailable", "error", f"could not be checked: {exc.message}"))
        return BackendResult(name, st.backend.kind, Verdict.ERROR, error=exc.message)

    async def _judge(
        self,
        st: BackendState,
        res: ProbeVectors,
        ref: ProbeVectors,
        probes: list[Probe],
        prompt_names: list[str | None],
        report: Report,
        ref_state: BackendState | None,
        norms: tuple[float, float] | None,
        dim: int | None,
    ) -> BackendResult:
        p, name = self.profile, st.backend.name
        if name not in self._distrusted and not self._majority_backed:
            # Client texts judge a backend only when a majority (two or more that agree) stands behind the
            # truth, or it already failed a live audit: with two backends a disagreement on a client text
            # does not say which one is wrong, and the first by priority must not win it by default.
            res = res.only(self.builtin_probes)
        cos = cosines(res, ref)
        worst_key = min(cos, key=lambda k: cos[k])
        lo, mean = min(cos.values()), float(np.mean(list(cos.values())))
        worst = probes[worst_key[1]].name + (f" ({worst_key[0]})" if worst_key[0] else "")
        result = BackendResult(name, st.backend.kind, Verdict.AGREE, round(lo, 6), round(mean, 6), dim, norms, worst)
        for (_, i), c in cos.items():
            key = probes[i].name
            result.per_probe[key] = round(min(c, result.per_probe.get(key, 1.0)), 6)
        for i in sorted(res.rejected - ref.rejected):
            report.findings.append(
                Finding(
                    name,
                    "input_limit",
                    "info",
                    f"rejects probe '{probes[i].name}' that the reference embeds: its input limit is lower",
                )
            )
        matches = self.diagnosis.token_match()
        # Its tokens differing from the model's are evidence only where the truth's do not differ too.
        truth_tokens = matches.get(ref_state.backend.name, {}) if ref_state is not None and self.space is None else {}
        mine = {i: ok for i, ok in matches.get(name, {}).items() if ok or truth_tokens.get(i) is not False}
        judged = judge_probes(res.rows, ref.rows, probes, p.agree_cosine, p.warn_cosine, mine)
        result.per_group = judged.group_min
        if not judged.bad and lo >= p.warn_cosine:
            return result
        if not judged.bad:
            result.verdict = Verdict.DRIFT
            report.findings.append(
                Finding(
                    name,
                    "precision_drift",
                    "info",
                    f"min cosine {lo:.5f} (mean {mean:.5f}): within the warn band, numerical precision "
                    "(f16/bf16/quantization); still the same space",
                )
            )
            return result
        story = self.diagnosis.token_story(name, judged.bad, probes)
        groups = sorted({g for i in judged.bad for g in probe_groups(probes[i])[1:]})
        where = ", ".join(f"{probes[i].name} {result.per_probe[probes[i].name]:.5f}" for i in judged.bad)
        if judged.excluded is not None:
            restrict = self.on_partial == "restrict"
            result.verdict = Verdict.RESTRICTED if restrict else Verdict.DISAGREE
            result.excluded_scripts = sorted(judged.excluded) if restrict else []
            outcome = (
                "it serves texts without these scripts; requests with them go to backends that agree"
                if restrict
                else 'quarantined (on_partial_disagreement = "quarantine")'
            )
            report.findings.append(
                Finding(
                    name,
                    "partial_disagreement",
                    "warning" if restrict else "error",
                    f"disagrees on {', '.join(groups)} only ({where}); every other probe group agrees"
                    + (f": {story}" if story else "")
                    + f"; {outcome}",
                )
            )
            return result
        result.verdict = Verdict.DISAGREE
        found = await self.diagnosis.diagnose(st, res, ref_state, cos, probes, prompt_names, report, lo, mean)
        judged_probes = len({i for _, i in cos})
        if [f.kind for f in found] == ["different_model"] and len(judged.bad) * 2 < judged_probes:
            # Most groups agree: not "another model" but something about these texts.
            found = [
                Finding(
                    name,
                    "partial_disagreement",
                    "error",
                    f"disagrees on {', '.join(groups)} ({where}) while the other probes agree"
                    + (f": {story}" if story else "")
                    + "; quarantined: these are not texts the gateway can route around",
                )
            ]
        report.findings += found
        return result
