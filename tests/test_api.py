"""The endpoints' answers, through an in-process ASGI client over the tiny model store."""

from __future__ import annotations

import math

from conftest import LABELS, post, tiny_settings
from starlette.testclient import TestClient

from app.config import Settings, available_cpus
from app.main import create_app


def test_predict_next_returns_top_k_words_most_probable_first(client):
    answer = post(client, "/predict-next", {"text": "The company said it", "top_k": 7})
    assert answer["model"] == {"name": "tiny-lm", "version": 1}
    assert answer["tokens"] == ["the", "company", "said", "it"]
    predictions = answer["predictions"]
    assert len(predictions) == 7
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    for p in predictions:
        assert math.isclose(math.log(p["probability"]), p["log_prob"], rel_tol=1e-9)


def test_predict_next_leaves_out_special_tokens_unless_asked(client):
    everything = {"text": "", "top_k": 100}
    words = [p["word"] for p in post(client, "/predict-next", everything)["predictions"]]
    assert not {"<eos>", "<unk>", "<pad>"} & set(words)
    with_special = post(client, "/predict-next", {**everything, "include_special": True})["predictions"]
    assert {"<eos>", "<unk>"} <= {p["word"] for p in with_special}
    assert math.isclose(sum(p["probability"] for p in with_special), 1.0, abs_tol=1e-5)


def test_empty_prefix_predicts_the_first_word_of_a_sentence(client):
    """/predict-next with no text and /score agree: both condition on <eos> alone."""
    first = post(client, "/predict-next", {"text": "", "top_k": 100})["predictions"]
    by_word = {p["word"]: p["log_prob"] for p in first}
    scored = post(client, "/score", {"text": "company"})["results"][0]["token_log_probs"][0]
    assert scored["token"] == "company"
    assert math.isclose(scored["log_prob"], by_word["company"], abs_tol=1e-5)


def test_next_word_after_a_prefix_matches_its_score(client):
    prefix_words = post(client, "/predict-next", {"text": "the stock", "top_k": 100})["predictions"]
    fell = next(p["log_prob"] for p in prefix_words if p["word"] == "fell")
    scored = post(client, "/score", {"text": "the stock fell"})["results"][0]["token_log_probs"]
    assert math.isclose(scored[2]["log_prob"], fell, abs_tol=1e-5)


def test_unknown_words_are_reported_and_fed_as_unk(client):
    answer = post(client, "/predict-next", {"text": "the zebra said"})
    assert answer["tokens"] == ["the", "<unk>", "said"]
    assert answer["unknown"] == ["zebra"]


def test_text_is_normalised_like_the_corpus(client):
    answer = post(client, "/predict-next", {"text": "The company said 12 shares."})
    assert answer["tokens"] == ["the", "company", "said", "N", "shares"]


def test_score_reports_per_token_log_probs_total_and_perplexity(client):
    answer = post(client, "/score", {"text": "the stock fell"})
    assert answer["conventions"] == {
        "log_base": "e", "context_start": "<eos>", "closing_eos_counted": True,
        "perplexity": "exp(-total_log_prob / token_count)",
    }
    (result,) = answer["results"]
    assert [t["token"] for t in result["token_log_probs"]] == ["the", "stock", "fell", "<eos>"]
    assert result["token_count"] == 4
    total = sum(t["log_prob"] for t in result["token_log_probs"])
    assert math.isclose(result["total_log_prob"], total, rel_tol=1e-9)
    assert all(t["log_prob"] < 0 for t in result["token_log_probs"])
    assert math.isclose(result["perplexity"], math.exp(-total / 4), rel_tol=1e-9)


def test_score_can_leave_out_the_closing_eos(client):
    with_eos = post(client, "/score", {"text": "the stock fell"})["results"][0]
    without = post(client, "/score", {"text": "the stock fell", "count_eos": False})
    assert without["conventions"]["closing_eos_counted"] is False
    result = without["results"][0]
    assert [t["token"] for t in result["token_log_probs"]] == ["the", "stock", "fell"]
    assert result["token_log_probs"] == with_eos["token_log_probs"][:3]


def test_an_empty_text_scores_only_the_closing_eos(client):
    result = post(client, "/score", {"text": ""})["results"][0]
    assert [t["token"] for t in result["token_log_probs"]] == ["<eos>"]
    nothing = post(client, "/score", {"text": "", "count_eos": False})["results"][0]
    assert (nothing["token_count"], nothing["total_log_prob"], nothing["perplexity"]) == (0, 0.0, None)


def test_a_batch_scores_each_text_as_if_alone(client):
    texts = ["the stock fell", "mr. smith is chairman of the company", "", "shares fell N $"]
    batch = post(client, "/score", {"texts": texts})["results"]
    assert [r["index"] for r in batch] == [0, 1, 2, 3]
    for text, result in zip(texts, batch, strict=True):
        alone = post(client, "/score", {"text": text})["results"][0]
        assert result["tokens"] == alone["tokens"]
        assert math.isclose(result["total_log_prob"], alone["total_log_prob"], abs_tol=1e-4)


