"""`/dashboard` (issue 12, item 1) in a real headless browser (Debian's chromium): against a gateway with one
quarantined backend, the rendered page shows it as quarantined, with its diagnosis. The screenshot is kept in
test-artifacts/ (or $EMBEDDING_GATEWAY_ARTIFACTS)."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from backends.managed.process import LlamaCppProcess
from tests.helpers import embed_url, llamacpp_backend, run_gateway, settings_for, wait_until

ARTIFACTS = Path(os.environ.get("EMBEDDING_GATEWAY_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.fail("chromium is not installed: `make test` installs Debian's chromium package")


def browse(url: str, *args: str) -> str:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    cmd += ["--virtual-time-budget=10000", "--window-size=1500,1100", *args, url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_dashboard_shows_the_quarantined_backend_with_its_diagnosis(
    primary: LlamaCppProcess, llama_factory: Callable[..., LlamaCppProcess], variants: dict[str, Path]
) -> None:
    odd = llama_factory("dash-perturbed", gguf=variants["perturbed"])
    backends = [llamacpp_backend("primary", primary.url), llamacpp_backend("odd", odd.url, priority=1)]
    with run_gateway(settings_for(backends)) as gw:
        wait_until(lambda: httpx.get(f"{gw.url}/v1/backends").json()["data"][1]["agreement"] == "disagree", 60)
        assert embed_url(gw.url, "some traffic").status_code == 200
        page = httpx.get(f"{gw.url}/dashboard")
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        # Hardened (issue 17, item 7): no inline code but the page's own (by hash), no sniffing, no framing.
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'sha256-" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp and page.headers["x-frame-options"] == "DENY"
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "https://" not in page.text  # nothing from a CDN
        dom = browse(f"{gw.url}/dashboard", "--dump-dom")
        row = re.search(r'<tr data-backend="odd">(.*?)</tr>', dom, re.S)
        assert row is not None, dom[:3000]
        assert 'data-state="quarantined"' in row.group(1)
        detail = httpx.get(f"{gw.url}/v1/backends").json()["data"][1]["agreement_detail"]
        assert detail and html.escape(detail, quote=False)[:60] in row.group(1)  # the diagnosis, in words
        primary_row = re.search(r'<tr data-backend="primary">(.*?)</tr>', dom, re.S)
        assert primary_row is not None and 'data-state="serving"' in primary_row.group(1)
        assert 'class="matrix"' in dom and "different_model" in dom  # the heatmap and the finding
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        shot.unlink(missing_ok=True)
        browse(f"{gw.url}/dashboard", f"--screenshot={shot}")
        assert shot.stat().st_size > 10_000
