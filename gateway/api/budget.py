"""Bounding the work the process holds at once: request bodies being read or processed, and texts
being embedded. Beyond the bound a request gets 503 + Retry-After at once instead of growing the
process (a burst of 2.9 MB bodies once took it from 164 MB to 1.1 GB for good) or starving others.

Small requests are counted but never refused: their cost is bounded by the connection cap, and they
are exactly the traffic a bulk job must not crowd out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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

    @contextmanager
    def body(self, size: int) -> Iterator[None]:
        if size > SMALL_BYTES and self.bytes + size > self.max_bytes:
            raise Overloaded(
                f"the gateway is processing {self.bytes // 1024} KiB of request bodies (limit "
                f"server.max_inflight_bytes = {self.max_bytes // 1024} KiB); retry shortly or send smaller requests",
                retry_after=1,
            )
        self.bytes += size
        try:
            yield
        finally:
            self.bytes -= size

    @contextmanager
    def work(self, texts: int) -> Iterator[None]:
        if texts > SMALL_TEXTS and self.texts + texts > self.max_texts:
            raise Overloaded(
                f"the gateway is embedding {self.texts} texts (limit server.max_inflight_texts = "
                f"{self.max_texts}); retry shortly or send smaller requests",
                retry_after=1,
            )
        self.texts += texts
        try:
            yield
        finally:
            self.texts -= texts
