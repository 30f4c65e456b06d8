"""`GET /v1/consistency` (last report per model) and `POST /v1/consistency` (check now)."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, get, post
from litestar.params import QueryParameter

from gateway.errors import ModelNotFound
from gateway.runtime import Runtime


def _runtime(request: Request[Any, Any, Any]) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


@get("/v1/consistency")
async def last_reports(request: Request[Any, Any, Any]) -> dict[str, Any]:
    rt = _runtime(request)
    assert rt.consistency is not None
    data = []
    for model in rt.profiles:
        report = rt.consistency.reports.get(model)
        data.append(report.to_dict() if report else {"model": model, "status": "pending"})
    shadows = rt.shadows.report(rt.profiles) if rt.shadows is not None else []
    return {"object": "list", "enabled": rt.settings.consistency.enabled, "data": data, "shadows": shadows}


@post("/v1/consistency", status_code=200)
async def check_now(
    request: Request[Any, Any, Any], model: Annotated[str | None, QueryParameter(name="model")] = None
) -> dict[str, Any]:
    rt = _runtime(request)
    assert rt.consistency is not None
    if model is not None and model not in rt.profiles:
        raise ModelNotFound(f"model {model!r} does not exist; known models: {sorted(rt.profiles)}", param="model")
    reports = [await rt.consistency.check(m) for m in ([model] if model else list(rt.profiles))]
    return {"object": "list", "enabled": rt.settings.consistency.enabled, "data": [r.to_dict() for r in reports]}
