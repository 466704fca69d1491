"""Prometheus metrics. Each app owns its registry, so two apps in one process (tests) do not
share counters. With several uvicorn workers each worker reports its own numbers."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.cache import PrefixStateCache
from app.registry import ModelRegistry, ModelState
from app.runtime import InferenceObserver

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class PrefixCacheCollector(Collector):
    """Reads the prefix-state cache's counters at scrape time."""

    def __init__(self, cache: PrefixStateCache):
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        stats = self.cache.stats()
        for name, value, text in (
            ("hits", stats.hits, "Next-word lookups that found a cached prefix (the whole prefix or a shorter one)."),
            ("misses", stats.misses, "Next-word lookups that found no cached prefix."),
            ("evictions", stats.evictions, "Entries dropped to stay within the byte bound."),
        ):
            yield CounterMetricFamily(f"lstm_serve_prefix_cache_{name}", text, value=value)
        yield GaugeMetricFamily("lstm_serve_prefix_cache_bytes", "Bytes the cached prefix states take.",
                                value=stats.bytes)
        yield GaugeMetricFamily("lstm_serve_prefix_cache_entries", "Prefixes cached.", value=stats.entries)
        yield GaugeMetricFamily("lstm_serve_prefix_cache_max_bytes", "The cache's byte bound (0: disabled).",
                                value=self.cache.max_bytes)


class RegistryCollector(Collector):
    """Reads the model versions' states, defaults, load failures and reconciles at scrape time."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        versions = self.registry.versions()
        counts = GaugeMetricFamily("lstm_serve_model_versions", "Model versions found in the store, by state.",
                                   labels=["state"])
        for state in ModelState:
            counts.add_metric([state.value], sum(v.state is state for v in versions))
        yield counts
        states = GaugeMetricFamily("lstm_serve_model_version_state",
                                   "1 for each model version in the store, labelled with its state.",
                                   labels=["model", "version", "state"])
        changed = GaugeMetricFamily("lstm_serve_model_files_changed",
                                    "1 for a serving version whose files on disk no longer verify (it keeps serving "
                                    "what it loaded).", labels=["model", "version"])
        for v in versions:
            states.add_metric([v.name, str(v.version), v.state.value], 1)
            changed.add_metric([v.name, str(v.version)], 1 if v.files_changed else 0)
        yield states
        yield changed
        defaults = GaugeMetricFamily("lstm_serve_model_default_version",
                                     "The version a request naming no version gets.", labels=["model"])
        for name in sorted({v.name for v in versions}):
            default = self.registry.default_version(name)
            if default is not None:
                defaults.add_metric([name], default)
        yield defaults
        failures = CounterMetricFamily("lstm_serve_model_load_failures",
                                       "Versions refused at load or re-verification, by model.", labels=["model"])
        for name, count in sorted(self.registry.load_failures.items()):
            failures.add_metric([name], count)
        yield failures
        reconciles = CounterMetricFamily("lstm_serve_model_reconciles", "Reconciles with the model store, by trigger.",
                                         labels=["trigger"])
        for trigger, count in sorted(self.registry.reconciles.items()):
            reconciles.add_metric([trigger], count)
        yield reconciles
        yield GaugeMetricFamily("lstm_serve_model_versions_draining",
                                "Retired versions still answering requests in flight.",
                                value=len(self.registry.draining()))


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lstm_serve_http_requests", "HTTP requests answered, by route template and status code.",
            ["method", "endpoint", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "lstm_serve_http_request_duration_seconds", "Time to answer an HTTP request, by route template.",
            ["method", "endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.errors = Counter(
            "lstm_serve_http_errors", "HTTP responses with status >= 400, by route template and status code.",
            ["endpoint", "status"], registry=self.registry,
        )
        self.inference = Histogram(
            "lstm_serve_inference_duration_seconds", "Wall time of one onnxruntime call, by model and graph.",
            ["model", "version", "graph"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_rows = Histogram(
            "lstm_serve_inference_batch_rows",
            "Rows (texts or prefix steps, from one or more requests) per onnxruntime call, by model and graph.",
            ["model", "version", "graph"], buckets=BATCH_BUCKETS, registry=self.registry,
        )

    def observe_request(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(method, endpoint, str(status)).inc()
        self.latency.labels(method, endpoint).observe(seconds)
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()

    def watch_cache(self, cache: PrefixStateCache) -> None:
        self.registry.register(PrefixCacheCollector(cache))

    def watch_models(self, models: ModelRegistry) -> None:
        self.registry.register(RegistryCollector(models))

    def inference_observer(self, model: str, version: int) -> InferenceObserver:
        """A callback for one model version's runtime: records each onnxruntime call's duration
        and batch size."""

        def observe(graph: str, seconds: float, rows: int) -> None:
            self.inference.labels(model, str(version), graph).observe(seconds)
            self.batch_rows.labels(model, str(version), graph).observe(rows)

        return observe

    def exposition(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
