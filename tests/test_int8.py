"""int8 graphs: loaded beside the float ones, chosen per request or by configuration, reported in
answers and in /models; a model without them still serves float32."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import post, tiny_settings, wait_until_ready
from starlette.testclient import TestClient

from app.main import create_app


def test_int8_is_chosen_per_request_and_reported(client):
    float_words = post(client, "/predict-next", {"text": "the company", "top_k": 100, "include_special": True})
    int8_words = post(client, "/predict-next", {"text": "the company", "top_k": 100, "include_special": True,
                                                "precision": "int8"})
    assert (float_words["precision"], int8_words["precision"]) == ("float32", "int8")
    assert math.isclose(sum(p["probability"] for p in int8_words["predictions"]), 1.0, abs_tol=1e-4)
    by_word = {p["word"]: p["log_prob"] for p in float_words["predictions"]}
    # Quantization moves the numbers a little, not a lot.
    assert max(abs(p["log_prob"] - by_word[p["word"]]) for p in int8_words["predictions"]) < 0.5

    scored = post(client, "/score", {"text": "the stock fell", "precision": "int8"})
    assert scored["precision"] == "int8" and scored["results"][0]["token_count"] == 4
    assert math.isclose(scored["results"][0]["total_log_prob"],
                        post(client, "/score", {"text": "the stock fell"})["results"][0]["total_log_prob"], abs_tol=0.5)

    classified = post(client, "/sentiment", {"text": "a gorgeous , witty film", "precision": "int8"})
    assert classified["precision"] == "int8"
    assert math.isclose(sum(classified["results"][0]["probabilities"].values()), 1.0, abs_tol=1e-5)


def test_models_lists_each_versions_precisions(client):
    for model in client.get("/models").json()["models"]:
        assert model["versions"][0]["precisions"] == ["float32", "int8"]


def test_an_unknown_precision_is_a_validation_error(client):
    response = client.post("/score", json={"text": "the", "precision": "float16"})
    assert (response.status_code, response.json()["error"]["code"]) == (422, "validation_error")


@pytest.fixture(scope="module")
def float_only_store(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny store with the int8 graphs left out of both manifests."""
    store = tmp_path_factory.mktemp("float-only")
    shutil.copytree(tiny_store, store, dirs_exist_ok=True)
    for name in ("tiny-lm", "tiny-sentiment"):
        path = store / name / "1" / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["graphs"] = {k: v for k, v in manifest["graphs"].items() if not k.endswith("-int8")}
        path.write_text(json.dumps(manifest))
    return store


def test_a_model_without_int8_graphs_serves_float32_and_refuses_int8(float_only_store):
    settings = tiny_settings(float_only_store, default_precision="int8")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_until_ready(client)
        # The configured default falls back to what the model has...
        assert post(client, "/predict-next", {"text": "the"})["precision"] == "float32"
        assert post(client, "/sentiment", {"text": "good"})["precision"] == "float32"
        # ...while asking for int8 explicitly is a clear 422.
        response = client.post("/score", json={"text": "the", "precision": "int8"})
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "precision_unavailable"
        assert error["message"] == "tiny-lm@1 has no int8 graphs; ask for one of: float32"
        assert error["details"] == {"requested": "int8", "available": ["float32"]}
        assert client.get("/models/tiny-lm").json()["versions"][0]["precisions"] == ["float32"]


def test_the_default_precision_comes_from_the_settings(tiny_store):
    with TestClient(create_app(tiny_settings(tiny_store, default_precision="int8"))) as client:
        wait_until_ready(client)
        assert post(client, "/score", {"text": "the stock"})["precision"] == "int8"
        assert post(client, "/predict-next", {"text": "the", "precision": "float32"})["precision"] == "float32"
        metrics = client.get("/metrics").text
    assert 'lstm_serve_inference_duration_seconds_count{graph="full-int8",model="tiny-lm",version="1"}' in metrics
    assert 'lstm_serve_inference_duration_seconds_count{graph="last-int8",model="tiny-lm",version="1"}' in metrics
