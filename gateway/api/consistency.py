"""`GET /v1/consistency` (last report per model) and `POST /v1/consistency` (check now)."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, get, post
from litestar.params import QueryParameter

from gateway.api.schema import errors_of
from gateway.errors import ModelNotFound
from gateway.runtime import Runtime
from gateway.views import check_view, consistency_view


def _runtime(request: Request[Any, Any, Any]) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


@get("/v1/consistency", responses=errors_of(503))
async def last_reports(request: Request[Any, Any, Any]) -> dict[str, Any]:
    rt = _runtime(request)
    body = await rt.plane.request({"op": "reports"}) if rt.plane is not None else consistency_view(rt)
    # Shadows are sampled from each process's own traffic: this one's.
    body["shadows"] = rt.shadows.report(rt.profiles) if rt.shadows is not None else []
    return body


@post("/v1/consistency", status_code=200, responses=errors_of(400, 403, 404, 503))
async def check_now(
    request: Request[Any, Any, Any], model: Annotated[str | None, QueryParameter(name="model")] = None
) -> dict[str, Any]:
    rt = _runtime(request)
    if model is not None and model not in rt.profiles:
        raise ModelNotFound(f"model {model!r} does not exist; known models: {sorted(rt.profiles)}", param="model")
    if rt.plane is not None:  # checks run once, in the control plane
        return await rt.plane.request({"op": "check", "model": model}, timeout_s=None)
    return await check_view(rt, model)
