"""Everything a running gateway holds: supervisors, adapters, backend state, router, service, health.

Built in the app's lifespan (inside the event loop), torn down in reverse order on shutdown.
Start-up never waits on a backend: managed servers and health polls run in background tasks.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from backends import Backend, create_backend
from backends.managed.supervisor import Supervisor
from config.backends import LlamaCppBackend
from config.settings import GatewaySettings
from gateway.api.budget import WorkBudget
from gateway.auth.guard import Guard
from gateway.auth.quotas import Quotas
from gateway.cache.store import EmbeddingCache
from gateway.calls import BackendCalls
from gateway.consistency.audit import Auditor
from gateway.consistency.records import SpaceRecords
from gateway.consistency.service import ConsistencyService
from gateway.health import HealthMonitor
from gateway.metrics import Metrics
from gateway.resilience.breaker import BreakerPolicy, CircuitBreaker
from gateway.resilience.retry import RetryPolicy
from gateway.router import Router, RoutingPolicy
from gateway.service import EmbeddingService
from gateway.shadow import Shadows
from gateway.state import BackendState
from gateway.tokens import LengthPolicy, tokenizer_of

if TYPE_CHECKING:
    from gateway.control.client import PlaneClient
    from gateway.service import EmbedResult

log = logging.getLogger(__name__)


class Runtime:
    def __init__(
        self,
        settings: GatewaySettings,
        metrics: Metrics | None = None,
        *,
        background: bool = True,
        plane: PlaneClient | None = None,
        worker_id: int = 0,
    ) -> None:
        self.background = background  # False for one-shot commands (`check`): no polling loops
        # A worker of `serve --workers N`: the control plane (another process) runs health checks,
        # agreement checks and managed servers; this runtime only serves, from its snapshots.
        self.plane = plane
        self.worker_id = worker_id
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.profiles = {m.name: m.resolved for m in settings.models}
        # Another name for a model -> (the model, the prompt its requests get unless they name one).
        self.aliases = {a.name: (m.name, a.prompt) for m in settings.models for a in m.aliases}
        self.coalesce_ms = {m.name: m.coalesce_ms for m in settings.models}
        self.default_model = settings.server.default_model or settings.models[0].name
        self.budget = WorkBudget(settings.server.max_inflight_bytes, settings.server.max_inflight_texts)
        self.guard = Guard(settings.auth, self.metrics)
        self.quotas = Quotas(settings.auth, self.metrics, workers=lambda: self.workers)
        self.cache = EmbeddingCache(settings.cache, self.metrics)
        self.supervisors: dict[str, Supervisor] = {}
        self.started_at = int(time.time())
        self.active = 0  # embedding requests in flight on this runtime (a reload drains them)
        self.states: list[BackendState] = []
        self._service: EmbeddingService | None = None
        self.health: HealthMonitor | None = None
        self.consistency: ConsistencyService | None = None
        self.shadows: Shadows | None = None
        self.auditor: Auditor | None = None

    @property
    def workers(self) -> int:
        """Processes serving this port (`serve --workers N`), as the control plane says."""
        snapshot = self.plane.snapshot if self.plane is not None else None
        return snapshot.workers or 1 if snapshot else 1

    @property
    def service(self) -> EmbeddingService:
        if self._service is None:
            raise RuntimeError("gateway runtime is not started")
        return self._service

    def start(self, adopt: dict[str, Supervisor] | None = None) -> None:
        """Build and start everything; `adopt`: running managed servers to take over when unchanged (reload)."""
        backends: list[Backend] = []
        for cfg in self.settings.backends:
            url = None
            if isinstance(cfg, LlamaCppBackend) and cfg.managed is not None and self.plane is not None:
                url = self.plane.managed_url(cfg.name)  # the control plane runs it
            elif isinstance(cfg, LlamaCppBackend) and cfg.managed is not None:
                key = cfg.api_key.get_secret_value() if cfg.api_key else None
                sup = (adopt or {}).get(cfg.name)
                if sup is None or sup.cfg != cfg.managed or sup.process.api_key != key:
                    sup = Supervisor(cfg.name, cfg.managed, api_key=key)
                    sup.start()
                self.supervisors[cfg.name] = sup
                url = sup.url
            backends.append(create_backend(cfg, url=url))
        r = self.settings.resilience
        breaker_policy = BreakerPolicy(
            consecutive_failures=r.breaker_consecutive_failures,
            failure_ratio=r.breaker_failure_ratio,
            window_s=r.breaker_window_s,
            min_calls=r.breaker_min_calls,
            cooldown_s=r.breaker_cooldown_s,
            cooldown_max_s=r.breaker_cooldown_max_s,
        )
        trips = self.metrics.circuit_trips
        self.states = [
            BackendState(b, breaker=CircuitBreaker(breaker_policy, on_trip=trips.labels(b.name).inc)) for b in backends
        ]
        dims = {name: p.dimension for name, p in self.profiles.items()}
        policy = RoutingPolicy(
            retry=RetryPolicy(r.max_attempts, r.backoff_base_s, r.backoff_max_s),
            batch_size=r.batch_size,
            subbatch_concurrency=r.subbatch_concurrency,
            hedge_after_s=r.hedge_after_s,
            request_timeout_s=r.request_timeout_s,
            retry_after_cap_s=r.health_interval_s,
        )
        calls = BackendCalls(dims, self.metrics)
        consistency_class = ConsistencyService
        if self.plane is not None:
            from gateway.control.client import FollowerConsistency

            consistency_class = FollowerConsistency
        self.consistency = consistency_class(
            self.settings.consistency,
            self.profiles,
            self.states,
            {m.name: m.reference for m in self.settings.models},
            gguf_for=self._gguf_for,
            calls=calls,
            spaces={m.name: m._space for m in self.settings.models if m._space is not None},
            metrics=self.metrics,
            on_verdicts=lambda: self.cache.sync(self.states),
            tokenizers={m.name: tokenizer_of(m) for m in self.settings.models},
            on_partial={m.name: m.on_partial_disagreement for m in self.settings.models},
            records=SpaceRecords(
                Path(
                    self.settings.consistency.spaces_dir
                    or os.environ.get("EMBEDDING_GATEWAY_SPACES_DIR")
                    or "~/.cache/embedding-gateway/spaces"
                ),
                self.settings.cache.url
                or (self.settings.auth.storage if self.settings.auth.storage.startswith("redis") else None),
            ),
        )
        router = Router(
            self.states,
            dims,
            self.metrics,
            policy,
            members=self.consistency.members,
            gate=self.consistency.wait_bootstrap,
            calls=calls,
            rescue=self.consistency.rescue,
            explain=self.consistency.unavailable_reason,
            coalesce_s={m: ms / 1000 for m, ms in self.coalesce_ms.items()},
        )
        self.shadows = Shadows(self.states, calls, self.metrics)
        consistency = self.consistency
        self.auditor = (
            Auditor(
                self.profiles,
                {m.name: m.audit_sample for m in self.settings.models},
                router.members,
                calls,
                self.metrics,
                consistency.audit_failed,
                consistency.observe_traffic,
            )
            if self.settings.consistency.enabled
            else None
        )
        self._service = EmbeddingService(
            self.profiles,
            router,
            space_of=self.consistency.space_id,
            shadows=self.shadows,
            auditor=self.auditor,
            observe=consistency.observe_traffic,
            cache=self.cache,
            lengths={m.name: LengthPolicy(tokenizer_of(m), m.truncate) for m in self.settings.models},
        )
        self.health = HealthMonitor(
            self.states,
            r,
            calls,
            self.metrics,
            supervisor_error=lambda name: s.error if (s := self.supervisors.get(name)) else None,
            on_change=self.consistency.backend_recovered,
        )
        if self.plane is not None:
            self.plane.attach(self)  # the snapshot decides health and agreement from now on
        elif self.background:
            self.health.start()
            self.consistency.start()
        log.info("gateway serving models %s over backends %s", sorted(self.profiles), [b.name for b in backends])

    def readiness(self) -> tuple[dict[str, list[str]], list[str]]:
        """Per model, its healthy compatible backends whose circuit admits calls; and the models whose
        first agreement check is still running. Ready = every model has one and none is checking."""
        assert self.consistency is not None
        router = self.service.router
        healthy = {
            model: [st.backend.name for st in router.members(model) if st.healthy and st.breaker.available()]
            for model in self.profiles
        }
        checking = sorted(m for m in self.profiles if not self.consistency.bootstrapped(m))
        return healthy, checking

    def ready(self) -> bool:
        healthy, checking = self.readiness()
        assert self.consistency is not None
        return not checking and all(healthy.values()) and not any(self.consistency.pending(m) for m in self.profiles)

    def _gguf_for(self, model: str) -> Path | None:
        """The model's GGUF, when the gateway has one: configured, or a managed backend's."""
        cfg = next(m for m in self.settings.models if m.name == model)
        if cfg.reference_gguf is not None:
            return cfg.reference_gguf.expanduser()
        for b in self.settings.backends:
            sup = self.supervisors.get(b.name)
            if b.model == model and sup is not None and sup.process.gguf.is_file():
                return sup.process.gguf
        return None

    async def stop(self, keep: set[str] | None = None, keep_cache: bool = False) -> None:
        """Stop everything; `keep`: managed servers handed over to a new runtime (reload), and the cache
        when it was handed over too."""
        if self.shadows is not None:
            await self.shadows.stop()
        if self.auditor is not None:
            await self.auditor.stop()
        if self.consistency is not None:
            await self.consistency.stop()
        if self.health is not None:
            await self.health.stop()
        for st in self.states:
            await st.backend.aclose()
        for name, sup in self.supervisors.items():
            if name not in (keep or set()):
                await sup.stop()
        if not keep_cache:
            await self.cache.close()

    def refresh_gauges(self) -> None:
        """Gauges derived from live state (open -> half-open happens by the clock): read them now."""
        m = self.metrics
        for st in self.states:
            name = st.backend.name
            m.circuit_open.labels(name).set(0 if str(st.breaker.state) == "closed" else 1)
            m.backend_in_flight.labels(name).set(st.in_flight)
            m.backend_queued.labels(name).set(st.admission.queued)
            m.backend_concurrency.labels(name).set(st.admission.limit)

    def result_headers(self, result: EmbedResult) -> dict[str, str]:
        headers = {"x-embedding-backend": ",".join(result.backends) or "cache"}
        if result.cache is not None:
            headers["x-embedding-cache"] = result.cache
        if result.space_id is not None:
            headers["x-embedding-space"] = result.space_id
        if result.truncated:
            headers["x-embedding-truncated"] = str(result.truncated)
        return headers
