"""Application factory: settings in, a ready-to-serve ASGI app out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, YamlRenderPlugin

from config.settings import GatewaySettings
from gateway.api import consistency, errors, openai, ops, schema, tei
from gateway.api.context import RequestContext
from gateway.api.direct import EmbeddingRoutes
from gateway.reload import Reloader
from gateway.runtime import Runtime

if TYPE_CHECKING:
    from gateway.control.client import PlaneClient


def create_app(
    settings: GatewaySettings, config_path: Path | None = None, plane: PlaneClient | None = None, worker_id: int = 0
) -> RequestContext:
    """`config_path`: the file SIGHUP reloads (none: no live reload). `plane`: this is a worker of
    `serve --workers N`, following that control plane."""
    runtime = Runtime(settings, plane=plane, worker_id=worker_id)
    state = State({"runtime": runtime})
    reloader = Reloader(state, config_path)
    state.reloader = reloader
    app = Litestar(
        route_handlers=[
            ops.health,
            ops.ready,
            ops.models,
            ops.model,
            ops.backends,
            ops.metrics,
            ops.usage,
            ops.info,
            ops.dashboard,
            ops.reload,
            consistency.last_reports,
            consistency.check_now,
            *schema.HANDLERS,  # describe the embedding routes in /schema/openapi.json (served by direct)
        ],
        exception_handlers={Exception: errors.handle},
        request_max_body_size=settings.server.max_body_bytes,
        lifespan=[plane.lifespan, reloader.lifespan] if plane is not None else [reloader.lifespan],
        state=state,
        # /schema/openapi.json (and .yaml); no documentation UI: those load from CDNs.
        openapi_config=OpenAPIConfig(
            title="embedding-gateway",
            version="0.1.0",
            description="One stable embeddings API (OpenAI and TEI dialects) over many backends that provably "
            "share one embedding space.",
            path="/schema",
            render_plugins=[JsonRenderPlugin(), YamlRenderPlugin()],
        ),
        logging_config=None,  # the CLI configures logging once for the whole process
    )
    schema.describe_models(app.openapi_schema, [m.name for m in settings.models])
    tei_route = (tei.parse, tei.render)  # TEI serves embeddings on /embed, / and SageMaker's /invocations
    routes = {"/v1/embeddings": (openai.parse, openai.render), "/embed": tei_route, "/": tei_route}
    direct = EmbeddingRoutes(state, {**routes, "/invocations": tei_route})
    return RequestContext(app, runtime.metrics, direct, state)
