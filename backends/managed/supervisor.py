"""Launches and supervises a managed llama.cpp server: prepare the model, start, restart on death, stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from backends.managed.models import ModelPreparationError, prepare_gguf
from backends.managed.process import LlamaCppProcess, PortInUse
from config.backends import ManagedLlamaCpp

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 30.0


class Supervisor:
    """Runs in the gateway's event loop; never blocks start-up (preparation happens in a thread)."""

    def __init__(self, name: str, cfg: ManagedLlamaCpp, api_key: str | None = None) -> None:
        self.name = name
        self.cfg = cfg
        self.process = LlamaCppProcess(
            gguf=Path(cfg.gguf) if cfg.gguf else Path(),
            port=cfg.port,
            pooling=cfg.pooling,
            ctx_size=cfg.ctx_size,
            batch_size=cfg.batch_size,
            parallel=cfg.parallel,
            threads=cfg.threads,
            api_key=api_key,
            binary=cfg.binary,
            pidfile=Path(cfg.cache_dir).expanduser() / "run" / f"{name}.pid",
        )
        self.error: str | None = None
        self.restarts = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def url(self) -> str:
        return self.process.url

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"supervise-{self.name}")

    async def _prepare(self) -> Path:
        if self.cfg.gguf is not None:
            path = Path(self.cfg.gguf).expanduser()
            if not path.is_file():
                raise ModelPreparationError(f"gguf file {str(path)!r} does not exist")
            return path
        assert self.cfg.source is not None
        return await asyncio.to_thread(prepare_gguf, self.cfg.source, self.cfg.cache_dir, self.cfg.quantization)

    async def _run(self) -> None:
        try:
            self.process.gguf = await self._prepare()
        except ModelPreparationError as exc:
            self.error = str(exc)
            log.error("backend %s: %s", self.name, exc)
            return
        self.process.log_path = self.process.gguf.parent.parent / "logs" / f"{self.name}.log"
        self.process.log_path.parent.mkdir(parents=True, exist_ok=True)
        backoff = 0.5
        while not self._stopping:
            try:
                # On the loop's own thread: the parent-death signal fires when the *thread* that
                # started the child ends, and this one lives as long as the gateway.
                self.process.start()
            except PortInUse as exc:
                self.error = f"cannot launch llama.cpp server: {exc}; retrying in {backoff:g}s"
                log.error("backend %s: %s", self.name, self.error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                continue
            except OSError as exc:
                self.error = f"cannot launch llama.cpp server: {exc}"
                log.error("backend %s: %s", self.name, self.error)
                return
            log.info(
                "backend %s: llama.cpp server started on %s (pid %s)",
                self.name,
                self.url,
                self.process.proc and self.process.proc.pid,
            )
            self.error = None
            started = asyncio.get_running_loop().time()
            while self.process.alive() and not self._stopping:
                await asyncio.sleep(0.2)
            if asyncio.get_running_loop().time() - started > 10 * _MAX_BACKOFF_S:
                backoff = 0.5  # it ran fine for a long while: this death is not part of a crash loop
            if self._stopping:
                return
            code = self.process.proc.returncode if self.process.proc else None
            self.restarts += 1
            self.error = f"llama.cpp server exited with code {code}; restarting (restart #{self.restarts})"
            log.warning("backend %s: %s; see %s", self.name, self.error, self.process.log_path)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self.process.stop)
