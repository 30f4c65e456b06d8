"""Probe I/O for the agreement checker: what each backend says about itself, and its vectors of the probes.

Every embedding goes through the one guarded call path (`BackendCalls.embed`, purpose CHECK: it shares the
backend's admission slots and records nothing against it), retried with tenacity on transient refusals and
split into smaller batches when a backend's real batch limit is lower than it said. Nothing here writes
backend state: what a backend describes is returned, and learned by its health monitor.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_incrementing

from backends.base import BackendInfo, Embeddings
from backends.errors import (
    BackendError,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    InputRejected,
    PayloadTooLarge,
)
from config.profiles import ModelProfile
from gateway.calls import BackendCalls, Purpose
from gateway.consistency.probes import Probe
from gateway.errors import DeadlineExceeded
from gateway.resilience.deadline import Deadline
from gateway.state import BackendState

# Checks are not latency-critical: on a busy machine a verdict late beats no verdict ("could not be
# checked"). Generous timeouts, and retries of transient failures before giving up on a backend.
CALL_TIMEOUT_S = 60.0
DESCRIBE_TIMEOUT_S = 15.0
_ATTEMPTS = 3
_CHUNK = 16

Key = tuple[str | None, int]  # (prompt name, probe index)


@dataclass
class ProbeVectors:
    """One backend's unit vectors per (prompt name, probe index); raw norms; rejected probes."""

    rows: dict[Key, np.ndarray]
    norms: list[float]
    rejected: set[int]

    def only(self, below: int) -> ProbeVectors:
        """The rows of the first `below` probes (the built-in set, without traffic texts)."""
        return ProbeVectors({k: v for k, v in self.rows.items() if k[1] < below}, self.norms, self.rejected)


def cosines(a: ProbeVectors, b: ProbeVectors) -> dict[Key, float]:
    return {k: float(a.rows[k] @ b.rows[k]) for k in a.rows.keys() & b.rows.keys()}


def _transient(exc: BaseException) -> bool:
    # Refused connections, 503s and 429s pass on a busy machine; a wrong answer or a timeout does not.
    return isinstance(exc, (BackendUnavailable, BackendOverloaded)) and not isinstance(exc, BackendTimeout)


class ProbeIO:
    def __init__(self, profile: ModelProfile, calls: BackendCalls) -> None:
        self.profile = profile
        self.calls = calls

    async def describe(self, st: BackendState) -> BackendInfo | None:
        """What the backend says about itself now, else what its health monitor learned last."""
        try:
            async with asyncio.timeout(DESCRIBE_TIMEOUT_S):
                return await st.backend.describe()
        except (BackendError, TimeoutError):
            return st.info

    async def tokens(self, st: BackendState, text: str) -> int | None:
        """How many tokens the backend makes of `text` (None: it has no tokenize route, or it failed)."""
        try:
            async with asyncio.timeout(DESCRIBE_TIMEOUT_S):
                ids = await st.backend.tokenize(text)
        except (BackendError, TimeoutError, ValueError, KeyError, TypeError):
            return None
        return None if ids is None else len(ids)

    @staticmethod
    def send(st: BackendState, prefix: str, text: str) -> str:
        return text if st.backend.applies_prompt else prefix + text

    async def embed(self, st: BackendState, texts: list[str], prompt_name: str | None) -> np.ndarray:
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

    async def vectors(
        self,
        st: BackendState,
        probes: list[Probe],
        prompt_names: list[str | None],
        info: BackendInfo | None = None,
    ) -> ProbeVectors | BackendError:
        """The probes embedded on one backend for each prompt, unit-normalized; a failure as a value."""
        info = info or st.info
        declared = info.max_input_tokens if info is not None else None
        rows: dict[Key, np.ndarray] = {}
        norms: list[float] = []
        rejected: set[int] = set()
        try:
            for pname in prompt_names:
                prefix = self.profile.prompts.get(pname, "") if pname else ""
                short = [i for i, pr in enumerate(probes) if not pr.long]
                texts = [self.send(st, prefix, probes[i].text) for i in short]
                for i, v in zip(short, await self.embed(st, texts, pname), strict=True):
                    rows[(pname, i)] = v
                for i in (i for i, pr in enumerate(probes) if pr.long):
                    tokens = probes[i].tokens
                    if tokens and declared and tokens > declared:
                        continue  # longer than it declares it takes: it is never sent such inputs
                    try:
                        rows[(pname, i)] = (await self.embed(st, [self.send(st, prefix, probes[i].text)], pname))[0]
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
        return ProbeVectors(rows, norms, rejected)

    async def _call(self, st: BackendState, texts: list[str], prompt_name: str | None) -> Embeddings:
        """One checked call through the guarded path (nothing recorded against the backend), retried."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(_ATTEMPTS),
            wait=wait_incrementing(0.5, 0.5),
            retry=retry_if_exception(_transient),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                try:
                    return await self.calls.embed(
                        st,
                        texts,
                        prompt_name,
                        deadline=Deadline(CALL_TIMEOUT_S),
                        purpose=Purpose.CHECK,
                        timeout_s=CALL_TIMEOUT_S,
                    )
                except DeadlineExceeded as exc:
                    raise BackendTimeout(st.backend.name, f"no answer within {CALL_TIMEOUT_S:g}s") from exc
        raise AssertionError("unreachable")
