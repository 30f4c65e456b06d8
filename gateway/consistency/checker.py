"""One agreement check of one model's backends against its reference.

static      each backend's own metadata (TEI /info, llama.cpp /props, ES endpoint settings)
            against the profile: dimension, pooling, input limit
probes      the built-in probe set through every backend via the canonical pipeline (prompt
            applied per backend mode, then L2-normalized), for each of the model's prompts
compare     per pair and per probe: cosine; min/mean; raw norms; a pairwise min-cosine matrix
diagnose    dimension; prompt missing, doubled or wrong (the reference re-embeds each variant:
            the one that matches names the cause); truncation (only long probes disagree);
            pooling (reported by the backend, or reproduced from the GGUF); normalization;
            precision drift; otherwise a different model
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backends.base import BackendInfo, Embeddings
from backends.errors import (
    BackendError,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    BadBackendOutput,
    InputRejected,
    PayloadTooLarge,
)
from config.profiles import ModelProfile
from gateway.calls import BackendCalls, Purpose
from gateway.consistency.judge import judge_probes, majority, probe_groups
from gateway.consistency.pooling import POOLINGS, reproduce
from gateway.consistency.probes import Probe, limit_probes, probe_set
from gateway.consistency.report import BackendResult, Finding, Report, Verdict
from gateway.consistency.space import Space
from gateway.errors import DeadlineExceeded
from gateway.metrics import Metrics
from gateway.resilience.deadline import Deadline
from gateway.state import BackendState
from gateway.tokens import ModelTokenizer

log = logging.getLogger(__name__)


# Checks are not latency-critical: on a busy machine a verdict late beats no verdict ("could not be
# checked"). Generous timeouts, and retries of transient failures before giving up on a backend.
_CALL_TIMEOUT_S = 60.0
_DESCRIBE_TIMEOUT_S = 15.0
_ATTEMPTS = 3
_CHUNK = 16


@dataclass
class _Vectors:
    """One backend's unit vectors per (prompt name, probe index); raw norms; rejected probes."""

    rows: dict[tuple[str | None, int], np.ndarray]
    norms: list[float]
    rejected: set[int]


