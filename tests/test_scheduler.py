"""The one request path (app/scheduler.py): admission, grouping rows of concurrent requests into
shared onnxruntime calls (or not, with batching off), and each request getting the answer it
would have got alone."""

from __future__ import annotations

import time

import pytest
from conftest import post, scheduled, tiny_settings, wait_until_ready
from starlette.testclient import TestClient

from app.errors import Overloaded
from app.main import create_app
from app.scheduler import INFERENCE_THREAD_NAME, Admission, length_buckets

SENTENCES = ["the stock fell", "mr. smith is chairman of the company", "", "shares fell N $",
             "the company said it expects new shares in the market this year", "said"]
REVIEWS = ["dull and tedious", "a gorgeous , witty film that is good and not bad at all", "good", "a movie"]
PREFIXES = ["", "the", "the company", "the company said", "the stock", "shares fell", "mr. smith is"]


def test_concurrent_scores_share_calls_and_match_the_unbatched_scores(models):
    lm = models.registry.language_model("tiny-lm")
    batched = scheduled(lambda s: [s.score(lm, [text], True, None) for text in SENTENCES])
    assert sum(models.rows("full")) == len(SENTENCES) and len(models.rows("full")) < len(SENTENCES)
    alone = scheduled(lambda s: [s.score(lm, [text], True, None) for text in SENTENCES], batching=False)
    for (scores, precision), (reference, _) in zip(batched, alone, strict=True):
        assert precision == "float32"
        (got,), (expected,) = scores, reference
        assert got.text == expected.text and got.token_count == expected.token_count
        for (token, value), (token_alone, value_alone) in zip(got.token_log_probs, expected.token_log_probs,
                                                              strict=True):
            assert token == token_alone and abs(value - value_alone) <= 1e-5


def test_concurrent_classifications_share_calls_and_match_the_unbatched_ones(models):
    classifier = models.registry.sentiment_model("tiny-sentiment")
    batched = scheduled(lambda s: [s.classify(classifier, [text], None) for text in REVIEWS])
    assert len(models.calls) < len(REVIEWS)
    alone = scheduled(lambda s: [s.classify(classifier, [text], None) for text in REVIEWS], batching=False)
    for (results, _), (reference, _) in zip(batched, alone, strict=True):
        for label, probability in results[0].probabilities.items():
            assert abs(probability - reference[0].probabilities[label]) <= 1e-5


def test_concurrent_next_word_steps_share_calls_and_match_the_unbatched_ones(models):
    lm = models.registry.language_model("tiny-lm")
    batched = scheduled(lambda s: [s.predict_next(lm, text, 100, True, None) for text in PREFIXES],
                        cache_bytes=1 << 20)
    assert {graph for graph, _, _ in models.calls} == {"last"}
    assert max(models.rows()) > 1
    alone = scheduled(lambda s: [s.predict_next(lm, text, 100, True, None) for text in PREFIXES], batching=False)
    for (result, _), (reference, _) in zip(batched, alone, strict=True):
        expected = {w.word: w.log_prob for w in reference.words}
        got = {w.word: w.log_prob for w in result.words}
        assert got.keys() == expected.keys()
        assert all(abs(got[word] - expected[word]) <= 1e-5 for word in got)


def test_a_group_never_exceeds_the_maximum_batch_size(models):
    lm = models.registry.language_model("tiny-lm")
    scheduled(lambda s: [s.score(lm, ["the stock fell"], True, None) for _ in range(7)], max_size=2)
    assert sum(models.rows()) == 7
    assert max(models.rows()) == 2


def test_length_buckets_bound_padding_and_token_positions():
    sizes = [3, 30, 4, 28, 16, 2, 600, 15]
    buckets = list(length_buckets(sizes, budget=64))
    assert sorted(i for bucket in buckets for i in bucket) == list(range(len(sizes)))
    for bucket in buckets:
        widest = max(sizes[i] for i in bucket)
        assert len(bucket) == 1 or len(bucket) * widest <= 64  # a row over the budget runs alone
        assert all(sizes[i] >= widest / 2 for i in bucket)  # nobody pays for more than twice their length
    assert [6] in buckets


def test_with_batching_off_each_call_holds_one_requests_rows(models):
    lm = models.registry.language_model("tiny-lm")
    scheduled(lambda s: [s.score(lm, ["the stock fell", "shares fell"], True, None) for _ in range(5)],
              batching=False)
    assert models.rows() == [2] * 5


def test_a_lone_request_does_not_wait_and_runs_on_the_inference_thread(models):
    lm = models.registry.language_model("tiny-lm")
    started = time.perf_counter()
    ((scores, _),) = scheduled(lambda s: [s.score(lm, ["the stock fell"], True, None)], max_wait=5.0)
    assert time.perf_counter() - started < 1.0  # far below the 5 s maximum wait
    assert scores[0].token_count == 4
    assert [thread for _, _, thread in models.calls] == [f"{INFERENCE_THREAD_NAME}_0"]


def test_admission_refuses_a_request_over_the_limit_with_429():
    admission = Admission(max_waiting=2)
    with admission.admit(), admission.admit():
        with pytest.raises(Overloaded) as refused:
            with admission.admit():
                pass
        assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"}
    with admission.admit():
        assert admission.outstanding == 1


def test_requests_over_the_waiting_limit_are_refused_while_the_others_are_answered(models):
    lm = models.registry.language_model("tiny-lm")
    answers = scheduled(lambda s: [s.score(lm, ["the stock fell"], True, None) for _ in range(3)], max_waiting=2)
    assert [type(a).__name__ for a in answers] == ["tuple", "tuple", "Overloaded"]
    assert sum(models.rows()) == 2


def test_a_failing_group_fails_each_of_its_requests(models, monkeypatch):
    lm = models.registry.language_model("tiny-lm")

    def broken(precision, rows):
        raise RuntimeError("onnxruntime failed")

    monkeypatch.setattr(lm, "score_rows", broken)
    answers = scheduled(lambda s: [s.score(lm, [text], True, None) for text in SENTENCES[:3]])
    assert all(isinstance(a, RuntimeError) for a in answers)


def _batch_rows_bucket(metrics: str, le: str) -> float:
    prefix = f'lstm_serve_inference_batch_rows_bucket{{graph="full",le="{le}",model="tiny-lm",version="1"}}'
    (line,) = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(line.split()[-1])


@pytest.mark.parametrize("batching", [True, False])
def test_batch_sizes_observed_are_in_metrics(tiny_store, batching):
    with TestClient(create_app(tiny_settings(tiny_store, batching=batching))) as client:
        wait_until_ready(client)
        assert client.app.state.scheduler.batching is batching
        before = client.get("/metrics").text
        answer = post(client, "/score", {"texts": ["the stock fell", "shares fell"]})
        after = client.get("/metrics").text
    assert answer["precision"] == "float32" and len(answer["results"]) == 2
    # Exactly one more call, and it held both texts: the 2-row bucket grew, the 1-row one did not.
    assert _batch_rows_bucket(after, "1.0") == _batch_rows_bucket(before, "1.0")
    assert _batch_rows_bucket(after, "2.0") == _batch_rows_bucket(before, "2.0") + 1
