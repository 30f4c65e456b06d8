"""`embedding-gateway` command line: `serve` now; room for `check` and more."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config.settings import ConfigError, GatewaySettings, load_settings
from gateway.workers import worker_count

EXIT_CONFIG = 2


def _load(path: str | None) -> GatewaySettings:
    return load_settings(path or os.environ.get("EMBEDDING_GATEWAY_CONFIG"))


def configure_logging(level: str, tag: str = "", fmt: str = "text") -> None:
    """`tag`: which process of `serve --workers N` logs (the control plane, a worker). `fmt`: `text`
    (for people) or `json` (one object per line, plus an access line per request)."""
    from gateway.logs import JsonFormatter, RequestIdFilter

    prefix = f"{tag} " if tag else ""
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {prefix}%(name)s [%(request_id)s]: %(message)s",
        force=True,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())  # `-` outside a request
        if fmt == "json":
            handler.setFormatter(JsonFormatter(tag))
    # One line per backend call from httpx would drown the log; our own messages say what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("gguf").setLevel(logging.WARNING)
    # elastic_transport logs every failed attempt; the gateway already logs each backend problem once.
    logging.getLogger("elastic_transport").setLevel(logging.ERROR)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if args.host:
        settings.server.host = args.host
    if args.port is not None:
        settings.server.port = args.port
    path = args.config or os.environ.get("EMBEDDING_GATEWAY_CONFIG")
    workers: int = args.workers
    if workers > 1:
        # Before anything imports prometheus_client: the parent sets up multiprocess metrics.
        from gateway.workers import serve_workers

        configure_logging(settings.server.log_level, tag="control", fmt=settings.server.log_format)
        return serve_workers(settings, Path(path) if path else None, workers)
    configure_logging(settings.server.log_level, fmt=settings.server.log_format)
    import uvicorn

    from gateway.app import create_app
    from gateway.server import uvicorn_config

    app = create_app(settings, Path(path) if path else None)
    uvicorn.Server(uvicorn_config(app, settings.server)).run()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Run the agreement checks once, without serving: 0 all agree, 1 disagreement, 2 error."""
    settings = _load(args.config)
    configure_logging("error" if args.json else "warning")
    return asyncio.run(_check(settings, as_json=args.json, wait_s=args.wait))


async def _check(settings: GatewaySettings, *, as_json: bool, wait_s: float) -> int:
    from gateway.consistency.report import render
    from gateway.runtime import Runtime
    from gateway.tokens import tokenizer_of

    # A deploy gate is not latency-critical: on a busy machine a slow answer is an answer, not a failure.
    settings.resilience.health_timeout_s = max(settings.resilience.health_timeout_s, 15.0)
    runtime = Runtime(settings, background=False)
    runtime.start()
    assert runtime.health is not None and runtime.consistency is not None
    try:
        # Managed servers take a moment to come up; give every backend until `wait_s` to answer.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            await runtime.health.check_all()
            if all(st.healthy for st in runtime.states) or loop.time() >= deadline:
                break
            await asyncio.sleep(0.5)
        # A slow backend is waited for (its calls have generous, learned timeouts), with a sign of life.
        progress = asyncio.create_task(_progress(runtime.states, as_json))
        try:
            reports = await runtime.consistency.check_all()
        finally:
            progress.cancel()
    finally:
        await runtime.stop()
    code = 1 if any(r.disagreement for r in reports) else 2 if any(r.errors for r in reports) else 0
    unpinned = [m.name for m in settings.models if m.space is None]
    if unpinned and not as_json:
        print(
            f"warning: models {unpinned} have no pinned space: each process judges against whatever its reference "
            "produces now. In production record one (embedding-gateway space record) and set [[models]] space.",
            file=sys.stderr,
        )
    tokenizers = {m.name: str(t.path) if (t := tokenizer_of(m)) is not None else None for m in settings.models}
    untokenized = [name for name, path in tokenizers.items() if path is None]
    if untokenized and not as_json:
        print(
            f"warning: models {untokenized} have no tokenizer ([[models]] tokenizer): the gateway cannot count, "
            "limit or truncate their inputs, so each backend applies its own length rules",
            file=sys.stderr,
        )
    if as_json:
        result = {0: "agree", 1: "disagree", 2: "error"}[code]
        body = {"result": result, "exit_code": code, "tokenizers": tokenizers, "models": [r.to_dict() for r in reports]}
        print(json.dumps(body, indent=2))
    else:
        print(render(reports))
        print(
            {
                0: "all backends agree",
                1: "DISAGREEMENT: see the findings above",
                2: "ERROR: some backends could not be checked",
            }[code]
        )
    return code


async def _progress(states: Any, quiet: bool, every_s: float = 5.0) -> None:
    """A line on stderr every few seconds while the check waits for slow backends."""
    started = time.monotonic()
    while True:
        await asyncio.sleep(every_s)
        busy = [st.backend.name for st in states if st.in_flight or st.admission.queued]
        if not quiet or busy:
            print(
                f"checking... {time.monotonic() - started:.0f}s; waiting for {', '.join(busy) or 'the verdict'}",
                file=sys.stderr,
                flush=True,
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedding-gateway", description="One stable embeddings API over many backends."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the API")
    serve.add_argument("--config", help="TOML file (default: $EMBEDDING_GATEWAY_CONFIG)")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument(
        "--workers",
        default=1,
        type=worker_count,
        help="processes serving the port (default 1; `auto`: one per CPU); health and agreement checks and "
        "managed servers still run once",
    )
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser(
        "check",
        help="check that all backends of each model produce the same embedding space (a deploy gate)",
        description="Exit code: 0 all agree, 1 disagreement, 2 configuration or connection error.",
    )
    check.add_argument("--config", help="TOML file (default: $EMBEDDING_GATEWAY_CONFIG)")
    check.add_argument("--json", action="store_true", help="print the reports as JSON")
    check.add_argument("--wait", type=float, default=15.0, help="seconds to wait for backends to come up")
    check.set_defaults(func=cmd_check)
    from gateway import bulk, keys_cli, space_cli

    space_cli.add_parser(sub)
    keys_cli.add_parser(sub)
    bulk.add_parser(sub)
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
