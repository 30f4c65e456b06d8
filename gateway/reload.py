"""Live reload: SIGHUP re-reads the configuration file and swaps in a new runtime.

The new runtime is built beside the running one and takes over once it is ready (as `/ready` means
it: a healthy compatible backend per model, first agreement checks done; at most after
`_TAKEOVER_LIMIT_S`), so a reload opens no window of 503s; requests already in flight finish on the
old runtime, which is then stopped. Managed llama.cpp servers whose configuration did not change are
handed over, not restarted. A new configuration that does not load keeps the old one running, with
one log line naming the field. `[server]` settings (address, limits) need a restart to change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from config.settings import ConfigError, load_settings
from gateway.runtime import Runtime

if TYPE_CHECKING:
    from litestar import Litestar
    from litestar.datastructures import State

log = logging.getLogger(__name__)

_TAKEOVER_LIMIT_S = 60.0  # the new runtime takes over after its first checks, or after this long


def _fingerprint(path: Path) -> bytes | None:
    try:
        return path.read_bytes()  # content, not mtime: a rewrite with the same bytes is no change
    except OSError:
        return None


class Reloader:
    def __init__(
        self, state: State, config_path: Path | None, after: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """`after`: run once a reload has taken over (`serve --workers N` then replaces its workers)."""
        self._state = state
        self._path = config_path
        self._after = after
        self.last_error: str | None = None  # why the last reload was refused
        self.reloads = 0
        self._running: asyncio.Task[bool] | None = None
        self._again = False  # asked again while one ran: one follow-up reload of the latest file

    @property
    def runtime(self) -> Runtime:
        rt: Runtime = self._state.runtime
        return rt

    @asynccontextmanager
    async def lifespan(self, _app: Litestar) -> AsyncIterator[None]:
        self.runtime.start()
        loop = asyncio.get_running_loop()
        watcher: asyncio.Task[None] | None = None
        if self._path is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
            if self.runtime.settings.server.watch_config:
                watcher = asyncio.create_task(self.watch(self._path), name="watch-config")
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)
            await self.runtime.stop()  # whichever runtime is current

    async def watch(self, path: Path, every_s: float = 1.0) -> None:
        """Reload when the file's content changes (a Kubernetes ConfigMap update swaps a symlink)."""
        seen = _fingerprint(path)
        while True:
            await asyncio.sleep(every_s)
            now = _fingerprint(path)
            if now != seen and now is not None:
                seen = now
                log.info("configuration file %s changed: reloading", path)
                await self.reload()

    async def reload(self) -> bool:
        """Load the file again and swap runtimes; False (old one kept) when the new config is invalid.

        Requests (signals, `POST /v1/reload`, the file watcher) that arrive while a reload runs are merged
        into one follow-up reload of the file as it is then, and every such caller gets its outcome: ten
        SIGHUPs in a row are two reloads, not ten rolling restarts of every worker."""
        if self._path is None:
            return False
        self._again = True
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._until_settled())
        return await asyncio.shield(self._running)

    async def _until_settled(self) -> bool:
        ok = False
        while self._again:
            self._again = False
            ok = await self._reload_once()
        return ok

    async def _reload_once(self) -> bool:
        assert self._path is not None
        old = self.runtime
        try:
            settings = load_settings(self._path)
        except ConfigError as exc:
            self.last_error = " ".join(str(exc).split())
            log.error("reload refused, the running configuration stays: %s", self.last_error)
            return False
        self.last_error = None
        if settings.server != old.settings.server:
            log.warning("reload: [server] changes take effect only after a restart")
            settings.server = old.settings.server
        new = Runtime(settings, metrics=old.metrics, plane=old.plane, worker_id=old.worker_id)
        new.quotas.inherit(old.quotas)
        if settings.cache == old.settings.cache:
            new.cache = old.cache  # a reload keeps what is cached (the space id in each key guards it)
        new.start(adopt=old.supervisors)
        started = time.monotonic()
        while not new.ready() and time.monotonic() - started < _TAKEOVER_LIMIT_S:
            await asyncio.sleep(0.05)
        if not new.ready():
            log.warning(
                "reload: the new configuration is not ready after %.0fs; it takes over anyway", _TAKEOVER_LIMIT_S
            )
        self._state.runtime = new  # new requests go here from now on
        self.reloads += 1
        log.info(
            "configuration reloaded from %s in %.1fs: models %s, backends %s",
            self._path,
            time.monotonic() - started,
            sorted(new.profiles),
            [st.backend.name for st in new.states],
        )
        await self._retire(old, new)
        if self._after is not None:
            await self._after()
        return True

    async def _retire(self, old: Runtime, new: Runtime) -> None:
        """Let the old runtime's requests finish (within the shutdown grace), then stop it."""
        end = time.monotonic() + old.settings.server.shutdown_grace_s
        while old.active and time.monotonic() < end:
            await asyncio.sleep(0.05)
        handed_over = {name for name, sup in new.supervisors.items() if old.supervisors.get(name) is sup}
        await old.stop(
            keep=handed_over, keep_cache=new.cache is old.cache
        )  # a managed server whose settings changed was replaced: stop it
