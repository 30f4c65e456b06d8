"""Operational routes: liveness, readiness, models, backends, metrics."""

from __future__ import annotations

import base64
import hashlib
import os
import signal
from pathlib import Path
from typing import Any

from litestar import Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath

from gateway.api.schema import Readiness, errors_of
from gateway.auth.guard import CALLER
from gateway.auth.usage import usage_view
from gateway.errors import InvalidRequest
from gateway.reload import Reloader
from gateway.runtime import Runtime
from gateway.views import backends_view


def _runtime(request: Request[Any, Any, Any]) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


@get("/health", responses=errors_of())
async def health(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """Liveness; names the worker process that answered (`serve --workers N`)."""
    return {"status": "ok", "worker": _runtime(request).worker_id, "pid": os.getpid()}


@get("/ready", responses={503: ResponseSpec(data_container=Readiness, description="not ready: says why")})
async def ready(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """200 when every model has a healthy compatible backend *and* its first agreement check has finished:
    from then on every backend that agreed can take over at once if another fails."""
    rt = _runtime(request)
    assert rt.consistency is not None
    healthy, checking = rt.readiness()
    lacking = sorted(m for m, names in healthy.items() if not names)
    # Every configured backend verified or failed: one still being checked is not yet a failover target.
    pending = {m: names for m in rt.profiles if (names := rt.consistency.pending(m))}
    not_ready = bool(lacking or checking or pending)
    body: dict[str, Any] = {"status": "not ready" if not_ready else "ready", "models": healthy}
    if lacking:
        body["models_without_healthy_backend"] = lacking
    if checking:
        body["models_checking_agreement"] = checking
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
        # The tokenizer that counts, limits and cuts this model's inputs (null: none known; inputs go as sent).
        "tokenizer": str(tok.path) if (tok := rt.service.lengths[name].tokenizer) is not None else None,
        "truncate": rt.service.lengths[name].truncate,
        "tasks": p.task_table,  # `task` / `input_type` values -> the prompt they mean
        "aliases": [{"id": a, "prompt": prompt} for a, (m, prompt) in rt.aliases.items() if m == name],
    }


def _alias_entry(rt: Runtime, alias: str) -> dict[str, Any]:
    """An alias is listed as a model of its own (frameworks pick models by name), saying what it stands for."""
    model, prompt = rt.aliases[alias]
    entry = _model_entry(rt, model)
    del entry["aliases"]
    return {**entry, "id": alias, "alias_of": model, "default_prompt_name": prompt or entry["default_prompt_name"]}


@get("/v1/models", responses=errors_of())
async def models(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The models the caller may use (all, when auth is off or the view is open and no key was sent)."""
    rt = _runtime(request)
    caller = CALLER.get()
    names = [n for n in rt.profiles if caller is None or caller.may_use(n)]
    aliases = [a for a, (m, _) in rt.aliases.items() if m in names]
    return {"object": "list", "data": [_model_entry(rt, n) for n in names] + [_alias_entry(rt, a) for a in aliases]}


@get("/v1/models/{model_id:str}", responses=errors_of(400, 404))
async def model(request: Request[Any, Any, Any], model_id: FromPath[str]) -> dict[str, Any]:
    rt = _runtime(request)
    if model_id in rt.aliases:
        rt.guard.allow_model(CALLER.get(), rt.aliases[model_id][0], True)
        return _alias_entry(rt, model_id)
    rt.guard.allow_model(CALLER.get(), model_id, model_id in rt.profiles)
    rt.service.profile(model_id)  # 404 in the client's dialect when unknown
    return _model_entry(rt, model_id)


_DASHBOARD = (Path(__file__).parent / "dashboard.html").read_bytes()


def _inline_hash(page: bytes, tag: bytes) -> str:
    """CSP source for the page's one inline <script> or <style>: allowed by its hash, nothing else inline."""
    body = page.split(b"<" + tag + b">", 1)[1].split(b"</" + tag + b">", 1)[0]
    return "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'"


_PAGE_HEADERS = {
    # Only this page's own script and style (by hash) run; data comes from this origin; no framing.
    "Content-Security-Policy": (
        f"default-src 'self'; script-src {_inline_hash(_DASHBOARD, b'script')}; "
        f"style-src {_inline_hash(_DASHBOARD, b'style')}; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


@get("/dashboard", media_type="text/html", responses=errors_of())
async def dashboard() -> Response[bytes]:
    """One self-refreshing page over /v1/models, /v1/backends and /v1/consistency: no CDN, no build step."""
    return Response(_DASHBOARD, media_type="text/html", headers=_PAGE_HEADERS)


@get("/info", responses=errors_of(404, tei=True))
async def info(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """TEI's `GET /info` for the default model (or `?model=`): what TEI clients - and another gateway using
    this one as a `kind = "tei"` backend - read to learn the limits."""
    rt = _runtime(request)
    name = request.query_params.get("model") or rt.default_model
    rt.guard.allow_model(CALLER.get(), name, name in rt.profiles)
    p = rt.service.profile(name)
    max_inputs = rt.settings.server.max_inputs
    return {
        "model_id": name,
        "model_sha": None,
        "model_dtype": "float32",
        "model_type": {"embedding": {"pooling": {"last": "last_token"}.get(p.pooling, p.pooling)}},
        "max_concurrent_requests": 512,
        "max_input_length": p.max_input_tokens,
        "max_batch_tokens": max_inputs * p.max_input_tokens,
        "max_batch_requests": None,
        "max_client_batch_size": max_inputs,
        # True when the model is configured to cut over-long inputs (`truncate`); a request may still ask.
        "auto_truncate": rt.service.lengths[name].truncate != "none",
        "tokenization_workers": 1,
        "version": "embedding-gateway",
        "served_model_name": name,
        "space_id": rt.consistency.space_id(name) if rt.consistency else None,
    }


@get("/v1/usage", responses=errors_of(403, 503))
async def usage(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """Per key usage (admin; auth on)."""
    return await usage_view(_runtime(request))


@post(
    "/v1/reload",
    status_code=200,
    responses={202: ResponseSpec(None, description="--workers N: reloading"), **errors_of(400, 403)},
)
async def reload(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """Reload the configuration file (admin; as SIGHUP does)."""
    rt = _runtime(request)
    if rt.plane is not None:  # a worker: the control plane reloads and then replaces the workers
        os.kill(os.getppid(), signal.SIGHUP)
        return Response({"status": "reloading"}, status_code=202)
    reloader: Reloader = request.app.state.reloader
    if not await reloader.reload():
        why = reloader.last_error or "no configuration file to reload (serve was started without --config)"
        raise InvalidRequest(f"reload refused, the running configuration stays: {why}")
    return Response({"status": "reloaded"}, status_code=200)


@get("/v1/backends", responses=errors_of(503))
async def backends(request: Request[Any, Any, Any]) -> dict[str, Any]:
    rt = _runtime(request)
    if rt.plane is not None:  # a worker: the control plane holds the shared view
        return await rt.plane.request({"op": "view"})
    return backends_view(rt)


@get("/metrics", media_type="text/plain; version=0.0.4", responses=errors_of())
async def metrics(request: Request[Any, Any, Any]) -> bytes:
    rt = _runtime(request)
    rt.refresh_gauges()
    return rt.metrics.render()
