"""The models shipped in model_store/ load, pass their self-tests and answer sensibly. A missing
shipped model is a failure: a fresh clone must serve real predictions."""

from __future__ import annotations

import pytest
from conftest import REPO, tiny_settings, wait_until_ready
from starlette.testclient import TestClient

from app.main import create_app

STORE = REPO / "model_store"
SHIPPED = {"ptb-lm": "language-model", "sst2-sentiment": "sentiment"}

@pytest.fixture(scope="module")
def shipped():
    with TestClient(create_app(tiny_settings(STORE)), raise_server_exceptions=False) as client:
        wait_until_ready(client, timeout=300)
        yield client


def test_every_shipped_model_is_in_the_store_and_serves(shipped):
    assert {m["name"] for m in shipped.get("/models").json()["models"]} >= set(SHIPPED)
    assert shipped.get("/health/ready").json()["failed"] == []
    for model in shipped.get("/models").json()["models"]:
        assert all(v["state"] == "serving" for v in model["versions"]), model["name"]


def served(shipped, task: str) -> str:
    names = {m["name"] for m in shipped.get("/models").json()["models"] if m["task"] == task}
    name = next((n for n, t in SHIPPED.items() if t == task and n in names), None)
    assert name is not None, f"model_store/ ships no {task} model"
    return name


def test_language_model_is_the_default_and_predicts_plausible_words(shipped):
    name = served(shipped, "language-model")
    answer = shipped.post("/predict-next", json={"text": "the company said it", "top_k": 10}).json()
    assert answer["model"]["name"] == name
    assert answer["unknown"] == []
    scored = shipped.post("/score", json={"texts": ["the company said it expects higher profits",
                                                    "profits higher expects it said company the"]}).json()
    fluent, scrambled = scored["results"]
    assert fluent["total_log_prob"] > scrambled["total_log_prob"]
    assert fluent["perplexity"] < 1000


def test_sentiment_model_is_the_default_and_tells_praise_from_scorn(shipped):
    name = served(shipped, "sentiment")
    answer = shipped.post("/sentiment", json={"texts": ["a gorgeous, witty and moving film",
                                                        "dull, tedious and badly acted"]}).json()
    assert answer["model"]["name"] == name
    assert [r["label"] for r in answer["results"]] == ["positive", "negative"]
