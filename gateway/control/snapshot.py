"""The routing snapshot: what the control plane decided, as one typed, immutable value.

Built by the control plane from its runtime (`build`), applied by each worker to its own backend
states (`apply`). A snapshot is frozen once built; a worker swaps in whole snapshots, never parts, and
an older one never replaces a newer (`seq`). What stays per worker: circuit breakers, latency EWMAs and
admission queues (Envoy keeps outlier detection per instance too), with each backend's concurrency
shared out among the workers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from backends.base import BackendInfo
from gateway.consistency.report import Verdict

if TYPE_CHECKING:
    from gateway.runtime import Runtime


class BackendEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    healthy: bool | None
    agreement: Verdict
    agreement_detail: str | None
    excluded_scripts: tuple[str, ...]
    last_pass_at: float | None
    check_error: str | None
    last_error: str | None
    info: BackendInfo | None
    url: str | None  # a managed server's address
    batch_invariant: bool | None = None
    batch_cosine: float | None = None


class ModelEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    space_id: str | None
    bootstrapped: bool
    drifted: str | None
    error: str | None


class Snapshot(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    workers: int
    backends: dict[str, BackendEntry]
    models: dict[str, ModelEntry]
    quotas: dict[str, tuple[int, int]]  # "key/what" -> (window, shared remaining)
    seq: int = 0


def decode(raw: Any) -> Snapshot:
    """A snapshot from the channel (JSON already parsed); a malformed one raises ValueError."""
    try:
        return msgspec.convert(raw, Snapshot)
    except msgspec.ValidationError as exc:
        raise ValueError(f"malformed snapshot: {exc}") from None


def build(rt: Runtime, workers: int, quotas: dict[str, list[int]] | None = None) -> Snapshot:
    cons = rt.consistency
    assert cons is not None
    backends = {}
    for st in rt.states:
        name = st.backend.name
        sup = rt.supervisors.get(name)
        backends[name] = BackendEntry(
            healthy=st.healthy,
            agreement=st.agreement,
            agreement_detail=st.agreement_detail,
            excluded_scripts=tuple(sorted(st.excluded_scripts)),
            last_pass_at=st.last_pass_at,
            check_error=st.last_check_error_kind,
            last_error=st.last_error,
            info=st.info,
            url=sup.url if sup is not None else None,
            batch_invariant=st.batch_invariant,
            batch_cosine=st.batch_cosine,
        )
    models = {
        m: ModelEntry(
            space_id=cons.space_id(m),
            bootstrapped=cons.bootstrapped(m),
            drifted=cons.drifted.get(m),
            error=cons.errors.get(m),
        )
        for m in rt.profiles
    }
    pooled = {k: (int(v[0]), int(v[1])) for k, v in (quotas or {}).items()}
    return Snapshot(workers=workers, backends=backends, models=models, quotas=pooled)


def apply(snapshot: Snapshot, rt: Runtime) -> None:
    """Make a worker's backend states say what the snapshot says. Backends the snapshot does not name
    (a reload removed them while this worker drains) keep their last state."""
    workers = snapshot.workers or 1
    for st in rt.states:
        b = snapshot.backends.get(st.backend.name)
        if b is None:
            continue
        st.healthy = b.healthy
        st.agreement = b.agreement
        st.agreement_detail = b.agreement_detail
        st.excluded_scripts = frozenset(b.excluded_scripts)
        st.last_pass_at = b.last_pass_at
        st.last_check_error_kind = b.check_error
        st.last_error = b.last_error
        st.batch_invariant, st.batch_cosine = b.batch_invariant, b.batch_cosine
        if b.info != st.info or st.workers != workers:
            st.workers = workers
            st.learn(b.info)
    rt.quotas.learn(dict(snapshot.quotas))
    rt.cache.sync(rt.states)  # entries a now-quarantined backend made since its last pass go
