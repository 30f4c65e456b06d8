"""Enforcement: run the checker at start-up, periodically and after a backend recovers; keep the
compatible set of each model to the reference and the backends that agree with it.

A disagreeing backend leaves the set until it passes again. When the reference is unavailable, the
others are judged against the reference's probe vectors recorded at its last live check, so a healthy
fallback that produces the same vectors is still admitted; a disagreeing backend never becomes the
reference by default.

Failover never waits for the next scheduled check: when every compatible backend of a model fails and
a healthy backend is still pending verification, the request starts (or joins) a check of that backend
within its own deadline and is served by it if it agrees (`rescue`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from config.profiles import ModelProfile
from config.settings import ConsistencySettings
from gateway.calls import BackendCalls
from gateway.consistency.checker import Checker, RecordedReference
from gateway.consistency.probes import Probe
from gateway.consistency.records import SpaceRecords
from gateway.consistency.report import Finding, Report, Verdict
from gateway.consistency.scripts import SCRIPTS
from gateway.consistency.space import Space, live_space_id
from gateway.metrics import Metrics
from gateway.resilience.deadline import Deadline
from gateway.state import BackendState
from gateway.tasks import cancel_all
from gateway.tokens import ModelTokenizer

log = logging.getLogger(__name__)

_GATE_PROBES = 3  # short probes embedded before a recovered backend is admitted to a pinned space
_TRAFFIC = 4  # recent client texts (and texts a live audit failed on) each check includes


class ConsistencyService:
    def __init__(
        self,
        settings: ConsistencySettings,
        profiles: dict[str, ModelProfile],
        states: Sequence[BackendState],
        references: dict[str, str | None],
        gguf_for: Callable[[str], Path | None] = lambda _model: None,
        calls: BackendCalls | None = None,
        spaces: dict[str, Space] | None = None,
        metrics: Metrics | None = None,
        on_verdicts: Callable[[], None] = lambda: None,
        tokenizers: dict[str, ModelTokenizer | None] | None = None,
        on_partial: dict[str, str] | None = None,
        records: SpaceRecords | None = None,
    ) -> None:
        self._records = records  # auto-recorded spaces: one id per space across restarts and replicas
        self.settings = settings
        self._on_partial = on_partial or {}
        self._tokenizers = tokenizers or {}
        self._on_verdicts = on_verdicts  # e.g. the cache drops what a quarantined backend produced
        self.profiles = profiles
        self.references = references
        self._gguf_for = gguf_for
        self._by_model: dict[str, list[BackendState]] = {}
        for st in states:
            self._by_model.setdefault(st.backend.model, []).append(st)
        self.reports: dict[str, Report] = {}
        self._locks = {m: asyncio.Lock() for m in self._by_model}
        self._tasks: list[asyncio.Task[None]] = []
        self._wanted: dict[str, asyncio.Event] = {m: asyncio.Event() for m in self._by_model}
        self._bootstrapped: dict[str, asyncio.Event] = {m: asyncio.Event() for m in self._by_model}
        self._anchor: dict[str, str] = {}
        self._calls = calls
        self._recorded: dict[str, RecordedReference] = {}
        self._live_ids: dict[str, str] = {}  # model -> id of the space its live reference produces
        self._rescues: dict[str, asyncio.Task[None]] = {}
        self.errors: dict[str, str] = {}  # model -> why its last check failed outright (shown in /v1/backends)
        self.spaces = spaces or {}  # pinned spaces by model
        self.drifted: dict[str, str] = {}  # model -> what happened, while every backend left its pinned space
        self._metrics = metrics
        self._gates: dict[str, asyncio.Task[None]] = {}
        self._exported_scripts: set[tuple[str, str, str]] = set()  # series once set, kept at 0 after
        # Live-traffic evidence, in memory only (never logged): a few recent texts and the texts a backend
        # failed a live audit on go into every check; a backend that failed one is never the truth.
        self._traffic: dict[str, deque[str]] = {m: deque(maxlen=_TRAFFIC) for m in self._by_model}
        self._suspect_texts: dict[str, deque[str]] = {m: deque(maxlen=_TRAFFIC) for m in self._by_model}
        self._distrusted: dict[str, set[str]] = {m: set() for m in self._by_model}
        for group in self._by_model.values():
            for st in group:
                st.agreement = Verdict.PENDING if settings.enabled else Verdict.UNCHECKED

    def reference(self, model: str) -> str | None:
        """The backend that defines the model's space (for display; checks choose it afresh)."""
        return self.references.get(model) or self._anchor.get(model) or self._choose_reference(model)

    def _choose_reference(self, model: str) -> str | None:
        """The configured reference; else the current one while it works; else a verified backend
        (it agrees with the old reference, so the space stays the same); at start-up only, the first
        working backend by priority. A disagreeing or unverified backend never takes over later."""
        configured = self.references.get(model)
        if configured:
            return configured
        # A shadow is compared, never trusted: it never defines the space.
        group = sorted((s for s in self._by_model.get(model, []) if not s.shadow), key=lambda st: st.backend.priority)

        def usable(st: BackendState) -> bool:
            return st.healthy is not False and st.agreement is not Verdict.DISAGREE

        current = self._anchor.get(model)
        if current is not None:
            st = next(s for s in group if s.backend.name == current)
            if usable(st):
                return current
            verified = [s for s in group if s.agreement.compatible and s is not st and usable(s)]
            return verified[0].backend.name if verified else current
        candidates = [s for s in group if usable(s)] or group
        return candidates[0].backend.name if candidates else None

    async def wait_bootstrap(self, model: str, timeout_s: float) -> None:
        """Requests that arrive before the model's first check wait for it (within their deadline)."""
        event = self._bootstrapped.get(model)
        if not self.settings.enabled or event is None or event.is_set():
            return  # the common case, kept cheap: this runs on every request
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=timeout_s)

    def space_id(self, model: str) -> str | None:
        """The space the model serves: the pinned one, else computed from its live reference's vectors."""
        if (space := self.spaces.get(model)) is not None:
            return space.space_id
        return self._live_ids.get(model)

    def unavailable_reason(self, model: str) -> str | None:
        """Why the model has no compatible backend, when there is more to say than "none in service"."""
        if model in self.drifted and self.settings.on_space_drift == "refuse":
            return self.drifted[model]
        return None

    def bootstrapped(self, model: str) -> bool:
        """The model's first agreement check has finished (so every agreeing backend can take over)."""
        event = self._bootstrapped.get(model)
        return not self.settings.enabled or event is None or event.is_set()

    def pending(self, model: str) -> list[str]:
        """Backends still waiting for their verdict (not those known to be down: they are failed, not pending)."""
        if not self.settings.enabled:
            return []
        return [
            st.backend.name
            for st in self._by_model.get(model, [])
            if st.agreement is Verdict.PENDING and st.healthy is not False and not st.shadow
        ]

    async def rescue(self, model: str, deadline: Deadline) -> bool:
        """Every compatible backend failed: verify healthy pending ones now, within `deadline`.

        True when the compatible set gained a backend (the caller tries again). Concurrent requests
        share one rescue check; a request that gives up leaves it running for the next one.
        """
        if not self.settings.enabled:
            return False
        group = self._by_model.get(model, [])
        candidates = {
            st.backend.name
            for st in group
            if st.agreement is Verdict.PENDING and st.healthy is not False and not st.shadow
        }
        if not candidates:
            return False
        before = {st.backend.name for st in self.members(model, group)}
        task = self._rescues.get(model)
        if task is None or task.done():
            task = asyncio.create_task(self._rescue_check(model, candidates), name=f"rescue-{model}")
            self._rescues[model] = task
        with contextlib.suppress(TimeoutError, Exception):
            await asyncio.wait_for(asyncio.shield(task), timeout=deadline.remaining())
        return bool({st.backend.name for st in self.members(model, group)} - before)

    async def _rescue_check(self, model: str, candidates: set[str]) -> None:
        try:
            report = await self.check(model, only=candidates)
            log.info("model %s: rescue check of %s: %s", model, sorted(candidates), report.summary())
        except Exception as exc:
            log.warning("model %s: rescue check failed: %s: %s", model, type(exc).__name__, exc)

    def members(self, model: str, group: list[BackendState]) -> list[BackendState]:
        """The router's view: who may produce this model's vectors right now."""
        group = [st for st in group if not st.shadow]  # a shadow never serves
        if not self.settings.enabled:
            return group
        if model in self.drifted and self.settings.on_space_drift == "warn":
            return group  # every backend left the pinned space: serve anyway, loudly (logged, metric)
        if self.settings.require_verification:
            return [st for st in group if st.agreement.compatible]
        return [st for st in group if st.agreement is not Verdict.DISAGREE]

    # -- live-traffic evidence ----------------------------------------------------------------------
    def observe_traffic(self, model: str, texts: list[str]) -> None:
        """A sampled request's text joins the next checks' probes (replacing an older one at random)."""
        sample = self._traffic.get(model)
        if sample is None or not texts:
            return
        text = random.choice(texts)
        if len(sample) == sample.maxlen:
            del sample[random.randrange(len(sample))]
        sample.append(text)

    def audit_failed(self, model: str, backend: str, cosine: float, text: str, compared_with: str) -> None:
        """A live audit found `backend`'s vector for a client's text away from the model's: quarantined now
        (its cache entries since its last pass dropped), and the text joins every check until it passes."""
        st = next((s for s in self._by_model.get(model, []) if s.backend.name == backend), None)
        if st is None or not self.settings.enabled:
            return
        message = (
            f"live audit: cos {cosine:.2f} on a {len(text)}-character text from client traffic (re-embedded on "
            f"{compared_with}); quarantined until a check that includes that text passes"
        )
        self._suspect_texts[model].append(text)
        self._distrusted[model].add(backend)
        before = st.agreement
        st.agreement, st.agreement_detail, st.excluded_scripts = Verdict.DISAGREE, message, frozenset()
        st.last_pass_at = None  # its probe passes vouch for nothing it served: every entry it made lately goes
        if before is not Verdict.DISAGREE:
            log.error("backend %s quarantined for model %s: %s", backend, model, message)
        report = self.reports.get(model)
        if report is not None:
            report.findings.append(Finding(backend, "live_audit", "error", message))
            judged = report.result(backend)
            if judged is not None:
                judged.verdict = Verdict.DISAGREE
        if self._anchor.get(model) == backend:
            self._anchor.pop(model)  # the next check elects the truth without it
        self._on_verdicts()
        self._wanted[model].set()  # a full check now, with that text among the probes

    def _settle_distrust(self, model: str, report: Report, included: set[str]) -> None:
        """A backend that failed a live audit is trusted again only by a full check that included every text
        it failed on; a check that started before the failure (or a partial one) cannot clear it."""
        complete = set(self._suspect_texts[model]) <= included
        for b in report.backends:
            if b.name not in self._distrusted[model] or not b.verdict.compatible:
                continue
            if complete:
                self._distrusted[model].discard(b.name)
            else:
                b.verdict, b.excluded_scripts = Verdict.DISAGREE, []  # the audit's verdict stands
                report.findings.append(
                    Finding(
                        b.name,
                        "live_audit",
                        "error",
                        "failed a live audit while this check ran; stays quarantined until a check that includes "
                        "the text it failed on passes",
                    )
                )
        if not self._distrusted[model]:
            self._suspect_texts[model].clear()

    def _check_traffic(self, model: str) -> list[str]:
        return list(dict.fromkeys([*self._suspect_texts[model], *self._traffic[model]]))

    # -- scheduling ------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.settings.enabled:
            return
        self._tasks = [asyncio.create_task(self._loop(m), name=f"consistency-{m}") for m in self._by_model]

    async def stop(self) -> None:
        await cancel_all([*self._tasks, *self._gates.values()])

    def backend_recovered(self, st: BackendState, healthy: bool) -> None:
        """Health monitor hook: a backend that comes back is re-verified before it serves again."""
        if not self.settings.enabled or not healthy:
            return
        model = st.backend.model
        if st.agreement is not Verdict.REFERENCE and self.settings.require_verification:
            st.agreement, st.agreement_detail = Verdict.PENDING, "recovered: re-checking agreement"
        if model in self.spaces and not st.shadow:
            # Against a pinned space a few probes admit it at once; the full set follows (`_wanted`).
            task = self._gates.get(st.backend.name)
            if task is None or task.done():
                self._gates[st.backend.name] = asyncio.create_task(self._quick_gate(st), name=f"gate-{st.backend.name}")
            return
        self._wanted[model].set()

    async def _quick_gate(self, st: BackendState) -> None:
        model = st.backend.model
        space = self.spaces[model]
        started = time.perf_counter()
        try:
            short = [p for p in space.probes if not p.long][:_GATE_PROBES]
            if st.agreement is Verdict.PENDING:
                report = await self.check(model, only={st.backend.name}, probes=short, keep_report=False)
                res = report.result(st.backend.name)
                log.info(
                    "backend %s: quick admission gate against space %s: %s in %.0f ms",
                    st.backend.name,
                    space.space_id,
                    res.verdict if res else "not checked",
                    (time.perf_counter() - started) * 1000,
                )
                if res is not None and res.verdict.compatible:
                    st.agreement_detail = "admitted by the quick gate; the full probe set follows"
                    if self._metrics is not None:
                        self._metrics.admission_gate_seconds.labels(st.backend.name).observe(
                            time.perf_counter() - started
                        )
        except Exception as exc:
            log.warning("backend %s: quick admission gate failed: %s", st.backend.name, exc)
        finally:
            self._wanted[model].set()  # the full check, which may take it out again

    async def _loop(self, model: str) -> None:
        await self._first_health(model)
        soon = 0  # checks in a row that left the model without a verdict: retried within seconds, not minutes
        while True:
            try:
                await self.check(model)
                if self.errors.pop(model, None) is not None:
                    log.info("model %s: agreement checks run again", model)
                unsettled = self.space_id(model) is None or any(
                    st.agreement is Verdict.PENDING and st.healthy is not False and not st.shadow
                    for st in self._by_model[model]
                )
                soon = soon + 1 if unsettled else 0
            except Exception as exc:
                # Never silent: a model left pending with no trace is the worst outcome. Once per cause.
                message = f"agreement check failed: {type(exc).__name__}: {exc}"
                if self.errors.get(model) != message:
                    log.exception("model %s: %s", model, message, exc_info=exc)
                self.errors[model] = message
                for st in self._by_model[model]:
                    if st.agreement is Verdict.PENDING:
                        st.agreement_detail = message
                soon += 1
            wanted = self._wanted[model]
            wait = min(self.settings.interval_s, 2.0 * 2 ** min(soon, 8)) if soon else self.settings.interval_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wanted.wait(), timeout=wait)
            wanted.clear()

    async def _first_health(self, model: str, limit_s: float = 30.0) -> None:
        """Start-up: give each backend a moment to answer its first health check before checking."""
        loop = asyncio.get_running_loop()
        end = loop.time() + limit_s
        while loop.time() < end and any(st.healthy is None for st in self._by_model[model]):
            await asyncio.sleep(0.1)

    # -- one check -------------------------------------------------------------------------------
    async def check(
        self, model: str, only: set[str] | None = None, probes: list[Probe] | None = None, keep_report: bool = True
    ) -> Report:
        """Check the model's backends (or just `only`, and the reference) and apply the verdicts."""
        async with self._locks[model]:
            group = self._by_model[model]
            space = self.spaces.get(model)
            reference = None if space is not None else self._choose_reference(model)
            previous = self._anchor.get(model)
            if reference is not None and reference != previous:
                for st in group:
                    if st.backend.name == previous and st.agreement is Verdict.REFERENCE:
                        st.agreement = Verdict.PENDING  # re-checked against the new reference
                self._anchor[model] = reference
                for st in group:
                    if st.backend.name == reference:
                        st.agreement, st.agreement_detail = Verdict.REFERENCE, None  # it defines the space
                if previous is not None:
                    log.warning(
                        "model %s: reference %s unavailable; %s (verified) takes over", model, previous, reference
                    )
            suspects = set(self._suspect_texts[model]) if only is None else set()
            checker = Checker(
                model,
                self.profiles[model],
                group,
                reference,
                self._gguf_for(model),
                calls=self._calls,
                recorded=self._recorded.get(model),
                only=only,
                space=space,
                probes=probes,
                tokenizer=self._tokenizers.get(model),
                on_partial=self._on_partial.get(model, "restrict"),
                traffic=self._check_traffic(model) if only is None else (),
                distrusted=self._distrusted[model],
            )
            try:
                report = await checker.run()
            finally:
                if only is None:  # a partial check (quick gate, rescue) does not establish failover
                    self._bootstrapped[model].set()
            if checker.recording is not None:
                self._recorded[model] = checker.recording
                # Computed here, once per live check: `space_id` is read on every request.
                rows = checker.recording.vectors.rows
                if self._records is not None and only is None:
                    self._live_ids[model] = await self._records.space_id(
                        model, self.profiles[model], checker.builtin, rows, checker.recording.backend
                    )
                else:
                    self._live_ids[model] = self._live_ids.get(model) or live_space_id(
                        model, self.profiles[model], rows
                    )
            if self._distrusted[model]:
                # Only a check that judged the client texts (a truth for them existed: an elected backend, or
                # backends that agree with the pinned space) can clear a live audit's verdict.
                self._settle_distrust(model, report, suspects if checker.traffic_judged else set())
            if only is None and space is None and report.reference and report.reference != self._anchor.get(model):
                # Elected by the majority (judge.py): the next checks prefer it in a tie.
                log.warning(
                    "model %s: %s defines the space (backends that agree: %s)",
                    model,
                    report.reference,
                    report.groups[0] if report.groups else [report.reference],
                )
                self._anchor[model] = report.reference
            self._apply(model, report)
            if space is not None and only is None:
                self._judge_drift(model, report)
            if only is None and keep_report:
                self.reports[model] = report
            self._export(model, report)
            return report

    def _judge_drift(self, model: str, report: Report) -> None:
        """Every backend that could be checked left the pinned space: the backends changed, not one of them."""
        shadows = {st.backend.name for st in self._by_model[model] if st.shadow}
        judged = [b for b in report.backends if b.verdict is not Verdict.ERROR and b.name not in shadows]
        drifted = bool(judged) and all(b.verdict is Verdict.DISAGREE for b in judged)
        space = self.spaces[model]
        if drifted:
            message = (
                f"every backend of model {model!r} now produces vectors outside its pinned space {space.space_id} "
                f"(recorded {space.recorded.get('at', '?')} on {space.recorded.get('backend', '?')}): the backends "
                "changed (an upgrade, another model file). Either roll the backends back, or record a new space "
                "(embedding-gateway space record) and re-index every vector stored from the old one"
            )
            if model not in self.drifted:
                log.error("SPACE DRIFT: %s (on_space_drift = %s)", message, self.settings.on_space_drift)
            self.drifted[model] = message
        elif self.drifted.pop(model, None) is not None:
            log.info("model %s: backends agree with the pinned space %s again", model, space.space_id)
        if self._metrics is not None:
            self._metrics.space_drift.labels(model).set(1 if drifted else 0)

    def _export(self, model: str, report: Report) -> None:
        if self._metrics is None:
            return
        for b in report.backends:
            if b.min_cosine is not None:
                self._metrics.agreement_min_cosine.labels(model, b.name).set(b.min_cosine)
        for st in self._by_model[model]:
            for script in SCRIPTS:
                excluded = script in st.excluded_scripts
                if excluded or (st.backend.name, model, script) in self._exported_scripts:
                    self._metrics.excluded_scripts.labels(st.backend.name, model, script).set(1 if excluded else 0)
                    self._exported_scripts.add((st.backend.name, model, script))
        if (sid := self.space_id(model)) is not None:
            self._metrics.set_space(model, sid)

    async def check_all(self) -> list[Report]:
        return [await self.check(m) for m in self._by_model]

    def _apply(self, model: str, report: Report) -> None:
        findings = {f.backend: f for f in report.findings if f.severity == "error"}
        for st in self._by_model[model]:
            res = report.result(st.backend.name)
            if res is None:
                continue
            before = st.agreement
            if res.verdict is Verdict.ERROR:
                if before is Verdict.REFERENCE:
                    continue
                # Not verifiable now: keep a verified backend serving, keep the rest out.
                st.agreement_detail = res.error
                continue
            st.agreement = res.verdict
            st.excluded_scripts = frozenset(res.excluded_scripts)
            if res.batch_cosine is not None:
                st.batch_cosine = res.batch_cosine
                st.batch_invariant = res.batch_cosine >= self.profiles[model].warn_cosine
            if res.verdict.compatible:
                st.last_pass_at = report.checked_at
            finding = findings.get(st.backend.name)
            st.agreement_detail = finding.message if finding else None
            if res.verdict is Verdict.DISAGREE and before is not Verdict.DISAGREE:
                log.error(
                    "backend %s quarantined for model %s: %s",
                    st.backend.name,
                    model,
                    finding.message if finding else f"min cosine {res.min_cosine}",
                )
            elif res.verdict.compatible and before in (Verdict.DISAGREE, Verdict.PENDING):
                log.info(
                    "backend %s agrees with the reference for model %s (min cosine %s)",
                    st.backend.name,
                    model,
                    res.min_cosine,
                )
        self._on_verdicts()
