"""Application factory: settings in, a ready-to-serve ASGI app out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, YamlRenderPlugin

from config.settings import GatewaySettings
from gateway.api import errors, schema
from gateway.api.context import RequestContext
from gateway.api.direct import EmbeddingRoutes
from gateway.api.routes import TABLE
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
        route_handlers=TABLE.handlers,  # with the schema-only ones that describe the direct routes in OpenAPI
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
    TABLE.check_served(app.routes)
    schema.describe_models(app.openapi_schema, [m.name for m in settings.models])
    return RequestContext(app, runtime.metrics, EmbeddingRoutes(state), state)
