"""`embedding-gateway` command line: `serve` now; room for `check` and more."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from config.settings import ConfigError, GatewaySettings, load_settings

EXIT_CONFIG = 2


def _load(path: str | None) -> GatewaySettings:
    return load_settings(path or os.environ.get("EMBEDDING_GATEWAY_CONFIG"))


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per backend call from httpx would drown the log; our own messages say what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("gguf").setLevel(logging.WARNING)
    # elastic_transport logs every failed attempt; the gateway already logs each backend problem once.
    logging.getLogger("elastic_transport").setLevel(logging.ERROR)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app

    settings = _load(args.config)
    if args.host:
        settings.server.host = args.host
    if args.port is not None:
        settings.server.port = args.port
    configure_logging(settings.server.log_level)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.server.log_level,
        access_log=False,  # per-request logs cost more than the proxy hop; metrics count requests
        timeout_graceful_shutdown=int(settings.server.shutdown_grace_s),
        lifespan="on",
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedding-gateway", description="One stable embeddings API over many backends."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the API")
    serve.add_argument("--config", help="TOML file (default: $EMBEDDING_GATEWAY_CONFIG)")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"embedding-gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
