"""End to end: ``python -m app`` as a subprocess on a loopback port, every endpoint over real HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
from urllib.parse import urlsplit

import httpx
from conftest import REPO


def test_every_endpoint_answers_over_http(live_server):
    with httpx.Client(base_url=live_server, timeout=10) as http:
        assert http.get("/health/live").json() == {"status": "alive"}
        assert http.get("/health/ready").json()["serving"] == ["tiny-lm@1", "tiny-sentiment@1"]

        predicted = http.post("/predict-next", json={"text": "the company said", "top_k": 3}).json()
        assert len(predicted["predictions"]) == 3

        scored = http.post("/score", json={"texts": ["the stock fell", "stock the fell"], "rank": True}).json()
        assert sorted(scored["ranking"]) == [0, 1]
        assert scored["results"][0]["token_count"] == 4

        sentiment = http.post("/sentiment", json={"text": "a witty film"}).json()
        assert sentiment["results"][0]["label"] in ("negative", "positive")

        assert [m["name"] for m in http.get("/models").json()["models"]] == ["tiny-lm", "tiny-sentiment"]
        assert http.get("/models/tiny-lm").json()["default_version"] == 1

        metrics = http.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        assert 'endpoint="/sentiment",method="POST",status="200"' in metrics.text

        assert http.get("/openapi.json").json()["info"]["title"] == "lstm-serve"
        for page in ("/docs", "/redoc"):
            assert http.get(page).status_code == 200


def test_chunked_body_over_the_limit_is_refused_by_the_server(live_server):
    def chunks():
        for _ in range(20):
            yield b"x" * 65536  # 1.25 MiB in all, sent without Content-Length

    response = httpx.post(f"{live_server}/score", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


def test_container_healthcheck_probe_sees_readiness(live_server):
    port = str(urlsplit(live_server).port)
    env = {**os.environ, "LSTM_SERVE_HOST": "0.0.0.0", "LSTM_SERVE_PORT": port}
    assert subprocess.run([sys.executable, "-m", "app.probe"], cwd=REPO, env=env, timeout=30).returncode == 0
    env["LSTM_SERVE_PORT"] = "1"  # nothing listens there
    assert subprocess.run([sys.executable, "-m", "app.probe"], cwd=REPO, env=env, timeout=30).returncode == 1
