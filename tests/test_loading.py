"""Loading: a version whose files or self-test do not check out is kept out of service with the
reason, and everything else still serves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_settings, wait_until_ready
from starlette.testclient import TestClient

from app.main import create_app
from app.registry import ModelRegistry, ModelState


def rewrite_manifest(version_dir: Path, change) -> None:
    path = version_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def damaged_store(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-lm@1 intact; tiny-lm@2 with a wrong self-test value; tiny-sentiment@1 with a flipped
    weight byte; tiny-sentiment@2 without a manifest."""
    store = tmp_path_factory.mktemp("damaged")
    shutil.copytree(tiny_store, store, dirs_exist_ok=True)

    lm2 = store / "tiny-lm" / "2"
    shutil.copytree(store / "tiny-lm" / "1", lm2)

    def wrong_selftest(manifest: dict) -> None:
        manifest["version"] = 2
        manifest["selftest"]["cases"][0]["checks"][0]["value"] += 0.5

    rewrite_manifest(lm2, wrong_selftest)

    weights = store / "tiny-sentiment" / "1" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))

    (store / "tiny-sentiment" / "2").mkdir()
    return store


@pytest.fixture(scope="module")
def damaged_client(damaged_store: Path):
    settings = tiny_settings(damaged_store, ready_requires_every_model=False)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_until_ready(client)
        yield client


def test_failed_versions_are_reported_with_their_reason(damaged_client):
    ready = damaged_client.get("/health/ready").json()
    assert ready["serving"] == ["tiny-lm@1"]
    assert sorted(ready["failed"]) == ["tiny-lm@2", "tiny-sentiment@1", "tiny-sentiment@2"]
    models = {m["name"]: m for m in damaged_client.get("/models").json()["models"]}
    reasons = {(m["name"], v["version"]): v["reason"] for m in models.values() for v in m["versions"]}
    assert "self-test case 0" in reasons[("tiny-lm", 2)]
    assert reasons[("tiny-sentiment", 1)] == "weights.bin does not match its sha256 in the manifest"
    assert reasons[("tiny-sentiment", 2)] == "manifest.json is missing"
    assert models["tiny-lm"]["default_version"] == 1
    assert models["tiny-sentiment"]["default_version"] is None


def test_the_highest_version_in_service_is_the_default(damaged_client):
    answer = damaged_client.post("/score", json={"text": "the stock fell"})
    assert answer.json()["model"] == {"name": "tiny-lm", "version": 1}


def test_a_failed_version_is_unavailable(damaged_client):
    response = damaged_client.post("/score", json={"text": "the", "model": "tiny-lm@2"})
    assert (response.status_code, response.json()["error"]["code"]) == (503, "model_unavailable")
    response = damaged_client.post("/sentiment", json={"text": "good"})
    assert (response.status_code, response.json()["error"]["code"]) == (503, "model_unavailable")


def test_an_empty_store_is_never_ready(tmp_path):
    registry = ModelRegistry(tmp_path, threads=1, max_tokens=8)
    registry.load_all()
    assert registry.loaded and not registry.ready


def test_a_manifest_for_another_directory_is_refused(tiny_store, tmp_path):
    shutil.copytree(tiny_store / "tiny-lm" / "1", tmp_path / "other-lm" / "1")
    registry = ModelRegistry(tmp_path, threads=1, max_tokens=8)
    registry.load_all()
    (entry,) = registry.versions()
    assert entry.state is ModelState.FAILED
    assert entry.reason == "manifest.json describes tiny-lm@1, not the directory it is in"


def test_a_file_name_outside_the_version_directory_is_refused(tiny_store, tmp_path):
    version = tmp_path / "tiny-lm" / "1"
    shutil.copytree(tiny_store / "tiny-lm" / "1", version)
    rewrite_manifest(version, lambda m: m["files"].update({"../escape": {"sha256": "0" * 64, "bytes": 1}}))
    registry = ModelRegistry(tmp_path, threads=1, max_tokens=8)
    registry.load_all()
    assert "not a plain file name" in registry.versions()[0].reason


def test_preferred_model_names_are_the_default_whatever_their_order(tiny_store, tmp_path):
    for name in ("aaa-lm", "ptb-lm"):
        version = tmp_path / name / "1"
        shutil.copytree(tiny_store / "tiny-lm" / "1", version)
        rewrite_manifest(version, lambda m, name=name: m.update(name=name))
    registry = ModelRegistry(tmp_path, threads=1, max_tokens=8)
    registry.load_all()
    assert registry.language_model(None).name == "ptb-lm"
    assert registry.language_model("aaa-lm").name == "aaa-lm"
