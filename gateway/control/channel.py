"""The control channel between the parent and its workers: one JSON object per line over a unix socket."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec

LIMIT = 16 * 1024 * 1024  # a line holds a snapshot or a report: far below this


_ENCODER = msgspec.json.Encoder(enc_hook=str)  # typed structs (a snapshot) as JSON; anything odd as text


def encode(message: Any) -> bytes:
    return _ENCODER.encode(message) + b"\n"


async def read(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at end of stream."""
    line = await reader.readline()
    if not line:
        return None
    message: dict[str, Any] = json.loads(line)
    return message
