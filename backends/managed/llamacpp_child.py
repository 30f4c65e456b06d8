"""Child-process entry point that runs llama.cpp's own HTTP server on a GGUF file.

`xllamacpp.Server` lives as long as the Python process that created it, so the gateway (and the tests)
run it here, in a process of its own that can be supervised, killed and restarted. When a
`llama-server` binary is on PATH the supervisor runs that instead; the flags below mirror its own.

    python -m backends.managed.llamacpp_child --model M.gguf --port 8081 --pooling mean
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

POOLING = ("mean", "cls", "last", "none")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="path to a .gguf file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pooling", choices=POOLING, default=None, help="override the GGUF's pooling type")
    p.add_argument("--ctx-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=512, help="n_batch = n_ubatch (encoders need one ubatch)")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="0 = llama.cpp's default")
    return p.parse_args(argv)


def watch_parent(stop: threading.Event) -> None:
    """Exit when the gateway that started us is gone (belt and braces next to the parent-death signal)."""
    parent = int(os.environ.get("EMBEDDING_GATEWAY_PARENT_PID", "0") or 0)
    if not parent:
        return

    def run() -> None:
        while not stop.wait(1.0):
            if os.getppid() != parent:
                stop.set()

    threading.Thread(target=run, name="watch-parent", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import xllamacpp as xlc  # imported late: `--help` must work without loading the native library

    params = xlc.CommonParams()
    params.model.path = args.model
    params.embedding = True
    if args.pooling:
        params.pooling_type = getattr(xlc.llama_pooling_type, f"LLAMA_POOLING_TYPE_{args.pooling.upper()}")
    params.hostnames = [args.host]
    params.port = args.port
    params.n_ctx = args.ctx_size
    params.n_batch = args.batch_size
    params.n_ubatch = args.batch_size
    params.n_parallel = args.parallel
    if args.threads > 0:
        params.cpuparams.n_threads = args.threads
        params.cpuparams_batch.n_threads = args.threads
    api_key = os.environ.get("LLAMA_API_KEY")  # from the environment: never on the command line
    if api_key:
        params.api_keys = [api_key]
    server = xlc.Server(params)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    watch_parent(stop)
    print(f"llama.cpp server listening on {server.listening_address}", flush=True)
    stop.wait()
    del server
    return 0


if __name__ == "__main__":
    sys.exit(main())
