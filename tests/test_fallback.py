"""Simple fallback: priority order; connection errors, timeouts, 5xx and bad output move to the next."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import httpx
import numpy as np
import pytest

from backends.base import Embeddings
from backends.errors import InputRejected
from backends.llamacpp import LlamaCppAdapter
from backends.managed.process import LlamaCppProcess, free_port
from config.backends import LlamaCppBackend
from gateway.errors import NoBackendAvailable
from gateway.metrics import Metrics
from gateway.router import Router
from gateway.state import BackendState
from tests.fakes import InProcessBackend
from tests.helpers import hanging_server, llamacpp_backend, run_gateway, settings_for, wait_until


def test_killing_the_primary_moves_traffic_to_the_fallback(llama_factory: Callable[..., LlamaCppProcess]) -> None:
    first, second = llama_factory("doomed"), llama_factory("spare")
    backends = [llamacpp_backend("first", first.url, priority=0), llamacpp_backend("second", second.url, priority=1)]
    with run_gateway(settings_for(backends)) as gw, gw.client() as c:
        ok = c.post("/v1/embeddings", json={"model": "minilm", "input": "before"})
        assert ok.status_code == 200 and ok.headers["x-embedding-backend"] == "first"
        first.kill()
        after = c.post("/v1/embeddings", json={"model": "minilm", "input": "after"})
        assert after.status_code == 200, after.text
        assert after.headers["x-embedding-backend"] == "second"
        # The call that failed (or, when the request overflowed to the idle second backend at once, the
        # health check) says why; either way the first backend is out.
        wait_until(lambda: "connection failed" in (c.get("/v1/backends").json()["data"][0]["last_error"] or ""))
        wait_until(lambda: c.get("/v1/backends").json()["data"][0]["healthy"] is False)  # the health check agrees
        metrics = c.get("/metrics").text
        assert 'embedding_gateway_fallbacks_total{model="minilm"} 1.0' in metrics or (
            'embedding_gateway_overflow_total{backend="second",model="minilm"}' in metrics
        )
        # /ready still 200: the model has a healthy backend.
        assert c.get("/ready").status_code == 200
        second.kill()
        none = c.post("/v1/embeddings", json={"model": "minilm", "input": "nobody home"})
        assert none.status_code == 503 and none.headers["retry-after"]
        assert "no backend of model 'minilm'" in none.json()["error"]["message"]
        assert none.json()["error"]["code"] == "no_backend_available"
        wait_until(lambda: c.get("/ready").status_code == 503, timeout=10)  # the health poll notices
        ready = c.get("/ready")
        assert ready.status_code == 503 and ready.json()["models_without_healthy_backend"] == ["minilm"]


def test_ready_is_503_when_a_model_has_no_healthy_backend(primary: LlamaCppProcess) -> None:
    backends = [
        llamacpp_backend("alive", primary.url),
        llamacpp_backend("dead", f"http://127.0.0.1:{free_port()}", model="other"),
    ]
    models = [{"name": "minilm", "profile": "all-minilm-l6-v2"}, {"name": "other", "profile": "all-minilm-l6-v2"}]
    with run_gateway(settings_for(backends, models), wait_ready=False) as gw, gw.client() as c:
        wait_until(lambda: c.get("/ready").json()["models"]["minilm"] == ["alive"], timeout=10)  # first checks
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["models_without_healthy_backend"] == ["other"]
        assert r.json()["models"]["minilm"] == ["alive"]


class FakeBackend(InProcessBackend):
    """An in-process backend for router-level faults the real server cannot be made to produce."""

    def __init__(self, name: str, priority: int, vectors: Callable[[int], np.ndarray] | Exception) -> None:
        super().__init__(name, priority)
        self._vectors = vectors
        self.calls = 0

    async def embed(
        self, texts: Sequence[str], prompt_name: str | None = None, timeout_s: float | None = None
    ) -> Embeddings:
        self.calls += 1
        if isinstance(self._vectors, Exception):
            raise self._vectors
        return Embeddings(self._vectors(len(texts)))


GOOD = FakeBackend("good", 9, lambda n: np.ones((n, 4), np.float32))


@pytest.mark.parametrize(
    "bad",
    [
        lambda n: np.ones((n, 3), np.float32),  # wrong dimension
        lambda n: np.ones((n + 1, 4), np.float32),  # wrong count
        lambda n: np.full((n, 4), np.nan, np.float32),  # NaN
        lambda n: np.zeros((n, 4), np.float32),  # zero vector
    ],
)
async def test_bad_output_is_a_backend_failure_never_client_data(bad: Callable[[int], np.ndarray]) -> None:
    liar = FakeBackend("liar", 0, bad)
    router = Router([BackendState(liar), BackendState(GOOD)], {"m": 4}, Metrics())
    routed = await router.embed("m", ["a", "b"])
    assert routed.backends == ("good",) and routed.vectors.shape == (2, 4) and liar.calls == 1


async def test_input_rejection_is_not_retried_elsewhere() -> None:
    picky = FakeBackend("picky", 0, InputRejected("picky", "too long"))
    spare = FakeBackend("spare", 1, lambda n: np.ones((n, 4), np.float32))
    router = Router([BackendState(picky), BackendState(spare)], {"m": 4}, Metrics())
    with pytest.raises(InputRejected):
        await router.embed("m", ["x"])
    assert spare.calls == 0


async def test_known_unhealthy_backend_is_tried_last(primary: LlamaCppProcess) -> None:
    dead_cfg = LlamaCppBackend.model_validate(
        {"name": "dead", "kind": "llamacpp", "model": "m", "url": f"http://127.0.0.1:{free_port()}", "priority": 0}
    )
    live_cfg = LlamaCppBackend.model_validate(
        {"name": "live", "kind": "llamacpp", "model": "m", "url": primary.url, "priority": 1}
    )
    dead = BackendState(LlamaCppAdapter(dead_cfg), healthy=False)
    router = Router([dead, BackendState(LlamaCppAdapter(live_cfg))], {"m": 384}, Metrics())
    routed = await router.embed("m", ["x"])
    assert routed.backends == ("live",) and dead.requests == 0


async def test_all_failing_gives_no_backend_available_with_retry_after() -> None:
    from backends.errors import BackendOverloaded

    busy = FakeBackend("busy", 0, BackendOverloaded("busy", "slow down", retry_after=7))
    router = Router([BackendState(busy)], {"m": 4}, Metrics())
    with pytest.raises(NoBackendAvailable) as info:
        await router.embed("m", ["x"])
    assert 6 < info.value.retry_after <= 7  # the circuit is held open as long as the backend asked
    assert busy.calls == 1  # ...and nothing hammers it meanwhile


def test_hung_backend_times_out_to_the_fallback(primary: LlamaCppProcess) -> None:
    # Accepts and never answers: the per-call read timeout must move us on.
    with hanging_server() as hung_url:
        backends = [
            llamacpp_backend("hung", hung_url, timeout_s=0.5),
            llamacpp_backend("live", primary.url, priority=1),
        ]
        models = [{"name": "minilm", "profile": "all-minilm-l6-v2", "reference": "live"}]
        with run_gateway(settings_for(backends, models), wait_ready=False) as gw:
            r = httpx.post(gw.url + "/v1/embeddings", json={"model": "minilm", "input": "x"}, timeout=10)
            assert r.status_code == 200 and r.headers["x-embedding-backend"] == "live"


async def test_a_backend_going_down_during_the_check_does_not_break_it(
    primary: LlamaCppProcess, fallback: LlamaCppProcess
) -> None:
    """Issue 17, item 5: the health monitor changes a backend's state while the check awaits describe(); the
    check read `unreachable` twice and died with StopIteration, leaving the fallback unverified."""
    from backends.base import BackendInfo
    from config import BUILTIN_PROFILES
    from gateway.consistency.checker import Checker
    from gateway.consistency.report import Verdict

    cfg = {"kind": "llamacpp", "model": "m"}
    ref = BackendState(LlamaCppAdapter(LlamaCppBackend.model_validate({**cfg, "name": "ref", "url": primary.url})))
    flaky = BackendState(
        LlamaCppAdapter(LlamaCppBackend.model_validate({**cfg, "name": "flaky", "url": fallback.url, "priority": 1}))
    )
    spare = BackendState(
        LlamaCppAdapter(LlamaCppBackend.model_validate({**cfg, "name": "spare", "url": fallback.url, "priority": 2}))
    )
    flaky.healthy, flaky.last_check_error_kind = False, "timeout"  # down when the check starts
    described = spare.backend.describe

    async def describe_while_flaky_recovers() -> BackendInfo:
        flaky.healthy, flaky.last_check_error_kind = True, None  # what the health monitor writes meanwhile
        return await described()

    spare.backend.describe = describe_while_flaky_recovers  # type: ignore[method-assign]
    report = await Checker("m", BUILTIN_PROFILES["all-minilm-l6-v2"], [ref, flaky, spare]).run()
    spare_result = report.result("spare")
    assert spare_result is not None and spare_result.verdict is Verdict.AGREE, report.summary()
    for st in (ref, flaky, spare):
        await st.backend.aclose()
