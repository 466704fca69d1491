"""The live model lifecycle: versions rolled out, refused, retired, pinned and unloaded without a
restart, under load, and nothing done to the files on disk changing or crashing what is served."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from conftest import post, tiny_settings, wait_until_ready
from starlette.testclient import TestClient

from app.main import create_app
from app.registry import ModelRegistry, ModelState
from bench.servers import running

TOKEN = "s3cret-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def add_version(store: Path, name: str, source: int, target: int, corrupt: bool = False) -> Path:
    """``store/name/target`` as a copy of ``source`` (same weights), written beside the store and
    moved into place in one rename, as an export does. ``corrupt`` flips a byte of its weights."""
    staging = store / name / f".{target}.tmp"
    shutil.copytree(store / name / str(source), staging)
    manifest = json.loads((staging / "manifest.json").read_text())
    manifest["version"] = target
    (staging / "manifest.json").write_text(json.dumps(manifest))
    if corrupt:
        weights = bytearray((staging / "weights.bin").read_bytes())
        weights[len(weights) // 2] ^= 0xFF
        (staging / "weights.bin").write_bytes(bytes(weights))
    staging.rename(store / name / str(target))
    return store / name / str(target)


@pytest.fixture
def store(tiny_store: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_store, tmp_path / "store"))


def wait_for(condition, timeout: float = 30.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("the condition did not hold in time")


class Traffic:
    """Clients sending /predict-next and /score in a loop until stopped; every status is counted."""

    BODIES = [("/predict-next", {"text": "the company said it"}), ("/score", {"texts": ["the stock fell", "said"]})]

    def __init__(self, base_url: str, clients: int = 4):
        self.base_url = base_url
        self.statuses: Counter[int | str] = Counter()
        self.versions: list[int] = []
        self.answers: dict[str, set[str]] = {path: set() for path, _ in self.BODIES}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=10) as client:
            while not self._stop.is_set():
                for path, body in self.BODIES:
                    try:
                        response = client.post(path, json=body)
                    except httpx.TransportError as e:
                        self.statuses[type(e).__name__] += 1
                        continue
                    self.statuses[response.status_code] += 1
                    if response.status_code == 200:
                        answer = response.json()
                        self.versions.append(answer["model"]["version"])
                        self.answers[path].add(json.dumps({k: v for k, v in answer.items() if k != "model"}))

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        wait_for(lambda: sum(self.statuses.values()) >= 20)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)


def versions_by_state(base_url: str, name: str) -> dict[int, str]:
    (model,) = [m for m in httpx.get(f"{base_url}/models").json()["models"] if m["name"] == name]
    return {v["version"]: v["state"] for v in model["versions"]}


def test_rollout_under_load_drops_no_request(store):
    """Add v2, then a corrupt v3, then remove v1, while clients send requests continuously."""
    env = {"LSTM_SERVE_RESCAN_SECONDS": "0.2", "LSTM_SERVE_INTRA_OP_THREADS": "1"}
    with running("app", store, env, timeout=60) as server, Traffic(server.base_url) as traffic:
        base = server.base_url
        add_version(store, "tiny-lm", 1, 2)
        wait_for(lambda: versions_by_state(base, "tiny-lm").get(2) == "serving")
        add_version(store, "tiny-lm", 1, 3, corrupt=True)
        wait_for(lambda: versions_by_state(base, "tiny-lm").get(3) == "failed")
        shutil.rmtree(store / "tiny-lm" / "1")
        wait_for(lambda: 1 not in versions_by_state(base, "tiny-lm"))
        served_after = len(traffic.versions)
        wait_for(lambda: len(traffic.versions) > served_after + 20)
        (model,) = [m for m in httpx.get(f"{base}/models").json()["models"] if m["name"] == "tiny-lm"]
        metrics = httpx.get(f"{base}/metrics").text
    assert set(traffic.statuses) == {200}, traffic.statuses
    assert model["default_version"] == 2
    assert {v["version"]: v["state"] for v in model["versions"]} == {2: "serving", 3: "failed"}
    assert "sha256" in next(v["reason"] for v in model["versions"] if v["version"] == 3)
    assert set(traffic.versions[served_after:]) == {2}  # the default switched and stayed
    assert 1 in traffic.versions and 2 in traffic.versions
    assert 'lstm_serve_model_load_failures_total{model="tiny-lm"} 1.0' in metrics
    assert 'lstm_serve_model_version_state{model="tiny-lm",state="failed",version="3"} 1.0' in metrics


def test_truncating_and_deleting_served_files_changes_no_answer(store):
    env = {"LSTM_SERVE_RESCAN_SECONDS": "0.2", "LSTM_SERVE_INTRA_OP_THREADS": "1"}
    version = store / "tiny-lm" / "1"
    with running("app", store, env, timeout=60) as server, Traffic(server.base_url) as traffic:
        before = {path: set(answers) for path, answers in traffic.answers.items()}
        with open(version / "weights.bin", "r+b") as weights:  # truncate in place (the mapping case)
            weights.truncate(0)
        (version / "vocab.txt").unlink()
        (version / "model.onnx").write_bytes(b"not a graph")
        wait_for(lambda: next(v for m in httpx.get(f"{server.base_url}/models").json()["models"]
                              if m["name"] == "tiny-lm" for v in m["versions"])["files_changed"])
        served = len(traffic.versions)
        wait_for(lambda: len(traffic.versions) > served + 20)
        alive = httpx.get(f"{server.base_url}/health/ready").status_code
    assert set(traffic.statuses) == {200}, traffic.statuses
    assert traffic.answers == before  # every answer, before and after, is one of the answers seen before
    assert alive == 200


def test_sighup_rescans_and_never_kills_the_process(store):
    env = {"LSTM_SERVE_RESCAN_SECONDS": "0", "LSTM_SERVE_INTRA_OP_THREADS": "1"}
    with running("app", store, env, timeout=60) as server:
        add_version(store, "tiny-lm", 1, 2)
        time.sleep(0.5)
        assert 2 not in versions_by_state(server.base_url, "tiny-lm")  # no periodic scan
        os.kill(server.pid, signal.SIGHUP)
        wait_for(lambda: versions_by_state(server.base_url, "tiny-lm").get(2) == "serving")
        os.kill(server.pid, signal.SIGHUP)
        time.sleep(0.3)
        assert httpx.get(f"{server.base_url}/health/ready").status_code == 200


def test_readiness_is_503_while_a_model_has_no_version_in_service(store):
    (store / "tiny-sentiment" / "1" / "vocab.txt").unlink()
    with TestClient(create_app(tiny_settings(store, rescan_seconds=0))) as client:
        def scanned():
            response = client.get("/health/ready")
            return response if response.json()["error"]["message"] != "models are still loading" else None

        ready = wait_for(scanned)
        assert ready.status_code == 503
        error = ready.json()["error"]
        assert error["code"] == "not_ready" and "tiny-sentiment" in error["message"]
        assert error["details"]["missing"] == ["tiny-sentiment"] and error["details"]["serving"] == ["tiny-lm@1"]
    relaxed = tiny_settings(store, rescan_seconds=0, ready_requires_every_model=False)
    with TestClient(create_app(relaxed)) as client:
        wait_until_ready(client)
        assert client.get("/health/ready").json()["missing"] == ["tiny-sentiment"]


@pytest.fixture
def admin(store):
    add_version(store, "tiny-lm", 1, 2)
    with TestClient(create_app(tiny_settings(store, rescan_seconds=0, admin_token=TOKEN))) as client:
        wait_until_ready(client)
        yield client


def default_served(client) -> int:
    return post(client, "/score", {"text": "the stock fell"})["model"]["version"]


def test_pin_a_version_for_rollback_then_unpin(admin):
    assert default_served(admin) == 2
    pinned = admin.put("/admin/models/tiny-lm/pin", json={"version": 1}, headers=ADMIN)
    assert pinned.status_code == 200
    assert (pinned.json()["default_version"], pinned.json()["pinned_version"]) == (1, 1)
    assert default_served(admin) == 1
    assert post(admin, "/score", {"text": "the", "model": "tiny-lm@2"})["model"]["version"] == 2
    unpinned = admin.delete("/admin/models/tiny-lm/pin", headers=ADMIN)
    assert unpinned.status_code == 200 and unpinned.json()["pinned_version"] is None
    assert default_served(admin) == 2


def test_unload_and_load_a_version(admin):
    unloaded = admin.post("/admin/models/tiny-lm/versions/2/unload", headers=ADMIN).json()
    assert unloaded["state"] == "unloaded"
    assert default_served(admin) == 1
    assert admin.post("/admin/rescan", headers=ADMIN).json()["loaded"] == []  # scans leave it unloaded
    assert admin.post("/admin/models/tiny-lm/versions/2/load", headers=ADMIN).json()["state"] == "serving"
    assert default_served(admin) == 2


def test_admin_without_the_token_is_refused_in_the_error_envelope(admin, store):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        response = admin.post("/admin/rescan", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert admin.put("/admin/models/tiny-lm/pin", json={"version": 9}, headers=ADMIN).status_code == 404
    with TestClient(create_app(tiny_settings(store, rescan_seconds=0))) as client:
        response = client.get("/admin/models", headers=ADMIN)
        assert (response.status_code, response.json()["error"]["code"]) == (403, "admin_disabled")


def test_a_retired_version_unloads_once_its_requests_finish(store):
    forgotten = []
    registry = ModelRegistry(store, threads=1, max_tokens=64, on_unload=forgotten.append)
    registry.load_all()
    runtime = registry.language_model("tiny-lm")
    with runtime.in_use():
        shutil.rmtree(store / "tiny-lm" / "1")
        assert registry.reconcile().removed == ["tiny-lm@1"]
        assert registry.draining() == ["tiny-lm@1"] and forgotten == []
    assert registry.draining() == [] and forgotten == [runtime]


def test_loading_leaves_no_private_copy_behind(store, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    add_version(store, "tiny-lm", 1, 2, corrupt=True)
    registry = ModelRegistry(store, threads=1, max_tokens=64)
    report = registry.load_all()
    assert report.failed == ["tiny-lm@2"] and len(report.loaded) == 2
    assert list(scratch.iterdir()) == []


def test_each_load_of_a_version_has_its_own_cache_key(store):
    registry = ModelRegistry(store, threads=1, max_tokens=64)
    registry.load_all()
    first = registry.language_model("tiny-lm")
    registry.unload("tiny-lm", 1)
    registry.load("tiny-lm", 1)
    second = registry.language_model("tiny-lm")
    assert second is not first and second.cache_key("float32") != first.cache_key("float32")


def test_a_version_linked_from_outside_the_store_is_refused_unless_allowed(store, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.move(str(add_version(store, "tiny-lm", 1, 2)), outside)
    (store / "tiny-lm" / "2").symlink_to(outside, target_is_directory=True)
    registry = ModelRegistry(store, threads=1, max_tokens=64)
    registry.load_all()
    refused = next(v for v in registry.versions() if v.ref == "tiny-lm@2")
    assert refused.state is ModelState.FAILED and "outside the model store" in refused.reason
    assert registry.default_version("tiny-lm") == 1
    allowed = ModelRegistry(store, threads=1, max_tokens=64, allow_links_outside_store=True)
    allowed.load_all()
    assert allowed.default_version("tiny-lm") == 2


def test_the_heap_is_frozen_once_models_are_loaded(tiny_store):
    """After a reconcile that loads versions, what is alive leaves the collector's generations, so a
    full collection under load does not walk the whole heap (app.lifecycle.freeze_heap)."""
    import gc

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    with TestClient(create_app(tiny_settings(tiny_store))) as client:
        wait_until_ready(client)
        deadline = time.monotonic() + 5
        while gc.get_freeze_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gc.get_freeze_count() > 10_000
    gc.unfreeze()
