"""Bounding the work the process holds at once: request bodies being read or processed, and texts
being embedded. Beyond the bound a request gets 503 + Retry-After at once instead of growing the
process (a burst of 2.9 MB bodies once took it from 164 MB to 1.1 GB for good) or starving others.

Small requests are counted but never refused: their cost is bounded by the connection cap, and they
are exactly the traffic a bulk job must not crowd out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

from gateway.errors import Overloaded

SMALL_BYTES = 256 * 1024
SMALL_TEXTS = 64


@dataclass
class WorkBudget:
    max_bytes: int
    max_texts: int
    bytes: int = 0
    texts: int = 0

    def body(self, size: int) -> AbstractContextManager[None]:
        """Hold `size` bytes of request body while it is read and processed."""
        return self._hold("bytes", size, SMALL_BYTES, self.max_bytes, "KiB of request bodies", "max_inflight_bytes")

    def work(self, texts: int) -> AbstractContextManager[None]:
        """Hold `texts` texts while they are embedded."""
        return self._hold("texts", texts, SMALL_TEXTS, self.max_texts, "texts", "max_inflight_texts")

    @contextmanager
    def _hold(self, field: str, amount: int, small: int, limit: int, what: str, key: str) -> Iterator[None]:
        held: int = getattr(self, field)
        if amount > small and held + amount > limit:
            scale = 1024 if field == "bytes" else 1
            raise Overloaded(
                f"the gateway is processing {held // scale} {what} (limit server.{key} = {limit // scale}); "
                "retry shortly or send smaller requests",
                retry_after=1,
            )
        setattr(self, field, held + amount)
        try:
            yield
        finally:
            setattr(self, field, getattr(self, field) - amount)