def test_rank_orders_texts_by_total_log_prob_for_nbest_rescoring(client):
    texts = ["the company said", "the the the the the the the", "said"]
    answer = post(client, "/score", {"texts": texts, "rank": True})
    totals = [r["total_log_prob"] for r in answer["results"]]
    assert answer["ranking"] == sorted(range(3), key=lambda i: -totals[i])
    assert post(client, "/score", {"texts": texts})["ranking"] is None


def test_sentiment_gives_a_label_and_a_probability_per_label(client):
    answer = post(client, "/sentiment", {"text": "A gorgeous, witty film."})
    assert answer["model"] == {"name": "tiny-sentiment", "version": 1}
    assert answer["labels"] == LABELS
    (result,) = answer["results"]
    assert result["tokens"] == ["a", "gorgeous", ",", "witty", "film", "."]
    assert set(result["probabilities"]) == set(LABELS)
    assert math.isclose(sum(result["probabilities"].values()), 1.0, abs_tol=1e-5)
    assert result["label"] == max(result["probabilities"], key=result["probabilities"].get)


def test_sentiment_of_a_text_does_not_depend_on_its_batch(client):
    texts = ["dull and tedious", "a gorgeous , witty film that is good and not bad at all", "good"]
    batch = post(client, "/sentiment", {"texts": texts})["results"]
    for text, result in zip(texts, batch, strict=True):
        alone = post(client, "/sentiment", {"text": text})["results"][0]
        for label in LABELS:
            assert math.isclose(result["probabilities"][label], alone["probabilities"][label], abs_tol=1e-5)


def test_a_model_can_be_named_with_or_without_version(client):
    for spec in ("tiny-lm", "tiny-lm@1"):
        assert post(client, "/predict-next", {"text": "", "model": spec})["model"]["name"] == "tiny-lm"
    assert post(client, "/sentiment", {"text": "good", "model": "tiny-sentiment@1"})["model"]["version"] == 1


def test_models_lists_every_version_with_its_manifest_facts(client):
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert set(models) == {"tiny-lm", "tiny-sentiment"}
    lm = models["tiny-lm"]
    assert (lm["task"], lm["default_version"]) == ("language-model", 1)
    (version,) = lm["versions"]
    assert version["state"] == "serving" and version["reason"] is None
    assert version["vocab_size"] == 27
    assert version["architecture"]["hidden_size"] == 16
    assert models["tiny-sentiment"]["versions"][0]["labels"] == LABELS
    assert client.get("/models/tiny-sentiment").json() == models["tiny-sentiment"]


def test_health_endpoints(client):
    assert client.get("/health/live").json() == {"status": "alive"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "serving": ["tiny-lm@1", "tiny-sentiment@1"], "failed": [],
                            "missing": []}


def test_metrics_count_requests_errors_and_inference_time(client):
    post(client, "/score", {"text": "the stock fell"})
    client.post("/score", json={"text": 1})
    text = client.get("/metrics").text
    assert 'lstm_serve_http_requests_total{endpoint="/score",method="POST",status="200"}' in text
    assert 'lstm_serve_http_errors_total{endpoint="/score",status="422"}' in text
    assert 'lstm_serve_http_request_duration_seconds_bucket{endpoint="/score"' in text
    assert 'lstm_serve_inference_duration_seconds_count{graph="full",model="tiny-lm",version="1"}' in text
    assert 'lstm_serve_model_versions{state="serving"} 2.0' in text


def test_metrics_label_routes_by_template_not_by_path(client):
    client.get("/models/tiny-lm")
    client.get("/models/nope")
    client.get("/docs-assets/swagger-ui.css")
    client.get("/no/such/path")
    text = client.get("/metrics").text
    assert 'lstm_serve_http_requests_total{endpoint="/models/{name}",method="GET",status="404"}' in text
    assert 'lstm_serve_http_requests_total{endpoint="/docs-assets",method="GET",status="200"}' in text
    assert 'lstm_serve_http_requests_total{endpoint="<unmatched>",method="GET",status="404"}' in text
    http_series = [line for line in text.splitlines() if line.startswith("lstm_serve_http")]
    assert not any("/no/such/path" in line or "tiny-lm" in line for line in http_series)


def test_not_ready_until_models_load(tiny_store):
    app = create_app(tiny_settings(tiny_store))
    client = TestClient(app, raise_server_exceptions=False)  # no `with`: lifespan never runs, nothing loads
    ready = client.get("/health/ready")
    assert ready.status_code == 503
    assert ready.json()["error"]["code"] == "not_ready"
    assert client.get("/health/live").status_code == 200
    scored = client.post("/score", json={"text": "the"})
    assert (scored.status_code, scored.json()["error"]["code"]) == (503, "not_ready")


def test_thread_budget_reads_the_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) >= 1
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(v1) == 1


def test_settings_come_from_prefixed_environment_variables(monkeypatch):
    monkeypatch.setenv("LSTM_SERVE_MAX_TEXTS", "3")
    monkeypatch.setenv("LSTM_SERVE_WORKERS", "1")
    monkeypatch.setenv("LSTM_SERVE_INTRA_OP_THREADS", "0")
    settings = Settings()
    assert settings.max_texts == 3
    assert 1 <= settings.intra_op_threads <= available_cpus()
    assert not settings.cpu_budget_exceeded
