"""`GET /v1/usage`: per key, what it did since the gateway started (all workers together), and - with
shared quota storage - where it stands in the current window across every replica."""

from __future__ import annotations

from typing import Any

from gateway.metrics import Metrics
from gateway.runtime import Runtime

_FIELDS = {
    "embedding_gateway_key_requests": ("requests", "status"),
    "embedding_gateway_key_texts": ("texts", "model"),
    "embedding_gateway_key_tokens": ("tokens", "model"),
    "embedding_gateway_key_rejections": ("rejections", "reason"),
}


def _since_start(metrics: Metrics) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for family in metrics.collect():
        field = _FIELDS.get(family.name)
        if field is None:
            continue
        what, label = field
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            entry = out.setdefault(sample.labels["key"], {w: {} for w, _ in _FIELDS.values()})
            entry[what][sample.labels[label]] = entry[what].get(sample.labels[label], 0) + sample.value
    return out


async def usage_view(rt: Runtime) -> dict[str, Any]:
    counted = _since_start(rt.metrics)
    data = []
    for key in rt.settings.auth.keys:
        windows = await rt.quotas.current(key)
        entry: dict[str, Any] = {
            "key": key.name,
            "models": key.models,
            "admin": key.admin,
            "limits": {"rpm": key.rpm, "texts_per_minute": key.texts_per_minute},
            "since_start": counted.get(key.name, {w: {} for w, _ in _FIELDS.values()}),
            "window": {
                what: {"limit": w.limit, "remaining": w.remaining, "reset_s": round(w.reset_s, 3)}
                for what, w in windows.items()
            },
        }
        data.append(entry)
    return {
        "object": "list",
        "storage": "shared" if rt.quotas.shared else "per process",
        "window_s": rt.settings.auth.window_s,
        "unauthenticated": counted.get("-", {}).get("rejections", {}),
        "data": data,
    }
