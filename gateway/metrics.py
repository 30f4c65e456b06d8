"""Prometheus metrics (prometheus-client), one registry per app so tests and apps don't collide.

With `serve --workers N` every process writes its values to files in `PROMETHEUS_MULTIPROC_DIR`
(set by the parent before prometheus-client is imported) and `/metrics` in any worker reads them all:
counters and histograms add up across workers and the control plane; each gauge says how (`livesum`:
the workers' sum; `mostrecent`: the control plane's latest value; `livemax`: any worker's).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "embedding_gateway_requests_total",
            "Client requests by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "embedding_gateway_request_duration_seconds",
            "Client request latency.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inputs = Counter(
            "embedding_gateway_inputs_total", "Texts embedded, by model.", ["model"], registry=self.registry
        )
        self.backend_calls = Counter(
            "embedding_gateway_backend_calls_total",
            "Backend calls by outcome (ok or error class).",
            ["backend", "outcome"],
            registry=self.registry,
        )
        self.backend_seconds = Histogram(
            "embedding_gateway_backend_call_duration_seconds",
            "Backend call latency.",
            ["backend"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "embedding_gateway_fallbacks_total",
            "Requests served by a backend other than the first tried.",
            ["model"],
            registry=self.registry,
        )
        self.retries = Counter(
            "embedding_gateway_retries_total",
            "Backend attempts after the first, per sub-batch.",
            ["model"],
            registry=self.registry,
        )
        self.hedges = Counter(
            "embedding_gateway_hedges_total", "Hedged (duplicate) backend calls.", ["model"], registry=self.registry
        )
        self.circuit_trips = Counter(
            "embedding_gateway_circuit_trips_total", "Circuit breaker openings.", ["backend"], registry=self.registry
        )
        self.circuit_open = Gauge(
            "embedding_gateway_circuit_open",
            "1 while the backend's circuit is open or half-open.",
            ["backend"],
            multiprocess_mode="livemax",
            registry=self.registry,
        )
        self.backend_healthy = Gauge(
            "embedding_gateway_backend_healthy",
            "1 when the backend's last health check passed.",
            ["backend", "model"],
            multiprocess_mode="mostrecent",
            registry=self.registry,
        )

        self.overflows = Counter(
            "embedding_gateway_overflow_total",
            "Calls sent to a lower-priority backend because the preferred one's queue would take longer.",
            ["model", "backend"],
            registry=self.registry,
        )
        self.panic_routing = Counter(
            "embedding_gateway_panic_routing_total",
            "Calls routed to a backend out only for being slow, because no backend of the model admitted calls.",
            ["model"],
            registry=self.registry,
        )
        self.shed = Counter(
            "embedding_gateway_shed_total",
            "Requests refused at once (503 overloaded) because the backends' queues would answer past their deadline.",
            ["model"],
            registry=self.registry,
        )
        self.coalesced_requests = Counter(
            "embedding_gateway_coalesced_requests_total",
            "Client requests whose texts went to a backend in one call with other requests' (coalescing).",
            ["backend"],
            registry=self.registry,
        )
        self.batch_texts = Histogram(
            "embedding_gateway_batch_texts",
            "Texts per coalesced backend call (several requests merged).",
            buckets=(2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.audits = Counter(
            "embedding_gateway_audits_total",
            "Live-traffic audits of served vectors by outcome: pass, fail (the backend was quarantined), undecided "
            "(two disagree and nothing says which is right), skipped (no other backend in service), dropped (too "
            "many in flight).",
            ["model", "backend", "outcome"],
            registry=self.registry,
        )
        self.script_refusals = Counter(
            "embedding_gateway_script_refusals_total",
            "Requests refused (503) because every backend in service disagrees with the model on a script in them.",
            ["model"],
            registry=self.registry,
        )
        self.excluded_scripts = Gauge(
            "embedding_gateway_backend_excluded_script",
            "1 while a restricted backend is kept from texts in this script (it disagrees with the model on it).",
            ["backend", "model", "script"],
            registry=self.registry,
        )
        self.admission_wait_seconds = Histogram(
            "embedding_gateway_admission_wait_seconds",
            "Time calls queued in the gateway for a free slot at the backend.",
            ["backend"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.admission_timeouts = Counter(
            "embedding_gateway_admission_timeouts_total",
            "Calls whose request deadline passed while they queued for the backend.",
            ["backend"],
            registry=self.registry,
        )
        self.backend_in_flight = Gauge(
            "embedding_gateway_backend_in_flight",
            "Calls in flight at the backend (at most its concurrency limit).",
            ["backend"],
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.backend_queued = Gauge(
            "embedding_gateway_backend_queued",
            "Calls queued in the gateway for the backend.",
            ["backend"],
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.backend_concurrency = Gauge(
            "embedding_gateway_backend_concurrency_limit",
            "Calls the gateway sends the backend at once (configured or learned).",
            ["backend"],
            multiprocess_mode="livesum",
            registry=self.registry,
        )

        self.space_info = Gauge(
            "embedding_gateway_space_info",
            "1 for the embedding space each model serves (pinned, or computed from its live reference).",
            ["model", "space_id"],
            multiprocess_mode="mostrecent",
            registry=self.registry,
        )
        self.agreement_min_cosine = Gauge(
            "embedding_gateway_agreement_min_cosine",
            "Lowest probe cosine of the backend against its model's space at the last check.",
            ["model", "backend"],
            multiprocess_mode="mostrecent",
            registry=self.registry,
        )
        self.space_drift = Gauge(
            "embedding_gateway_space_drift",
            "1 while every backend of the model produces vectors outside its pinned space.",
            ["model"],
            multiprocess_mode="mostrecent",
            registry=self.registry,
        )
        self.admission_gate_seconds = Histogram(
            "embedding_gateway_admission_gate_seconds",
            "From a backend becoming healthy to its admission by the quick gate against a pinned space.",
            ["backend"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.shadow_cosine = Histogram(
            "embedding_gateway_shadow_cosine",
            "Cosine between a shadow backend's vector and the one served, per sampled text.",
            ["model", "backend"],
            buckets=(0.5, 0.9, 0.97, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0),
            registry=self.registry,
        )
        self.shadow_dropped = Counter(
            "embedding_gateway_shadow_dropped_total",
            "Sampled requests not sent to a shadow because its comparisons were already at their bound.",
            ["model", "backend"],
            registry=self.registry,
        )
        self.key_requests = Counter(
            "embedding_gateway_key_requests_total",
            "Requests by caller key name and status (auth on).",
            ["key", "status"],
            registry=self.registry,
        )
        self.key_texts = Counter(
            "embedding_gateway_key_texts_total",
            "Texts embedded by caller key name and model.",
            ["key", "model"],
            registry=self.registry,
        )
        self.key_tokens = Counter(
            "embedding_gateway_key_tokens_total",
            "Prompt tokens by caller key name and model (the backend's count, else the estimate).",
            ["key", "model"],
            registry=self.registry,
        )
        self.key_rejections = Counter(
            "embedding_gateway_key_rejections_total",
            "Requests refused by caller key name and reason (invalid_key has key '-').",
            ["key", "reason"],
            registry=self.registry,
        )
        self.ratelimit_storage_errors = Counter(
            "embedding_gateway_ratelimit_storage_errors_total",
            "Calls to the shared quota storage that failed (the fallback applied).",
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "embedding_gateway_cache_hits_total", "Texts served from the cache.", ["model"], registry=self.registry
        )
        self.cache_misses = Counter(
            "embedding_gateway_cache_misses_total", "Texts the cache did not hold.", ["model"], registry=self.registry
        )
        self.cache_evictions = Counter(
            "embedding_gateway_cache_evictions_total", "Entries the in-process LRU evicted.", registry=self.registry
        )
        self.cache_bytes = Gauge(
            "embedding_gateway_cache_bytes",
            "Bytes the in-process LRU holds.",
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.cache_storage_errors = Counter(
            "embedding_gateway_cache_storage_errors_total",
            "Calls to the cache's shared tier (Redis) that failed (the local tier served alone).",
            registry=self.registry,
        )
        self._spaces: dict[str, str] = {}
        # Labelled children looked up once: `labels()` validates and locks on every call (hot path).
        self._children: dict[tuple[str, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request_done(self, route: str, status: int, seconds: float) -> None:
        self._child(self.requests, route, str(status)).inc()
        self._child(self.request_seconds, route).observe(seconds)

    def key_request(self, key: str, status: int) -> None:
        self._child(self.key_requests, key, str(status)).inc()

    def key_served(self, key: str, model: str, texts: int, tokens: int) -> None:
        self._child(self.key_texts, key, model).inc(texts)
        self._child(self.key_tokens, key, model).inc(tokens)

    def key_rejection(self, key: str, reason: str) -> None:
        self._child(self.key_rejections, key, reason).inc()

    def inputs_served(self, model: str, n: int) -> None:
        self._child(self.inputs, model).inc(n)

    def admission_waited(self, backend: str, seconds: float) -> None:
        self._child(self.admission_wait_seconds, backend).observe(seconds)

    def set_space(self, model: str, space_id: str) -> None:
        previous = self._spaces.get(model)
        if previous == space_id:
            return
        if previous is not None:
            self.space_info.labels(model, previous).set(0)  # what multiprocess files keep after remove()
            self.space_info.remove(model, previous)
        self.space_info.labels(model, space_id).set(1)
        self._spaces[model] = space_id

    def backend_call(self, backend: str, outcome: str, seconds: float) -> None:
        self._child(self.backend_calls, backend, outcome).inc()
        self._child(self.backend_seconds, backend).observe(seconds)

    def fallback(self, model: str) -> None:
        self.fallbacks.labels(model).inc()

    def _source(self) -> CollectorRegistry:
        """This process's registry; under `serve --workers N`, every process's values added up."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry

    def collect(self) -> Any:
        return self._source().collect()

    def render(self) -> bytes:
        return generate_latest(self._source())
