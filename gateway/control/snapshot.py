"""The routing snapshot: what the control plane decided, as plain JSON-able data.

Built by the control plane from its runtime (`build`), applied by each worker to its own backend
states (`apply`). A snapshot is immutable once built; a worker swaps in whole snapshots, never parts.
What stays per worker: circuit breakers, latency EWMAs and admission queues (Envoy keeps outlier
detection per instance too), with each backend's concurrency shared out among the workers.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from backends.base import BackendInfo
from gateway.consistency.report import Verdict

if TYPE_CHECKING:
    from gateway.runtime import Runtime

Snapshot = dict[str, Any]


def build(rt: Runtime, workers: int, quotas: dict[str, list[int]] | None = None) -> Snapshot:
    cons = rt.consistency
    assert cons is not None
    backends = {}
    for st in rt.states:
        name = st.backend.name
        sup = rt.supervisors.get(name)
        backends[name] = {
            "healthy": st.healthy,
            "agreement": str(st.agreement),
            "agreement_detail": st.agreement_detail,
            "excluded_scripts": sorted(st.excluded_scripts),
            "last_pass_at": st.last_pass_at,
            "check_error": st.last_check_error_kind,
            "last_error": st.last_error,
            "info": dataclasses.asdict(st.info) if st.info is not None else None,
            "url": sup.url if sup is not None else None,  # a managed server's address
        }
    models = {
        m: {
            "space_id": cons.space_id(m),
            "bootstrapped": cons.bootstrapped(m),
            "drifted": cons.drifted.get(m),
            "error": cons.errors.get(m),
        }
        for m in rt.profiles
    }
    return {"workers": workers, "backends": backends, "models": models, "quotas": quotas or {}}


def apply(snapshot: Snapshot, rt: Runtime) -> None:
    """Make a worker's backend states say what the snapshot says. Backends the snapshot does not name
    (a reload removed them while this worker drains) keep their last state."""
    workers = int(snapshot.get("workers") or 1)
    for st in rt.states:
        b = snapshot["backends"].get(st.backend.name)
        if b is None:
            continue
        st.healthy = b["healthy"]
        st.agreement = Verdict(b["agreement"])
        st.agreement_detail = b["agreement_detail"]
        st.excluded_scripts = frozenset(b.get("excluded_scripts") or ())
        st.last_pass_at = b["last_pass_at"]
        st.last_check_error_kind = b["check_error"]
        st.last_error = b["last_error"]
        info = BackendInfo(**b["info"]) if b["info"] is not None else None
        if info != st.info or st.workers != workers:
            st.workers = workers
            st.learn(info)
    rt.quotas.learn(snapshot.get("quotas") or {})
    rt.cache.sync(rt.states)  # entries a now-quarantined backend made since its last pass go
