"""int8 graphs: loaded beside the float ones, chosen per request or by configuration, reported in
answers and in /models; a model without them still serves float32."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
from conftest import post, scheduled, tiny_settings, wait_until_ready
from starlette.testclient import TestClient

from app.main import create_app


def test_int8_is_the_default_where_a_model_has_it(client):
    assert post(client, "/predict-next", {"text": "the company"})["precision"] == "int8"
    assert post(client, "/score", {"text": "the stock fell"})["precision"] == "int8"
    assert post(client, "/sentiment", {"text": "a gorgeous , witty film"})["precision"] == "float32"


def test_int8_is_chosen_per_request_and_reported(client):
    float_words = post(client, "/predict-next", {"text": "the company", "top_k": 100, "include_special": True,
                                                 "precision": "float32"})
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
                        post(client, "/score", {"text": "the stock fell", "precision": "float32"})["results"][0][
                            "total_log_prob"], abs_tol=0.5)

    # The classifier is all LSTM, which has no int8 kernel at fixed scales: it has no int8 graphs.
    response = client.post("/sentiment", json={"text": "a gorgeous , witty film", "precision": "int8"})
    assert (response.status_code, response.json()["error"]["code"]) == (422, "precision_unavailable")


def test_models_lists_each_versions_precisions(client):
    precisions = {model["name"]: model["versions"][0]["precisions"] for model in client.get("/models").json()["models"]}
    assert precisions == {"tiny-lm": ["float32", "int8"], "tiny-sentiment": ["float32"]}


def test_an_int8_answer_is_the_same_alone_and_among_other_requests(models):
    """Fixed activation scales: batching decides which rows share a call, never what a row gets."""
    lm = models.registry.language_model("tiny-lm")
    texts = ["the stock fell", "mr. smith is chairman of the company", "shares fell N $",
             "the company said it expects new shares in the market this year", "said"]

    def scores(scheduler):
        return [scheduler.score(lm, [text], True, "int8") for text in texts]

    def next_words(scheduler):
        return [scheduler.predict_next(lm, text, 50, True, "int8") for text in texts]

    mixed = scheduled(scores)
    assert len(models.rows("full-int8")) < len(texts)  # the texts did share calls
    alone = scheduled(scores, batching=False)
    for ((batched,), precision), ((single,), _) in zip(mixed, alone, strict=True):
        assert precision == "int8"
        assert batched.token_log_probs == single.token_log_probs  # bit for bit
    mixed, alone = scheduled(next_words), scheduled(next_words, batching=False)
    assert [[(w.word, w.log_prob) for w in r.words] for r, _ in mixed] == \
        [[(w.word, w.log_prob) for w in r.words] for r, _ in alone]


def test_int8_graphs_with_scales_computed_per_call_are_not_served(tiny_store, tmp_path, caplog):
    """Graphs an older exporter quantized dynamically would answer a request according to the requests
    sharing its call: the service leaves them out, says so, and serves float32."""
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    path = store / "tiny-lm" / "1" / "manifest.json"
    manifest = json.loads(path.read_text())
    for graph in manifest["graphs"].values():
        graph.pop("activation_scales", None)  # as written before fixed scales
    path.write_text(json.dumps(manifest))
    caplog.set_level(logging.INFO, logger="app.runtime")
    with TestClient(create_app(tiny_settings(store, default_precision="int8"))) as client:
        wait_until_ready(client)
        assert client.get("/models/tiny-lm").json()["versions"][0]["precisions"] == ["float32"]
        assert post(client, "/score", {"text": "the stock"})["precision"] == "float32"
    assert "tiny-lm@1: not serving model.int8.onnx: its activation scales are computed per call" in caplog.text


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
