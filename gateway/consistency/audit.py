"""Live-traffic audit: the probes are not the only evidence.

A backend could answer the fixed probes correctly and lie elsewhere (texts over some length, a language,
one word). After a response, a sampled share (`[[models]] audit_sample`) of requests has some of its
texts re-embedded on another backend in service that agrees with the model on them, detached from the
request and bounded like shadows. A served vector below the model's `agree_cosine` is a disagreement:
a third backend, when there is one, says which side is wrong; with none, the model does: the side whose vector
of the whole text is closer to the two backends' agreed vectors of its halves is right (undecided: nobody is
blamed, and the text joins the checks).
The consistency service then quarantines it at once (and the cache drops what it made since its last
pass). Texts are never logged: findings give their length.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import numpy as np

from backends.errors import BackendError
from config.profiles import ModelProfile
from gateway.calls import BackendCalls, Purpose
from gateway.consistency.scripts import scripts_of
from gateway.errors import DeadlineExceeded
from gateway.metrics import Metrics
from gateway.pipeline import Prompt
from gateway.resilience.deadline import Deadline
from gateway.state import BackendState

log = logging.getLogger(__name__)

_CONCURRENCY = 2  # audits in flight per model; more sampled ones are dropped (counted)
_TEXTS = 2  # texts re-embedded per audited request: its longest, and one at random
_TIMEOUT_S = 30.0
# Two backends, no third: the side whose vector of the whole text is this much closer to the parts both agree
# on is right (a lie is far off: the reversed text scored 0.2 where the truth scored 0.6).
_TIEBREAK_MARGIN = 0.05

# (model, backend that is wrong, cosine, the text, the backend it was compared with)
Verdict = Callable[[str, str, float, str, str], None]


def _halves(text: str) -> list[str]:
    """The text's two halves, cut between words (between characters for one long word)."""
    words = text.split()
    if len(words) >= 2:
        mid = len(words) // 2
        return [" ".join(words[:mid]), " ".join(words[mid:])]
    if len(text.strip()) >= 8:
        mid = len(text) // 2
        return [text[:mid], text[mid:]]
    return []


