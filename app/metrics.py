"""Prometheus metrics.

One uvicorn worker (the default): each app owns its registry, so two apps in one process (tests) do
not share counters.

Several workers: prometheus_client's multiprocess mode, so a scrape shows every worker's numbers
together whichever worker answers it. The main process prepares a fresh directory and names it in
``PROMETHEUS_MULTIPROC_DIR`` before the workers start (``prepare_multiprocess_directory``): the variable
must be set before a worker imports prometheus_client, which picks how it stores values at import. Each
worker's counters and histograms are then memory-mapped files in that directory; a scrape sums the
files of every worker, exited ones included, so counters never go back when a worker is replaced.

The prefix cache's and the model registry's figures are read from the process's own objects at scrape
time (``PrefixCacheCollector``, ``RegistryCollector``), so no file holds them. With several workers
each worker writes what its collectors report to ``collectors_<pid>.json`` in the directory
(``WorkerSnapshots``: every ``SNAPSHOT_SECONDS``, and when it answers a scrape), and a scrape merges the
snapshots of the workers still running under the names and labels one worker would use: counters are
summed, the cache's gauges are summed (each worker has its own cache), the registry's gauges take the
largest value (``lstm_serve_model_version_state`` is 1 where any worker has that version in that state).
prometheus_client's own multiprocess gauges would not do here: a series cannot be removed from a
memory-mapped file, so a retired version would stay in the exposition."""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from app.cache import PrefixStateCache
    from app.registry import ModelRegistry
    from app.runtime import InferenceObserver

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Finer around the admission bound (500 ms by default), whose keeping these measure.
ADMITTED_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.525, 0.55, 0.6, 0.7, 0.8,
                    1.0, 1.5, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SNAPSHOT_SECONDS = 1.0
SNAPSHOT_PREFIX = "collectors_"
GaugeMerge = Literal["sum", "max"]


def prepare_multiprocess_directory(workers: int) -> Path | None:
    """Run in the main process before uvicorn starts its workers (they inherit the environment).
    With ``PROMETHEUS_MULTIPROC_DIR`` set: create the directory if needed and empty it of earlier runs'
    metric files. Else, with several workers: create a fresh temporary directory and set the variable to
    it. Either is cleaned when the process exits (the temporary one removed). With one worker and the
    variable unset, nothing: the app keeps its own registry. Returns the directory, or None."""
    configured = os.environ.get(MULTIPROC_ENV)
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        _remove_metric_files(directory)
        atexit.register(_remove_metric_files, directory)
    elif workers > 1:
        directory = Path(tempfile.mkdtemp(prefix="lstm-serve-metrics-"))
        os.environ[MULTIPROC_ENV] = str(directory)
        atexit.register(shutil.rmtree, directory, True)
    else:
        return None
    return directory


def _remove_metric_files(directory: Path) -> None:
    """Only the files prometheus_client and ``WorkerSnapshots`` write: the directory may be shared."""
    for pattern in ("*.db", f"{SNAPSHOT_PREFIX}*"):
        for path in directory.glob(pattern):
            path.unlink(missing_ok=True)


def multiprocess_directory() -> Path | None:
    """The directory of multiprocess mode, or None. Raises if ``PROMETHEUS_MULTIPROC_DIR`` was set only
    after prometheus_client was imported: this process would then count in memory, unseen by a scrape
    that another worker answers."""
    configured = os.environ.get(MULTIPROC_ENV)
    if not configured:
        return None
    if not getattr(values.ValueClass, "_multiprocess", False):
        raise RuntimeError(f"{MULTIPROC_ENV} must be set before prometheus_client is imported")
    return Path(configured)


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
        # Imported here, not at the top: the main process imports this module to prepare the metrics
        # directory, and the registry module would load onnxruntime into a process that serves nothing.
        from app.registry import ModelState

        self.registry = registry
        self.states = tuple(ModelState)

    def collect(self) -> Iterator[Metric]:
        versions = self.registry.versions()
        counts = GaugeMetricFamily("lstm_serve_model_versions", "Model versions found in the store, by state.",
                                   labels=["state"])
        for state in self.states:
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


