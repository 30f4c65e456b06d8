"""What `/v1/backends` and `/v1/consistency` show, built from a runtime.

One place for both modes: a single process renders its own runtime; with `--workers N` the control
plane renders its runtime (the shared view) and adds what each worker reports about its own traffic.
"""

from __future__ import annotations

from typing import Any

from gateway.runtime import Runtime
from gateway.state import BackendState

# Per-backend figures each worker counts for its own traffic; the shared view adds them up.
WORKER_COUNTS = ("in_flight", "queued", "concurrency_limit", "requests", "failures", "circuit_trips", "panic_routed")


def worker_figures(rt: Runtime) -> dict[str, dict[str, Any]]:
    """This process's own traffic figures per backend (what a worker reports to the control plane)."""
    return {st.backend.name: _figures(rt, st) for st in rt.states}


def _figures(rt: Runtime, st: BackendState) -> dict[str, Any]:
    p50, p99 = st.recent_percentiles()
    return {
        "in_flight": st.in_flight,
        "queued": st.admission.queued,
        "concurrency_limit": st.admission.limit,
        "requests": st.requests,
        "failures": st.failures,
        "panic_routed": st.panicked,
        "call_timeout_1_s": round(rt.service.router.calls.call_timeout(st, 1), 3),
        "circuit_trips": st.breaker.trips,
        "circuit": str(st.breaker.state),
        "last_success_at": st.alive_at,
        "last_latency_ms": st.last_latency_ms,
        "latency_ewma_ms": st.latency_ewma_ms,
        "latency_p50_ms": p50,
        "latency_p99_ms": p99,
    }


def _coalescing(rt: Runtime, st: BackendState) -> dict[str, Any]:
    """Whether the backend takes coalesced calls, and why not."""
    window = rt.coalesce_ms.get(st.backend.model, 0)
    if not window:
        return {"coalescing": "off", "coalescing_reason": "coalesce_ms = 0 for its model"}
    if st.batch_invariant is None:
        return {"coalescing": "off", "coalescing_reason": "not measured yet (the agreement check measures it)"}
    if not st.batch_invariant:
        return {
            "coalescing": "off",
            "coalescing_reason": f"its vectors change with batch composition (a probe alone vs in a batch: cos "
            f"{st.batch_cosine:.6f})",
        }
    return {
        "coalescing": "on",
        "coalescing_reason": f"batch-invariant (cos {st.batch_cosine:.6f}); window {window:g} ms",
    }


def backends_view(rt: Runtime, workers: list[dict[str, Any]] | None = None, count: int = 1) -> dict[str, Any]:
    """`workers`: {"id", "pid", "backends": worker_figures()} of each worker process, when other processes
    serve the traffic (`count` of them configured)."""
    out = []
    for st in rt.states:
        b = st.backend
        sup = rt.supervisors.get(b.name)
        report = rt.consistency.reports.get(b.model) if rt.consistency else None
        judged = report.result(b.name) if report else None
        p50, p99 = st.recent_percentiles()
        entry: dict[str, Any] = {
            "name": b.name,
            "kind": b.kind,
            "model": b.model,
            "url": b.public_url(),
            "priority": b.priority,
            "healthy": st.healthy,
            "circuit": str(st.breaker.state),
            "agreement": str(st.agreement),
            "agreement_detail": st.agreement_detail,
            "excluded_scripts": sorted(st.excluded_scripts),  # restricted: texts in these never go there
            **_coalescing(rt, st),
            "space_id": rt.consistency.space_id(b.model) if rt.consistency else None,
            "min_cosine": judged.min_cosine if judged else None,
            "mean_cosine": judged.mean_cosine if judged else None,
            "shadow": st.shadow,
            "circuit_trips": st.breaker.trips,
            "last_error": st.last_error,
            "last_error_at": st.last_error_at,
            "last_check_at": st.last_check_at,
            "last_latency_ms": st.last_latency_ms,
            "latency_ewma_ms": st.latency_ewma_ms,
            "latency_p50_ms": p50,
            "latency_p99_ms": p99,
            "in_flight": st.in_flight,
            "queued": st.admission.queued,
            "concurrency_limit": st.admission.limit,
            "declared_concurrency": st.capacity.declared,
            "max_input_tokens": st.input_limit(),  # as the backend declares it; longer inputs never go there
            "max_batch_size": st.batch_limit(),  # most texts per call: configured or declared, lower wins
            "remote_model": getattr(b, "remote_model", None),  # the `model` sent (OpenAI-compatible kinds)
            "call_timeout_1_s": round(rt.service.router.calls.call_timeout(st, 1), 3),
            "requests": st.requests,
            "failures": st.failures,
            "panic_routed": st.panicked,
        }
        if workers is not None:
            _merge_workers(entry, b.name, workers)
        if sup is not None:
            entry["managed"] = {
                "pid": sup.process.proc.pid if sup.process.proc else None,
                "restarts": sup.restarts,
                "error": sup.error,
            }
        out.append(entry)
    body: dict[str, Any] = {"object": "list", "data": out}
    if rt.consistency is not None and rt.consistency.errors:
        body["agreement_check_errors"] = dict(rt.consistency.errors)
    body["workers"] = count
    if workers is not None:
        body["worker_processes"] = sorted(({"id": w["id"], "pid": w["pid"]} for w in workers), key=lambda w: w["id"])
    return body


def _merge_workers(entry: dict[str, Any], name: str, workers: list[dict[str, Any]]) -> None:
    """Traffic figures are the workers' sum; circuits are per worker (each keeps its own breaker)."""
    figures = [w["backends"][name] for w in workers if name in w["backends"]]
    for key in WORKER_COUNTS:
        entry[key] = sum(f[key] for f in figures)
    circuits = {str(w["pid"]): w["backends"][name]["circuit"] for w in workers if name in w["backends"]}
    entry["circuits"] = circuits
    # One word for dashboards: closed only when every worker's circuit is closed.
    entry["circuit"] = next((c for c in circuits.values() if c != "closed"), "closed")
    latencies = [f["latency_ewma_ms"] for f in figures if f["latency_ewma_ms"] is not None]
    if latencies:
        entry["latency_ewma_ms"] = round(sum(latencies) / len(latencies), 3)
    for key in ("latency_p50_ms", "latency_p99_ms", "call_timeout_1_s"):  # the slowest worker's: conservative
        values = [f[key] for f in figures if f.get(key) is not None]
        entry[key] = max(values) if values else None


def consistency_view(rt: Runtime) -> dict[str, Any]:
    """`GET /v1/consistency` without the shadows (which each process samples from its own traffic)."""
    assert rt.consistency is not None
    data = []
    for model in rt.profiles:
        report = rt.consistency.reports.get(model)
        data.append(report.to_dict() if report else {"model": model, "status": "pending"})
    return {"object": "list", "enabled": rt.settings.consistency.enabled, "data": data}


async def check_view(rt: Runtime, model: str | None) -> dict[str, Any]:
    """`POST /v1/consistency`: check now (one model, or all) and return the reports."""
    assert rt.consistency is not None
    reports = [await rt.consistency.check(m) for m in ([model] if model else list(rt.profiles))]
    return {"object": "list", "enabled": rt.settings.consistency.enabled, "data": [r.to_dict() for r in reports]}
