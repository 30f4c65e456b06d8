"""One worker process of `embedding-gateway serve --workers N` (started by the parent, not by hand).

It serves the listening socket it inherits, from the routing snapshots the control plane pushes;
it runs no health checks, agreement checks or managed servers of its own.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from pathlib import Path

from config.settings import load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.worker")
    parser.add_argument("--fd", type=int, required=True, help="the inherited listening socket")
    parser.add_argument("--control", required=True, help="the control plane's unix socket")
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--config")
    args = parser.parse_args(argv)
    # The parent reloads on SIGHUP and then restarts its workers; a worker must not die of one
    # (`kill -HUP` of the whole process group).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    import uvicorn

    from gateway.app import create_app
    from gateway.cli import configure_logging
    from gateway.control.client import PlaneClient
    from gateway.server import uvicorn_config

    settings = load_settings(args.config)
    configure_logging(settings.server.log_level, tag=f"worker {args.id}", fmt=settings.server.log_format)
    plane = PlaneClient(Path(args.control), args.id)
    app = create_app(settings, None, plane=plane, worker_id=args.id)
    server = uvicorn.Server(uvicorn_config(app, settings.server))
    plane.serving = lambda: bool(server.started)
    sock = socket.socket(fileno=args.fd)
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
