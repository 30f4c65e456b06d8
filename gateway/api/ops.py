"""Operational routes: liveness, readiness, models, backends, metrics."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.params import FromPath

from gateway.runtime import Runtime


def _runtime(request: Request[Any, Any, Any]) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


@get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready")
async def ready(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """200 when every model has a healthy compatible backend *and* its first agreement check has finished:
    from then on every backend that agreed can take over at once if another fails."""
    rt = _runtime(request)
    assert rt.consistency is not None
    healthy, checking = rt.readiness()
    lacking = sorted(m for m, names in healthy.items() if not names)
    not_ready = bool(lacking or checking)
    body: dict[str, Any] = {"status": "not ready" if not_ready else "ready", "models": healthy}
    if lacking:
        body["models_without_healthy_backend"] = lacking
    if checking:
        body["models_checking_agreement"] = checking
    pending = {m: names for m in rt.profiles if (names := rt.consistency.pending(m))}
    if pending:
        body["pending_verification"] = pending
    quarantined = [st.backend.name for st in rt.states if str(st.agreement) == "disagree" and not st.shadow]
    if quarantined:
        body["quarantined"] = quarantined
    return Response(body, status_code=503 if not_ready else 200)


def _model_entry(rt: Runtime, name: str) -> dict[str, Any]:
    p = rt.profiles[name]
    assert rt.consistency is not None
    return {
        "id": name,
        "object": "model",
        "created": rt.started_at,
        "owned_by": "embedding-gateway",
        "space_id": rt.consistency.space_id(name),
        "space_pinned": name in rt.consistency.spaces,
        "dimension": p.dimension,
        "dimensions": list(p.allowed_dimensions),
        "pooling": p.pooling,
        "prompts": p.prompts,
        "default_prompt_name": p.default_prompt_name,
        "max_input_tokens": p.max_input_tokens,
    }


@get("/v1/models")
async def models(request: Request[Any, Any, Any]) -> dict[str, Any]:
    rt = _runtime(request)
    return {"object": "list", "data": [_model_entry(rt, name) for name in rt.profiles]}


@get("/v1/models/{model_id:str}")
async def model(request: Request[Any, Any, Any], model_id: FromPath[str]) -> dict[str, Any]:
    rt = _runtime(request)
    rt.service.profile(model_id)  # 404 in the client's dialect when unknown
    return _model_entry(rt, model_id)


@get("/v1/backends")
async def backends(request: Request[Any, Any, Any]) -> dict[str, Any]:
    rt = _runtime(request)
    out = []
    for st in rt.states:
        b = st.backend
        sup = rt.supervisors.get(b.name)
        report = rt.consistency.reports.get(b.model) if rt.consistency else None
        judged = report.result(b.name) if report else None
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
            "in_flight": st.in_flight,
            "queued": st.admission.queued,
            "concurrency_limit": st.admission.limit,
            "requests": st.requests,
            "failures": st.failures,
        }
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
    return body


@get("/metrics", media_type="text/plain; version=0.0.4")
async def metrics(request: Request[Any, Any, Any]) -> bytes:
    rt = _runtime(request)
    for st in rt.states:  # circuit state is derived (open -> half-open happens by the clock): read it now
        name = st.backend.name
        rt.metrics.circuit_open.labels(name).set(0 if str(st.breaker.state) == "closed" else 1)
        rt.metrics.backend_in_flight.labels(name).set(st.in_flight)
        rt.metrics.backend_queued.labels(name).set(st.admission.queued)
        rt.metrics.backend_concurrency.labels(name).set(st.admission.limit)
    return rt.metrics.render()
