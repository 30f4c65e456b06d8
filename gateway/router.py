"""Routing one request to the backends of its model: the compatible set, sub-batches, policies.

    members(model)   the model's compatible set (backends of the same profile; issue 5 narrows it to
                     those that pass the agreement check) - no vector ever comes from outside it
    split            sub-batches that fit every member's limits, run concurrently (bounded)
    per sub-batch    AttemptPlan picks a backend (priority, health, circuit, latency x load);
                     tenacity retries retryable failures on the next backend, backing off only when
                     all were tried; PayloadTooLarge halves the sub-batch; optional hedging
    reassemble       input order; x-embedding-backend lists every backend used
If any sub-batch cannot be served, the whole request fails (503 + Retry-After, or 504 past the
deadline): never partial data.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np

from backends.errors import BackendError, BackendUnavailable, InputRejected, InputTooLong, PayloadTooLarge
from gateway.calls import BackendCalls
from gateway.coalesce import MergeHint
from gateway.consistency.scripts import scripts_in
from gateway.errors import REDUCE_PHRASE, DeadlineExceeded, InputOverLimit, NoBackendAvailable, Overloaded
from gateway.metrics import Metrics
from gateway.pipeline import Prompt
from gateway.resilience.balance import AttemptPlan, queue_eta_s
from gateway.resilience.batching import split
from gateway.resilience.deadline import Deadline
from gateway.resilience.hedge import hedged
from gateway.resilience.retry import RetryPolicy, first_backoff, retrying, will_retry
from gateway.state import BackendState

log = logging.getLogger(__name__)

NO_PROMPT = Prompt(None, "")
_SHED_MARGIN = 0.8  # an estimate within 20 % of the deadline is too close to call: refuse rather than waste the work
# Set for the sub-batches of a request that has several: bulk work, queued behind small requests.
_BULK: ContextVar[bool] = ContextVar("bulk", default=False)


@dataclass(frozen=True, slots=True)
class Routed:
    vectors: np.ndarray
    backends: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    batch_size: int = 32
    subbatch_concurrency: int = 4
    hedge_after_s: float | None = None
    request_timeout_s: float = 30.0
    retry_after_cap_s: float = 5.0  # never advise waiting past the next health check


@dataclass(slots=True)
class _Part:
    vectors: np.ndarray
    backends: list[str]


class Router:
    def __init__(
        self,
        states: Sequence[BackendState],
        dimensions: dict[str, int],
        metrics: Metrics,
        policy: RoutingPolicy | None = None,
        members: Callable[[str, list[BackendState]], list[BackendState]] = lambda _model, group: group,
        gate: Callable[[str, float], Awaitable[None]] | None = None,
        calls: BackendCalls | None = None,
        rescue: Callable[[str, Deadline], Awaitable[bool]] | None = None,
        explain: Callable[[str], str | None] = lambda _model: None,
        coalesce_s: dict[str, float] | None = None,
    ) -> None:
        self._by_model: dict[str, list[BackendState]] = {}
        for st in states:
            self._by_model.setdefault(st.backend.model, []).append(st)
        self._metrics = metrics
        self.policy = policy or RoutingPolicy()
        self._members = members
        self._gate = gate  # e.g. wait for the model's first agreement check at start-up
        self.calls = calls or BackendCalls(dimensions, metrics)
        # When no compatible backend can serve: verify a pending one now (within the deadline); True
        # when the compatible set grew, so the request is tried again instead of failing.
        self._rescue = rescue
        self._explain = explain  # why a model has no compatible backend, when there is more to say
        # Per model: how long a call waits for other requests' texts to share it (coalescing); absent: never.
        self._coalesce_s = {m: s for m, s in (coalesce_s or {}).items() if s > 0}

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    def members(self, model: str) -> list[BackendState]:
        """The model's compatible set: the only backends that may produce its vectors."""
        return self._members(model, self._by_model.get(model, []))

    def deadline(self, seconds: float | None = None) -> Deadline:
        return Deadline(min(seconds, self.policy.request_timeout_s) if seconds else self.policy.request_timeout_s)

    async def embed(
        self,
        model: str,
        texts: list[str],
        prompt: Prompt = NO_PROMPT,
        deadline: Deadline | None = None,
        longest: int | None = None,
    ) -> Routed:
        """Embed `texts` (without prompt) on the model's compatible backends; vectors in input order.
        `longest`: the most tokens of any input (the model's tokenizer counted them): only backends whose
        declared input limit covers it are used - never one that would truncate or refuse it."""
        deadline = deadline or self.deadline()
        if self._gate is not None:
            await self._gate(model, deadline.remaining())
        try:
            routed = await self._route(model, texts, prompt, deadline, longest)
        except NoBackendAvailable:
            if deadline.expired or self._rescue is None or not await self._rescue(model, deadline):
                raise
            log.info("model %s: a newly verified backend takes over the request", model)
            routed = await self._route(model, texts, prompt, deadline, longest)
        self._metrics.inputs_served(model, len(texts))  # texts served, not texts asked for
        return routed

    async def _route(
        self,
        model: str,
        texts: list[str],
        prompt: Prompt,
        deadline: Deadline,
        longest: int | None = None,
    ) -> Routed:
        if deadline.expired:
            raise DeadlineExceeded(f"the request's deadline passed before model {model!r} could be called")
        members = self.members(model)
        if not members:
            reason = self._explain(model) or f"model {model!r} has no compatible backend in service"
            raise NoBackendAvailable(reason, retry_after=self.policy.retry_after_cap_s)
        if longest is not None:
            members = self._covering(model, members, longest)
        if any(st.excluded_scripts for st in members):  # free unless a backend is restricted
            members = self._agreeing(model, members, texts)
        slices = split(texts, self._chunk_size(members), self._token_budget(members))
        self._shed_if_late(model, members, slices, deadline)
        if len(slices) == 1:
            part = await self._subbatch(model, members, texts, prompt, deadline)
            return Routed(part.vectors, tuple(part.backends))
        gate = asyncio.Semaphore(self.policy.subbatch_concurrency)

        async def run(sl: slice) -> _Part:
            async with gate:
                return await self._subbatch(model, members, texts[sl], prompt, deadline)

        token = _BULK.set(True)  # the sub-batch tasks inherit it: they queue in the backends' bulk lane
        try:
            tasks = [asyncio.ensure_future(run(sl)) for sl in slices]
        finally:
            _BULK.reset(token)
        try:
            parts = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:  # one sub-batch failed (or the client left): stop the others
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        used = list(dict.fromkeys(name for p in parts for name in p.backends))
        return Routed(np.concatenate([p.vectors for p in parts]), tuple(used))

    def _shed_if_late(self, model: str, members: list[BackendState], slices: list[slice], deadline: Deadline) -> None:
        """Refuse at once (503 + Retry-After from the queue) a request that no backend could answer within
        its deadline because of the work already queued: waiting it out would only waste the wait and,
        once it is sent, the backend's work."""
        units = sum(sl.stop - sl.start + 1 for sl in slices)
        largest = max(sl.stop - sl.start for sl in slices)
        etas = [queue_eta_s(st, units, largest) for st in AttemptPlan(members).usable()]
        if not etas or any(eta is None for eta in etas):
            return  # a backend with a free slot, or one whose pace is not known yet: try
        ahead, done = min((eta for eta in etas if eta is not None), key=lambda eta: eta[1])
        if done > _SHED_MARGIN * deadline.remaining():
            self._metrics.shed.labels(model).inc()
            raise Overloaded(
                f"model {model!r} is at capacity: its backends would answer this request in about {done:.1f}s, "
                f"past its deadline ({deadline.remaining():.1f}s left); retry later or with a longer "
                "x-request-timeout",
                retry_after=min(60.0, max(1.0, ahead)),
            )

    def _agreeing(self, model: str, members: list[BackendState], texts: list[str]) -> list[BackendState]:
        """The members that agree with the model on every script in `texts` (a restricted backend is wrong on
        some: its vectors for such text would land elsewhere in the space); none: 503 naming the divergence."""
        scripts = scripts_in(texts)
        agreeing = [st for st in members if not st.excluded_scripts & scripts]
        if agreeing:
            return agreeing
        self._metrics.script_refusals.labels(model).inc()
        wrong = "; ".join(
            f"{st.backend.name} disagrees on {', '.join(sorted(st.excluded_scripts & scripts))}" for st in members
        )
        raise NoBackendAvailable(
            f"no backend of model {model!r} in service agrees with the model on {', '.join(sorted(scripts))} text "
            f"({wrong}); the backends that do are out. Retry later",
            retry_after=self.policy.retry_after_cap_s,
        )

    def _covering(self, model: str, members: list[BackendState], longest: int) -> list[BackendState]:
        """The members whose declared input limit covers `longest` tokens; none: 503 when a configured backend
        of the model would cover it (it is out now), 400 when none would."""
        covering = [st for st in members if (limit := st.input_limit()) is None or limit >= longest]
        if covering:
            return covering
        limits = {st.backend.name: st.input_limit() for st in self._by_model.get(model, [])}
        if any(limit is None or limit >= longest for limit in limits.values()):
            raise NoBackendAvailable(
                f"an input of {longest} tokens needs a backend that takes that many; the ones serving model "
                f"{model!r} now take at most {limits} tokens, and the others are out",
                retry_after=self.policy.retry_after_cap_s,
            )
        raise InputOverLimit(
            f"{REDUCE_PHRASE} An input is {longest} tokens long; every backend of model {model!r} takes fewer "
            f"({limits}). Send a shorter text, or ask for truncation",
            param="input",
        )

    def _chunk_size(self, members: list[BackendState]) -> int:
        return min([self.policy.batch_size] + [x for st in members if (x := st.batch_limit())])

    def _token_budget(self, members: list[BackendState]) -> int | None:
        budgets = [b for st in members if st.info and isinstance(b := st.info.extra.get("max_batch_tokens"), int)]
        return min(budgets) if budgets else None

    async def _subbatch(
        self, model: str, members: list[BackendState], texts: list[str], prompt: Prompt, deadline: Deadline
    ) -> _Part:
        plan = AttemptPlan(members, self.policy.retry_after_cap_s)
        last: BackendError | None = None
        try:
            # The first attempt runs bare: the retry machinery costs ~30 us a request and is only
            # needed once something failed.
            try:
                return await self._attempt(model, self._take(model, plan), plan, texts, prompt, deadline)
            except BackendError as exc:
                if not will_retry(exc, plan.has_untried) or self.policy.retry.max_attempts < 2:
                    raise
                await asyncio.sleep(first_backoff(self.policy.retry, deadline, plan.has_untried))
            async for attempt in retrying(self.policy.retry, deadline, plan.has_untried, done=1):
                with attempt:
                    self._metrics.retries.labels(model).inc()
                    part = await self._attempt(model, self._take(model, plan), plan, texts, prompt, deadline)
                    self._metrics.fallback(model)
                    return part
        except PayloadTooLarge as exc:
            if len(texts) == 1:
                raise InputTooLong(exc.backend, f"input too large for the backend: {exc.message}") from exc
            half = len(texts) // 2
            a = await self._subbatch(model, members, texts[:half], prompt, deadline)
            b = await self._subbatch(model, members, texts[half:], prompt, deadline)
            return _Part(np.concatenate([a.vectors, b.vectors]), a.backends + b.backends)
        except BackendError as exc:
            if isinstance(exc, InputRejected):
                raise
            last = exc
        if deadline.expired:
            raise DeadlineExceeded(f"no backend of model {model!r} answered within the request's deadline")
        retry_after = getattr(last, "retry_after", None) or plan.retry_after()
        detail = f"{last.backend}: {last.kind}" if last else "no attempt"
        raise NoBackendAvailable(
            f"no backend of model {model!r} could serve the request (last: {detail})", retry_after=retry_after
        )

    def _take(self, model: str, plan: AttemptPlan) -> BackendState:
        st = plan.take()
        if st is None:
            raise NoBackendAvailable(
                f"no backend of model {model!r} is available (circuits open or unhealthy)",
                retry_after=plan.retry_after(),
            )
        if plan.overflowed_from is not None:
            self._metrics.overflows.labels(model, st.backend.name).inc()
        if plan.panicked:
            self._metrics.panic_routing.labels(model).inc()
            st.panicked += 1
            if st.should_log(f"panic routing to {st.backend.name}"):
                log.warning(
                    "model %s: no backend admits calls; panic routing to %s, which is out only for being slow",
                    model,
                    st.backend.name,
                )
        return st

    async def _attempt(
        self, model: str, st: BackendState, plan: AttemptPlan, texts: list[str], prompt: Prompt, deadline: Deadline
    ) -> _Part:
        hedge_after = self.policy.hedge_after_s
        if hedge_after is None or not plan.has_untried():
            return await self._call(st, texts, prompt, deadline)

        async def backup() -> _Part:
            # Only a backend not already working on this sub-batch; nobody left: the first call decides.
            other = plan.take(untried_only=True)
            if other is None:
                raise _NoHedge(st.backend.name, "no other backend to hedge with")
            self._metrics.hedges.labels(model).inc()
            return await self._call(other, texts, prompt, deadline)

        return await hedged(lambda: self._call(st, texts, prompt, deadline), backup, hedge_after)

    async def _call(self, st: BackendState, texts: list[str], prompt: Prompt, deadline: Deadline) -> _Part:
        """One backend call through the guarded path, with the breaker's permission already taken."""
        backend = st.backend
        sent = texts if backend.applies_prompt else prompt.apply(texts)
        bulk = _BULK.get()
        window = None if bulk or not st.batch_invariant else self._coalesce_s.get(backend.model)
        merge = MergeHint(window, self._chunk_size([st])) if window is not None else None
        out = await self.calls.embed(st, sent, prompt.name, deadline=deadline, permitted=True, bulk=bulk, merge=merge)
        return _Part(out.vectors, [backend.name])


class _NoHedge(BackendUnavailable):
    """The hedge found nobody to ask: not a failure of anyone, so the first call's outcome stands."""