class Auditor:
    def __init__(
        self,
        profiles: dict[str, ModelProfile],
        samples: dict[str, float],
        members: Callable[[str], list[BackendState]],
        calls: BackendCalls,
        metrics: Metrics,
        failed: Verdict,
        observe: Callable[[str, list[str]], None] = lambda _model, _texts: None,
    ) -> None:
        self._samples = {m: s for m, s in samples.items() if s > 0}
        self._profiles = profiles
        self._members = members  # the model's backends in service now
        self._calls = calls
        self._metrics = metrics
        self._failed = failed
        self._observe = observe  # an undecided text joins the checks' probes
        self._in_flight: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def wanted(self, model: str) -> bool:
        """Whether to audit this request (the sampling decision: one random draw)."""
        sample = self._samples.get(model)
        return sample is not None and random.random() < sample

    def audit(
        self, model: str, texts: list[str], prompt: Prompt, served: np.ndarray, backends: tuple[str, ...]
    ) -> None:
        """Start one audit of a served request (full-dimension unit vectors); returns at once."""
        if len(backends) != 1:
            return  # served by several backends (sub-batches): which text came from which is not kept
        if self._in_flight.get(model, 0) >= _CONCURRENCY:
            self._metrics.audits.labels(model, backends[0], "dropped").inc()
            return
        picks = sorted({int(np.argmax([len(t) for t in texts])), random.randrange(len(texts))})[:_TEXTS]
        self._in_flight[model] = self._in_flight.get(model, 0) + 1
        task = asyncio.create_task(
            self._run(model, backends[0], [texts[i] for i in picks], prompt, served[picks]), name=f"audit-{model}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, model: str, server: str, texts: list[str], prompt: Prompt, served: np.ndarray) -> None:
        try:
            await self._audit(model, server, texts, prompt, served)
        except Exception as exc:  # an audit must never take anything down
            log.warning("model %s: audit of %s failed: %s: %s", model, server, type(exc).__name__, exc)
        finally:
            self._in_flight[model] -= 1

    async def _audit(self, model: str, server: str, texts: list[str], prompt: Prompt, served: np.ndarray) -> None:
        agree = self._profiles[model].agree_cosine
        scripts = frozenset().union(*(scripts_of(t) for t in texts))
        others = [
            st
            for st in self._members(model)
            if st.backend.name != server
            and st.healthy is not False
            and st.breaker.available()
            and not st.excluded_scripts & scripts
        ]
        if not others:
            self._metrics.audits.labels(model, server, "skipped").inc()
            return
        first = await self._vectors(others[0], texts, prompt)
        if first is None:
            self._metrics.audits.labels(model, server, "skipped").inc()
            return
        served = served / np.linalg.norm(served, axis=1, keepdims=True)
        cos = np.sum(first * served, axis=1)
        worst = int(np.argmin(cos))
        if float(cos[worst]) >= agree:
            self._metrics.audits.labels(model, server, "pass").inc()
            return
        checker = others[0].backend.name
        if len(others) > 1:
            third = await self._vectors(others[1], texts, prompt)
            if third is None:
                wrong: str | None = None
            elif float(third[worst] @ served[worst]) >= agree > float(third[worst] @ first[worst]):
                wrong = checker  # a third opinion sides with the served vector
            elif float(third[worst] @ first[worst]) >= agree > float(third[worst] @ served[worst]):
                wrong = server
            else:
                wrong = None
        else:
            server_state = next((st for st in self._members(model) if st.backend.name == server), None)
            wrong = (
                await self._tiebreak(model, server_state, others[0], texts[worst], prompt, served[worst], first[worst])
                if server_state is not None
                else None
            )
        if wrong is None:  # nobody can tell which side is wrong: the text joins the checks, nobody is blamed
            self._metrics.audits.labels(model, server, "undecided").inc()
            self._observe(model, [texts[worst]])
            return
        other = checker if wrong == server else server
        self._metrics.audits.labels(model, wrong, "fail").inc()
        self._failed(model, wrong, float(cos[worst]), texts[worst], other)

    async def _tiebreak(
        self, model: str, a: BackendState, b: BackendState, text: str, prompt: Prompt, va: np.ndarray, vb: np.ndarray
    ) -> str | None:
        """Two backends disagree on a text and no third can say which is right: the model decides, through the
        parts of the text they do agree on. A backend that lies on some texts (a length, a word) answers the
        parts without the trigger honestly, and the true vector of the whole lies closer to its parts."""
        parts = _halves(text)
        if not parts:
            return None
        pa, pb = await self._vectors(a, parts, prompt), await self._vectors(b, parts, prompt)
        if pa is None or pb is None:
            return None
        agree = self._profiles[model].agree_cosine
        anchors = [pa[i] for i in range(len(parts)) if float(pa[i] @ pb[i]) >= agree]
        if not anchors:
            return None
        sa, sb = max(float(va @ h) for h in anchors), max(float(vb @ h) for h in anchors)
        if abs(sa - sb) < _TIEBREAK_MARGIN:
            return None
        return a.backend.name if sa < sb else b.backend.name

    async def _vectors(self, st: BackendState, texts: list[str], prompt: Prompt) -> np.ndarray | None:
        sent = texts if st.backend.applies_prompt else prompt.apply(texts)
        try:
            out = await self._calls.embed(
                st, sent, prompt.name, deadline=Deadline(_TIMEOUT_S), purpose=Purpose.CHECK, timeout_s=_TIMEOUT_S
            )
        except (BackendError, DeadlineExceeded) as exc:
            log.debug("audit call to %s failed: %s", st.backend.name, exc)
            return None
        v = out.vectors.astype(np.float64)
        return v / np.linalg.norm(v, axis=1, keepdims=True)  # type: ignore[no-any-return]

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