class WorkerSnapshots(Collector):
    """Several workers: this worker's collectors, written to ``collectors_<pid>.json`` in ``directory``,
    and at a scrape every running worker's snapshots merged (see the module docstring)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.path = directory / f"{SNAPSHOT_PREFIX}{os.getpid()}.json"
        self.collectors: list[tuple[Collector, GaugeMerge]] = []
        self._written = b""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, collector: Collector, gauges: GaugeMerge) -> None:
        """``gauges``: how the collector's gauges combine across workers (counters are always summed)."""
        self.collectors.append((collector, gauges))

    def publish(self) -> None:
        families = [
            {"name": metric.name, "help": metric.documentation, "type": metric.type,
             "merge": "sum" if metric.type == "counter" else gauges,
             "samples": [[s.name, s.labels, s.value] for s in metric.samples]}
            for collector, gauges in self.collectors for metric in collector.collect()
        ]
        data = json.dumps(families).encode()
        with self._lock:
            if data == self._written:
                return
            partial = self.path.with_name(self.path.name + ".tmp")
            partial.write_bytes(data)
            os.replace(partial, self.path)  # a reader gets the old snapshot or the new one, never half of one
            self._written = data

    def collect(self) -> Iterator[Metric]:
        self.publish()
        families: dict[str, Metric] = {}
        merged: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for path in sorted(self.directory.glob(f"{SNAPSHOT_PREFIX}*.json")):
            for family in self._read(path):
                name = family["name"]
                if name not in families:
                    families[name] = Metric(name, family["help"], family["type"])
                    merged[name] = {}
                samples = merged[name]
                for sample, labels, value in family["samples"]:
                    key = (sample, tuple(sorted(labels.items())))
                    if key not in samples:
                        samples[key] = value
                    elif family["merge"] == "max":
                        samples[key] = max(samples[key], value)
                    else:
                        samples[key] += value
        for name, metric in families.items():
            for (sample, labels), value in merged[name].items():
                metric.add_sample(sample, dict(labels), value)
            yield metric

    def _read(self, path: Path) -> list[dict[str, Any]]:
        """A running worker's snapshot; the snapshot of a worker that is gone is removed."""
        pid = int(path.stem.removeprefix(SNAPSHOT_PREFIX))
        if pid != os.getpid() and not _running(pid):
            path.unlink(missing_ok=True)
            return []
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:  # the worker stopped since the directory was listed
            return []

    def start(self) -> None:
        self.publish()
        self._thread = threading.Thread(target=self._publish_periodically, name="metrics-snapshots", daemon=True)
        self._thread.start()

    def _publish_periodically(self) -> None:
        while not self._stop.wait(SNAPSHOT_SECONDS):
            try:
                self.publish()
            except Exception:
                log.exception("could not write the metrics snapshot %s", self.path)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.path.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class ServiceMetrics:
    """The service's metrics. In multiprocess mode (``multiprocess_directory()``; several workers) the
    counters and histograms live in the directory's files and the collectors are shared through
    ``WorkerSnapshots``; ``start``/``stop`` (the app's lifespan) run the snapshots."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        directory = multiprocess_directory()
        # In multiprocess mode the metric objects are not in the registry: a scrape reads every
        # worker's files instead of this worker's values.
        own = self.registry if directory is None else None
        self.snapshots = None if directory is None else WorkerSnapshots(directory)
        if directory is not None:
            MultiProcessCollector(self.registry, path=str(directory))
            self.registry.register(self.snapshots)
        self.requests = Counter(
            "lstm_serve_http_requests", "HTTP requests answered, by route template and status code.",
            ["method", "endpoint", "status"], registry=own,
        )
        self.latency = Histogram(
            "lstm_serve_http_request_duration_seconds", "Time to answer an HTTP request, by route template.",
            ["method", "endpoint"], buckets=LATENCY_BUCKETS, registry=own,
        )
        self.errors = Counter(
            "lstm_serve_http_errors", "HTTP responses with status >= 400, by route template and status code.",
            ["endpoint", "status"], registry=own,
        )
        self.inference = Histogram(
            "lstm_serve_inference_duration_seconds", "Wall time of one onnxruntime call, by model and graph.",
            ["model", "version", "graph"], buckets=LATENCY_BUCKETS, registry=own,
        )
        self.admitted = Histogram(
            "lstm_serve_admitted_request_seconds",
            "Time an admitted inference request spent in the scheduler: waiting for onnxruntime, then its own "
            "calls (what the admission bound, LSTM_SERVE_MAX_QUEUE_WAIT_MS, keeps short), by endpoint.",
            ["endpoint"], buckets=ADMITTED_BUCKETS, registry=own,
        )
        self.batch_rows = Histogram(
            "lstm_serve_inference_batch_rows",
            "Rows (texts or prefix steps, from one or more requests) per onnxruntime call, by model and graph.",
            ["model", "version", "graph"], buckets=BATCH_BUCKETS, registry=own,
        )

    def start(self) -> None:
        if self.snapshots is not None:
            self.snapshots.start()

    def stop(self) -> None:
        if self.snapshots is not None:
            self.snapshots.stop()

    def observe_request(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(method, endpoint, str(status)).inc()
        self.latency.labels(method, endpoint).observe(seconds)
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()

    def observe_admitted(self, endpoint: str, seconds: float) -> None:
        self.admitted.labels(endpoint).observe(seconds)

    def watch_cache(self, cache: PrefixStateCache) -> None:
        self._watch(PrefixCacheCollector(cache), gauges="sum")

    def watch_models(self, models: ModelRegistry) -> None:
        self._watch(RegistryCollector(models), gauges="max")

    def _watch(self, collector: Collector, gauges: GaugeMerge) -> None:
        if self.snapshots is None:
            self.registry.register(collector)
        else:
            self.snapshots.add(collector, gauges)

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