@dataclass(frozen=True)
class RecordedReference:
    """The reference's probe vectors from its last live check: what a backend is judged against while
    the reference itself is down (so a healthy, identical fallback can still be verified)."""

    backend: str
    probe_texts: tuple[str, ...]
    vectors: _Vectors
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
        self._majority_backed = True  # pinned or partial checks: the truth is not a bare preference
        self.model = model
        self.on_partial = on_partial  # "restrict" | "quarantine": a backend wrong on a few scripts only
        # (backend, probe index) -> (its tokens, the model tokenizer's) for probes in dispute
        self._tokens: dict[tuple[str, int], tuple[int, int]] = {}
        self.tokenizer = tokenizer  # the model's: probes at its limit, and where a backend truncates
        self.profile = profile
        self.states = sorted(states, key=lambda st: st.backend.priority)
        self.reference_name = reference or (self.states[0].backend.name if self.states else None)
        self.gguf = gguf
        self.calls = calls or BackendCalls({model: profile.dimension}, Metrics())
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
        described = await asyncio.gather(*(self._describe(st) for st in reachable))
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
        if self.space is None and self._probes is None:
            probes = probes + self._traffic
        report.probes = len(probes)
        for st, info in zip(self.states, infos, strict=True):
            report.findings += self._static(st, info)
        prompt_names: list[str | None] = list(p.prompts) or [None]
        vectors: dict[str, _Vectors | BackendError] = {}
        # A backend known to be down is not waited for: it is checked again when it recovers.
        down = BackendError("", "unhealthy: it will be checked when it recovers")
        live = [st for st in reachable if self.only is None or st.backend.name in self.only | {self.reference_name}]
        results = await asyncio.gather(*(self._vectors(st, probes, prompt_names) for st in live))
        for st in self.states:
            # Why it is down (a misconfiguration names its fix: "set remote_model", served ids...).
            vectors[st.backend.name] = (
                BackendError(st.backend.name, f"unhealthy: {st.last_error}")
                if (st.unreachable and st.last_error)
                else down
            )
        for st, res in zip(live, results, strict=True):
            vectors[st.backend.name] = res
        if self.only is None:
            await self._token_evidence(live, vectors, probes, prompt_names)
            if self.space is None:
                self._elect(vectors, report)
        ref_state = next((st for st in self.states if st.backend.name == self.reference_name), None)
        ref = vectors.get(self.reference_name or "")
        texts = tuple(pr.text for pr in probes)
        if self.space is not None:
            index = {t: i for i, t in enumerate(self.space.probe_texts)}
            ref = _Vectors(
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
        elif isinstance(ref, _Vectors) and ref_state is not None:
            report.reference = self.reference_name
            n = self.builtin_probes  # the built-in probes only: traffic texts change from check to check
            builtin = _Vectors({k: v for k, v in ref.rows.items() if k[1] < n}, ref.norms, ref.rejected)
            self.recording = RecordedReference(ref_state.backend.name, texts[:n], builtin, time.time())
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
            elif not isinstance(ref, _Vectors) or (ref_state is None and self.space is None):
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
        report.matrix_names = [st.backend.name for st in self.states]
        report.matrix = [
            [self._pair_min(vectors[a], vectors[b]) for b in report.matrix_names] for a in report.matrix_names
        ]
        report.duration_ms = round((time.perf_counter() - started) * 1000, 1)
        return report

    def _helper(self, vectors: dict[str, _Vectors | BackendError], space: _Vectors) -> BackendState | None:
        """Against a pinned space: a backend that agrees with it, to re-embed prompt variants when
        diagnosing another one (there is no live reference)."""
        for st in self.states:
            res = vectors.get(st.backend.name)
            if isinstance(res, _Vectors):
                cos = self._cosines(res, space)
                if cos and min(cos.values()) >= self.profile.agree_cosine:
                    return st
        return None

    def _elect(self, vectors: dict[str, _Vectors | BackendError], report: Report) -> None:
        """Unpinned: the largest group of backends that agree with each other defines the space, not the
        first backend (see judge.py). A preferred reference outvoted is judged like any other backend."""
        rows = {
            st.backend.name: res.rows
            for st in self.states
            if isinstance(res := vectors.get(st.backend.name), _Vectors) and not st.shadow
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
        elected = majority(rows, preference, self.profile.agree_cosine, self._token_match())
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

    def _token_match(self) -> dict[str, dict[int, bool]]:
        out: dict[str, dict[int, bool]] = {}
        for (name, i), (mine, model) in self._tokens.items():
            out.setdefault(name, {})[i] = mine == model
        return out

    async def _token_evidence(
        self,
        live: list[BackendState],
        vectors: dict[str, _Vectors | BackendError],
        probes: list[Probe],
        prompt_names: list[str | None],
    ) -> None:
        """Short probes in dispute (some pair, or some backend and the pinned space, below warn_cosine):
        how many tokens each backend with a tokenize route makes of them, and the model's tokenizer."""
        if self.tokenizer is None:
            return
        results = {st.backend.name: v for st in live if isinstance(v := vectors.get(st.backend.name), _Vectors)}
        sides = list(results.values())
        if self.space is not None:
            sides.append(_Vectors({k: v for k, v in self.space.rows.items() if k[1] < len(probes)}, [], set()))
        disputed: dict[int, str | None] = {}
        for a_i, a in enumerate(sides):
            for b in sides[a_i + 1 :]:
                for (pname, i), c in self._cosines(a, b).items():
                    if c < self.profile.warn_cosine and not probes[i].long:
                        disputed.setdefault(i, pname)
        for i, pname in sorted(disputed.items())[:8]:
            prefix = self.profile.prompts.get(pname, "") if pname else ""
            text = prefix + probes[i].text
            model = self.tokenizer.counts([text])[0]
            for st in live:
                if st.backend.name not in results:
                    continue
                try:
                    async with asyncio.timeout(_DESCRIBE_TIMEOUT_S):
                        ids = await st.backend.tokenize(text)
                except (BackendError, TimeoutError, ValueError, KeyError, TypeError):
                    ids = None
                if ids is not None:
                    self._tokens[(st.backend.name, i)] = (len(ids), model)

    def _token_story(self, name: str, bad: list[int], probes: list[Probe]) -> str:
        """'tokenization differs on Hangul: 12 tokens vs 24 in the model's tokenizer (sunset-ko)' for each
        disagreeing probe where the backend's tokens differ from the model's."""
        parts = []
        for i in bad:
            counts = self._tokens.get((name, i))
            if counts is not None and counts[0] != counts[1]:
                where = ", ".join(probe_groups(probes[i])[1:])
                parts.append(
                    f"tokenization differs on {where}: {counts[0]} tokens vs {counts[1]} in the model's tokenizer "
                    f"({probes[i].name})"
                )
        return "; ".join(parts)

    # -- gathering -------------------------------------------------------------------------------
    async def _describe(self, st: BackendState) -> BackendInfo | None:
        try:
            async with asyncio.timeout(_DESCRIBE_TIMEOUT_S):
                info = await st.backend.describe()
            st.learn(info)
            return info
        except (BackendError, TimeoutError):
            return st.info

    def _static(self, st: BackendState, info: BackendInfo | None) -> list[Finding]:
        if info is None:
            return []
        p, name, out = self.profile, st.backend.name, []
        if info.dimension is not None and info.dimension != p.dimension:
            out.append(
                Finding(
                    name,
                    "dimension",
                    "error",
                    f"reports dimension {info.dimension}; the model profile says {p.dimension}",
                )
            )
        if info.pooling is not None and info.pooling != p.pooling:
            out.append(
                Finding(
                    name, "pooling", "error", f"reports pooling '{info.pooling}'; the model profile says '{p.pooling}'"
                )
            )
        if info.max_input_tokens is not None and info.max_input_tokens < p.max_input_tokens:
            out.append(
                Finding(
                    name,
                    "input_limit",
                    "info",
                    f"accepts at most {info.max_input_tokens} tokens per input (profile: {p.max_input_tokens}); longer "
                    "inputs are rejected there and served by another backend",
                )
            )
        return out

    async def _embed(self, st: BackendState, texts: list[str], prompt_name: str | None) -> np.ndarray:
        """Raw vectors of `texts` (prompt already applied as the backend expects), checked for shape."""
        size = min(_CHUNK, st.batch_limit() or _CHUNK)
        parts = []
        i = 0
        while i < len(texts):
            chunk = texts[i : i + size]
            try:
                out = await self._call(st, chunk, prompt_name)
            except PayloadTooLarge:
                if size == 1:
                    raise
                size = max(1, size // 2)  # its limit is lower than it said: smaller batches
                continue
            parts.append(out.vectors.astype(np.float64))
            i += len(chunk)
        return np.concatenate(parts)

    async def _vectors(
        self, st: BackendState, probes: list[Probe], prompt_names: list[str | None]
    ) -> _Vectors | BackendError:
        rows: dict[tuple[str | None, int], np.ndarray] = {}
        norms: list[float] = []
        rejected: set[int] = set()
        try:
            for pname in prompt_names:
                prefix = self.profile.prompts.get(pname, "") if pname else ""
                short = [i for i, pr in enumerate(probes) if not pr.long]
                texts = [self._send(st, prefix, probes[i].text) for i in short]
                for i, v in zip(short, await self._embed(st, texts, pname), strict=True):
                    rows[(pname, i)] = v
                for i in (i for i, pr in enumerate(probes) if pr.long):
                    declared, tokens = st.input_limit(), probes[i].tokens
                    if tokens and declared and tokens > declared:
                        continue  # longer than it declares it takes: it is never sent such inputs
                    try:
                        rows[(pname, i)] = (await self._embed(st, [self._send(st, prefix, probes[i].text)], pname))[0]
                    except InputRejected:
                        if not tokens:  # at the limit exactly a refusal says nothing new (how it counts)
                            rejected.add(i)  # a limit, not a disagreement: such inputs go elsewhere
        except BackendError as exc:
            return exc
        except TimeoutError:
            return BackendError(st.backend.name, "timed out during the agreement check")
        for key, v in rows.items():
            n = float(np.linalg.norm(v))
            norms.append(n)
            rows[key] = v / n
        return _Vectors(rows, norms, rejected)

    async def probe_vectors(self, st: BackendState, probes: list[Probe]) -> _Vectors | BackendError:
        """The probe set embedded on one backend, for each of the model's prompts (to record a space)."""
        return await self._vectors(st, probes, list(self.profile.prompts) or [None])

    @staticmethod
    def _send(st: BackendState, prefix: str, text: str) -> str:
        return text if st.backend.applies_prompt else prefix + text

    async def _call(self, st: BackendState, texts: list[str], prompt_name: str | None) -> Embeddings:
        """One checked call through the guarded path (nothing recorded against the backend), retried."""
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                return await self.calls.embed(
                    st,
                    texts,
                    prompt_name,
                    deadline=Deadline(_CALL_TIMEOUT_S),
                    purpose=Purpose.CHECK,
                    timeout_s=_CALL_TIMEOUT_S,
                )
            except DeadlineExceeded as exc:
                raise BackendTimeout(st.backend.name, f"no answer within {_CALL_TIMEOUT_S:g}s") from exc
            except BackendError as exc:
                # Refused connections, 503s and 429s pass on a busy machine; a wrong answer does not.
                transient = isinstance(exc, (BackendUnavailable, BackendOverloaded)) and not isinstance(
                    exc, BackendTimeout
                )
                if not transient or attempt == _ATTEMPTS:
                    raise
                await asyncio.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    # -- judging ---------------------------------------------------------------------------------
    @staticmethod
    def _cosines(a: _Vectors, b: _Vectors) -> dict[tuple[str | None, int], float]:
        return {k: float(a.rows[k] @ b.rows[k]) for k in a.rows.keys() & b.rows.keys()}

    def _pair_min(self, a: _Vectors | BackendError, b: _Vectors | BackendError) -> float | None:
        if not isinstance(a, _Vectors) or not isinstance(b, _Vectors):
            return None
        cos = self._cosines(a, b)
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
        res: _Vectors,
        ref: _Vectors,
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
            n = self.builtin_probes
            res = _Vectors({k: v for k, v in res.rows.items() if k[1] < n}, res.norms, res.rejected)
        cos = self._cosines(res, ref)
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
        matches = self._token_match()
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
        story = self._token_story(name, judged.bad, probes)
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
        found = await self._diagnose(st, res, ref_state, cos, probes, prompt_names, report, lo, mean)
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

    async def _truncation_point(
        self,
        st: BackendState,
        res: _Vectors,
        ref_state: BackendState,
        cos: dict[tuple[str | None, int], float],
        probes: list[Probe],
    ) -> int | None:
        """Where a backend cuts inputs it does not declare it cuts: its vector of the at-limit probe against
        the reference's vectors of that probe cut at likely limits (the model's tokenizer cuts them)."""
        if self.tokenizer is None:
            return None
        bad = [(pn, i) for (pn, i), c in cos.items() if probes[i].name == "at-limit" and c < self.profile.agree_cosine]
        if not bad:
            return None
        pname, i = bad[0]
        prefix = self.profile.prompts.get(pname, "") if pname else ""
        total = probes[i].tokens or 0
        candidates = [n for n in (32, 64, 128, 192, 256, 384, 512, 1024) if n < total]
        if not candidates:
            return None
        cut = [self.tokenizer.fit(prefix, [probes[i].text], n, "right").texts[0] for n in candidates]
        try:
            ref = await self._embed(ref_state, [self._send(ref_state, prefix, t) for t in cut], pname)
        except BackendError:
            return None
        scores = ref @ res.rows[(pname, i)]
        best = int(np.argmax(scores))
        return candidates[best] if float(scores[best]) >= self.profile.warn_cosine else None

    async def _diagnose(
        self,
        st: BackendState,
        res: _Vectors,
        ref_state: BackendState | None,
        cos: dict[tuple[str | None, int], float],
        probes: list[Probe],
        prompt_names: list[str | None],
        report: Report,
        lo: float,
        mean: float,
    ) -> list[Finding]:
        p, name = self.profile, st.backend.name
        if any(f.backend == name and f.kind in ("dimension",) for f in report.findings):
            return []
        # Prompt: re-embed on the reference each way the prompt could have gone wrong.
        if p.prompts and ref_state is not None and ref_state is not st and not ref_state.backend.applies_prompt:
            found = await self._prompt_variants(st, res, ref_state, probes, prompt_names)
            if found:
                return found
        # Truncation: short probes agree, only long ones do not.
        short = [c for (pn, i), c in cos.items() if not probes[i].long]
        long_bad = [probes[i].name for (pn, i), c in cos.items() if probes[i].long and c < p.agree_cosine]
        if short and min(short) >= p.agree_cosine and long_bad and ref_state is not None:
            at = await self._truncation_point(st, res, ref_state, cos, probes)
            if at is not None:
                return [
                    Finding(
                        name,
                        "truncation",
                        "error",
                        f"truncation at {at} tokens: its vectors for inputs at the model's limit "
                        f"({p.max_input_tokens} tokens) are the model's vectors of their first {at} tokens, "
                        "although it does not declare that limit; long texts would land elsewhere in the space",
                    )
                ]
        if short and min(short) >= p.agree_cosine and long_bad:
            return [
                Finding(
                    name,
                    "truncation",
                    "error",
                    f"short probes agree (min {min(short):.5f}) but long ones do not "
                    f"({', '.join(sorted(set(long_bad)))}): it truncates long inputs differently (e.g. TEI "
                    "auto-truncate), so long texts would land elsewhere in the space",
                )
            ]
        # Pooling: reported by the backend, or reproduced from the model's GGUF.
        static = [f for f in report.findings if f.backend == name and f.kind == "pooling"]
        if static:
            return [
                Finding(name, "pooling", "error", static[0].message + f"; its vectors disagree (min cosine {lo:.5f})")
            ]
        if self.gguf is not None:
            found_pooling = await self._reproduce_pooling(res, probes, prompt_names)
            if found_pooling:
                pooling, score = found_pooling
                return [
                    Finding(
                        name,
                        "pooling",
                        "error",
                        f"pools with '{pooling}' (its vectors match the model pooled with '{pooling}' at min cosine "
                        f"{score:.5f}); the model profile says '{p.pooling}' — start it with --pooling {p.pooling}",
                    )
                ]
        hint = (
            ""
            if self.gguf
            else " (or another pooling: llama.cpp does not report its pooling; set the model's reference_gguf "
            "so the checker can tell)"
        )
        if lo < p.error_cosine:
            return [
                Finding(
                    name,
                    "different_model",
                    "error",
                    f"vectors disagree on every kind of probe (min cosine {lo:.5f}, mean {mean:.5f}) and no prompt, "
                    f"truncation or pooling variant explains it: a different model or different weights with the same "
                    f"dimension{hint}",
                )
            ]
        return [
            Finding(
                name,
                "different_model",
                "warning",
                f"min cosine {lo:.5f} (mean {mean:.5f}) is below the agreement threshold {p.agree_cosine} but above "
                f"{p.error_cosine}: a coarser quantization or a slightly different model{hint}",
            )
        ]

    async def _prompt_variants(
        self,
        st: BackendState,
        res: _Vectors,
        ref_state: BackendState,
        probes: list[Probe],
        prompt_names: list[str | None],
    ) -> list[Finding]:
        p = self.profile
        short = [i for i, pr in enumerate(probes) if not pr.long]
        for pname in prompt_names:
            if pname is None:
                continue
            prefix = p.prompts[pname]
            variants = {"prompt_missing": "", "prompt_doubled": prefix + prefix}
            variants.update({f"prompt_wrong:{other}": pre for other, pre in p.prompts.items() if other != pname})
            for kind, pre in variants.items():
                try:
                    vecs = await self._embed(ref_state, [pre + probes[i].text for i in short], None)
                except BackendError:
                    return []
                vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
                score = min(float(vecs[j] @ res.rows[(pname, i)]) for j, i in enumerate(short))
                if score >= p.agree_cosine:
                    return [self._prompt_finding(st, kind, pname, prefix, score)]
        return []

    def _prompt_finding(self, st: BackendState, kind: str, pname: str, prefix: str, score: float) -> Finding:
        name, backend = st.backend.name, st.backend
        if kind == "prompt_doubled":
            why = (
                'TEI must run without --default-prompt/--default-prompt-name when prompt_mode = "gateway"'
                if backend.kind == "tei"
                else "the backend adds the prompt and so does the gateway"
            )
            msg = (
                f"applies the '{pname}' prompt twice ({prefix!r} + {prefix!r} + text matches at min cosine "
                f"{score:.5f}): {why}"
            )
            return Finding(name, "prompt_doubled", "error", msg)
        if kind == "prompt_missing":
            why = {
                "elastic": "the inference service does not apply the prompt for this input_type; check input_types",
                "tei": 'TEI in prompt_mode = "backend" lacks this prompt in its prompts',
            }.get(backend.kind, "no prompt reaches the model")
            msg = f"applies no prompt for '{pname}' (the bare text matches at min cosine {score:.5f}): {why}"
            return Finding(name, "prompt_missing", "error", msg)
        other = kind.split(":", 1)[1]
        msg = f"applies the '{other}' prompt where '{pname}' was asked for (matches at min cosine {score:.5f})"
        return Finding(name, "prompt_wrong", "error", msg)

    async def _reproduce_pooling(
        self, res: _Vectors, probes: list[Probe], prompt_names: list[str | None]
    ) -> tuple[str, float] | None:
        assert self.gguf is not None
        pname = prompt_names[0]
        prefix = self.profile.prompts.get(pname, "") if pname else ""
        short = [i for i, pr in enumerate(probes) if not pr.long]
        for pooling in (x for x in POOLINGS if x != self.profile.pooling):
            try:
                vecs = await reproduce(self.gguf, pooling, [prefix + probes[i].text for i in short])
            except Exception as exc:  # a scratch server that will not start must not break the check
                log.warning("could not reproduce pooling %s from %s: %s", pooling, self.gguf, exc)
                return None
            score = min(float(vecs[j] @ res.rows[(pname, i)]) for j, i in enumerate(short))
            if score >= self.profile.agree_cosine:
                return pooling, score
        return None
