"""/metrics with several uvicorn workers: every scrape, whichever worker answers it, reports the
requests of all workers; the per-process collectors (prefix cache, model registry) are merged from
the workers' snapshots; the multiprocess directory is prepared fresh and removed at exit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import MULTIPROC_ENV, SNAPSHOT_PREFIX, WorkerSnapshots, prepare_multiprocess_directory
from bench.servers import multiprocess_directory_of, running

REQUESTS = 40
SCORE_OK = {"method": "POST", "endpoint": "/score", "status": "200"}


def scraped_requests(base_url: str, labels: dict[str, str]) -> float:
    """``lstm_serve_http_requests_total`` for ``labels``, scraped over a fresh connection."""
    with httpx.Client(base_url=base_url, timeout=10) as client:
        text = client.get("/metrics").text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "lstm_serve_http_requests_total" and s.labels == labels)


def requests_by_worker(directory: Path, endpoint: str) -> Counter[int]:
    """Answers with status 200 per worker pid, read from each worker's own counter file."""
    counts: Counter[int] = Counter()
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.removeprefix("counter_"))
        for metric in MultiProcessCollector.merge([str(path)]):
            for s in metric.samples:
                if s.name == "lstm_serve_http_requests_total" and s.labels["endpoint"] == endpoint \
                        and s.labels["status"] == "200":
                    counts[pid] += s.value
    return counts


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads worker pids and environments from /proc")
def test_every_scrape_counts_the_requests_of_every_worker(tiny_store, monkeypatch):
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)  # the service makes its own directory
    env = {"LSTM_SERVE_WORKERS": "2", "LSTM_SERVE_INTRA_OP_THREADS": "1", "LSTM_SERVE_RESCAN_SECONDS": "0"}
    with running("app", tiny_store, env, timeout=90) as server:
        directory = multiprocess_directory_of(server.pid)
        assert directory.name.startswith("lstm-serve-metrics-")

        def score(_: int) -> int:
            with httpx.Client(base_url=server.base_url, timeout=30) as client:  # a new connection each time
                return client.post("/score", json={"text": "the stock fell"}).status_code

        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(score, range(REQUESTS))) == {200}
        by_worker = requests_by_worker(directory, "/score")
        assert len(by_worker) == 2 and sum(by_worker.values()) == REQUESTS, by_worker

        deadline = time.monotonic() + 10  # a worker counts an answer just after sending it
        while scraped_requests(server.base_url, SCORE_OK) != REQUESTS and time.monotonic() < deadline:
            time.sleep(0.05)
        scrapes = 0
        while scrapes < 5 or len(requests_by_worker(directory, "/metrics")) < 2:
            assert scraped_requests(server.base_url, SCORE_OK) == REQUESTS
            scrapes += 1
            assert scrapes <= 60, "one worker answered every scrape"
    assert not directory.exists()


def test_collectors_of_running_workers_are_merged_and_those_of_exited_workers_dropped(tmp_path):
    class Fixed:
        def __init__(self, *families):
            self.families = families

        def collect(self):
            return self.families

    def cache(hits: float, entries: float) -> Fixed:
        return Fixed(CounterMetricFamily("cache_hits", "Hits.", value=hits),
                     GaugeMetricFamily("cache_entries", "Entries.", value=entries))

    def states(**versions: float) -> Fixed:
        gauge = GaugeMetricFamily("version_state", "State.", labels=["version"])
        for version, value in versions.items():
            gauge.add_metric([version], value)
        return Fixed(gauge)

    def snapshot_of(pid: int, *collectors: tuple[Fixed, str]) -> None:
        snapshots = WorkerSnapshots(tmp_path)
        snapshots.path = tmp_path / f"{SNAPSHOT_PREFIX}{pid}.json"
        for collector, gauges in collectors:
            snapshots.add(collector, gauges)
        snapshots.publish()

    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        snapshot_of(sibling.pid, (cache(3, 10), "sum"), (states(v1=1, v2=0), "max"))
        snapshot_of(exited.pid, (cache(100, 100), "sum"), (states(v3=1), "max"))
        this_worker = WorkerSnapshots(tmp_path)
        this_worker.add(cache(4, 5), "sum")
        this_worker.add(states(v1=0, v2=1), "max")
        merged = {(s.name, tuple(s.labels.items())): s.value
                  for family in this_worker.collect() for s in family.samples}
    finally:
        sibling.kill()
        sibling.wait()
    assert merged == {
        ("cache_hits_total", ()): 7,  # counters summed
        ("cache_entries", ()): 15,  # "sum" gauges summed
        ("version_state", (("version", "v1"),)): 1,  # "max" gauges: the largest
        ("version_state", (("version", "v2"),)): 1,
    }
    assert not (tmp_path / f"{SNAPSHOT_PREFIX}{exited.pid}.json").exists()
    this_worker.stop()
    assert not this_worker.path.exists()


def test_one_worker_without_a_directory_keeps_per_app_registries(monkeypatch):
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    assert prepare_multiprocess_directory(1) is None
    assert MULTIPROC_ENV not in os.environ


def test_several_workers_get_a_fresh_directory(monkeypatch):
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    try:
        directory = prepare_multiprocess_directory(2)
        assert directory is not None and directory.is_dir() and not any(directory.iterdir())
        assert os.environ[MULTIPROC_ENV] == str(directory)
    finally:  # set by the function, not by monkeypatch: later apps in this process must not see it
        os.environ.pop(MULTIPROC_ENV, None)


def test_a_configured_directory_is_emptied_of_earlier_metric_files_only(monkeypatch, tmp_path):
    directory = tmp_path / "metrics"
    directory.mkdir()
    for name in ("counter_123.db", "gauge_livesum_123.db", f"{SNAPSHOT_PREFIX}123.json", "notes.txt"):
        (directory / name).write_text("from an earlier run")
    monkeypatch.setenv(MULTIPROC_ENV, str(directory))
    assert prepare_multiprocess_directory(2) == directory
    assert [p.name for p in directory.iterdir()] == ["notes.txt"]
