"""The one request path (app/scheduler.py): admission, grouping rows of concurrent requests into
shared onnxruntime calls (or not, with batching off), and each request getting the answer it
would have got alone."""

from __future__ import annotations

import asyncio
import gc
import random
import time

import pytest
from conftest import post, scheduled, tiny_settings, wait_until_ready
from starlette.testclient import TestClient

from app.cache import PrefixStateCache
from app.errors import ClientClosedRequest, Overloaded
from app.lifecycle import freeze_heap
from app.main import create_app
from app.routes.inference import unless_disconnected
from app.scheduler import INFERENCE_THREAD_NAME, Admission, Scheduler, length_buckets

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


def test_admission_refuses_by_expected_wait_with_a_retry_after_from_the_queue():
    admission = Admission(max_wait=1.0)
    # The second waits an expected 0.6 s: admitted.
    with admission.admit(0.6, "/score"), admission.admit(0.6, "/score"):
        with pytest.raises(Overloaded) as refused:
            with admission.admit(0.1, "/score"):  # would wait 1.2 s
                pass
        assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"}
        assert refused.value.details["expected_wait_ms"] == 1200
    with admission.admit(3.5, "/score"), pytest.raises(Overloaded) as refused:
        with admission.admit(0.1, "/score"):
            pass
    assert refused.value.headers == {"Retry-After": "3"}  # 3.5 s queued: 2.5 s over the bound
    with admission.admit(0.1, "/score"):
        # The instant exits above taught the calibration that requests finish sooner than expected.
        assert admission.calibration < 1
        assert admission.outstanding == 1 and admission.expected_wait == pytest.approx(0.1 * admission.calibration)


def test_admission_calibrates_its_expectation_to_a_high_quantile_of_the_real_time():
    admission = Admission(max_wait=1.0)
    rng = random.Random(0)
    for _ in range(4000):  # real time 1-2x what the costs said, uniformly: the 95th percentile is 1.95x
        admission.calibrate(0.1, 0.1 * rng.uniform(1.0, 2.0))
    assert 1.8 <= admission.calibration <= 2.1
    learnt = admission.calibration
    admission.calibrate(0.001, 1.0)  # a request that hardly queued says nothing about queueing
    assert admission.calibration == learnt
    with admission.admit(0.6, "/score"):
        assert admission.expected_wait == pytest.approx(0.6 * learnt)
        with pytest.raises(Overloaded):  # 0.6 s of costs, calibrated, is a wait over the 1 s bound
            with admission.admit(0.1, "/score"):
                pass
    for _ in range(500):
        admission.calibrate(0.1, 100.0)
    assert admission.calibration == Admission.CALIBRATION_LIMITS[1]


def test_a_request_that_overruns_its_expectation_raises_the_expected_wait_before_it_finishes():
    admission = Admission(max_wait=1.0)
    with admission.admit(0.05, "/score"):
        assert admission.expected_wait == pytest.approx(0.05)
        time.sleep(0.15)  # three times what it was expected to take, and still not done
        assert admission.expected_wait >= 0.05 * 3
    with admission.admit(0.05, "/generate", calibrate=False):  # a stream is paced by its client
        time.sleep(0.15)
        assert admission.expected_wait == pytest.approx(0.05 * admission.calibration)


def test_admission_learns_what_a_token_position_costs():
    admission = Admission(max_wait=1.0)
    assert admission.cost("score", 10) == pytest.approx(10 * Admission.PRIOR_SECONDS_PER_POSITION)
    admission.observe("score", 100, 0.01)
    assert admission.cost("score", 50) == pytest.approx(0.005)
    admission.observe("score", 100, 0.02)
    assert admission.cost("score", 50) == pytest.approx(0.005 + Admission.SMOOTHING * 0.005)
    admission.oldest_queued_age = lambda: 2.0  # a queue older than the costs say: believed
    assert admission.expected_wait == 2.0
    with pytest.raises(Overloaded):
        admission.check()
    assert admission.cost("classify", 1) == pytest.approx(Admission.PRIOR_SECONDS_PER_POSITION)


def test_admission_fits_a_fixed_part_per_call_once_call_sizes_vary():
    admission = Admission(max_wait=1.0)
    # Calls of four one-token steps take 4 ms (mostly fixed: loop, thread hop, a softmax per row), calls of
    # four 15-token prefixes 10 ms. Per position alone, a 15-token prefix would be charged ~19 ms.
    for _ in range(10):
        admission.observe("step", 4, 0.004, rows=4)
        admission.observe("step", 60, 0.010, rows=4)
    per_position = 0.006 / 56
    per_call = 0.004 - 4 * per_position
    assert admission.cost("step", 15) == pytest.approx(15 * per_position + per_call / 4, rel=1e-6)
    assert admission.cost("step", 15, rows=8) == pytest.approx(15 * per_position + per_call, rel=1e-6)
    # Calls whose size made no difference: all fixed cost, shared by the rows.
    for _ in range(30):
        admission.observe("flat", 4, 0.004, rows=4)
        admission.observe("flat", 60, 0.004, rows=4)
    assert admission.cost("flat", 100) == pytest.approx(0.001, rel=1e-6)


def test_requests_over_the_waiting_bound_are_refused_while_the_others_are_answered(models):
    lm = models.registry.language_model("tiny-lm")
    # Each request is 4 positions ("the stock fell" and <eos>) at the prior cost: the third would wait
    # for the first two, over a 1 ms bound.
    bound = 5 * Admission.PRIOR_SECONDS_PER_POSITION
    answers = scheduled(lambda s: [s.score(lm, ["the stock fell"], True, None) for _ in range(3)],
                        max_queue_wait=bound)
    assert [type(a).__name__ for a in answers] == ["tuple", "tuple", "Overloaded"]
    assert sum(models.rows()) == 2


def slow(function, seconds: float, ran: list):
    """``function`` made slow, recording the rows of every call."""

    def run(precision, rows):
        ran.append(len(rows))
        time.sleep(seconds)
        return function(precision, rows)

    return run


def test_work_past_its_deadline_is_answered_504_and_never_run(models, monkeypatch):
    lm = models.registry.language_model("tiny-lm")
    ran: list[int] = []
    monkeypatch.setattr(lm, "score_segments", slow(lm.score_segments, 0.3, ran))
    started = time.perf_counter()
    answers = scheduled(lambda s: [s.score(lm, [text], True, None) for text in SENTENCES[:3]], timeout=0.1,
                        batching=False)
    assert time.perf_counter() - started < 0.6  # answered at the deadline, not after the slow call
    assert [type(a).__name__ for a in answers] == ["DeadlineExceeded"] * 3
    assert answers[0].status == 504 and answers[0].code == "deadline_exceeded"
    assert ran == [1]  # the first was running; the two queued behind it were dropped


def test_a_request_cancelled_while_queued_never_reaches_onnxruntime(models, monkeypatch):
    lm = models.registry.language_model("tiny-lm")
    ran: list[int] = []
    monkeypatch.setattr(lm, "score_segments", slow(lm.score_segments, 0.2, ran))

    async def main():
        scheduler = Scheduler(Admission(60.0), PrefixStateCache(0), batching=False)
        try:
            first = asyncio.ensure_future(scheduler.score(lm, ["the stock fell"], True, None))
            gone = asyncio.ensure_future(scheduler.score(lm, ["shares fell", "said"], True, None))
            await asyncio.sleep(0.05)
            gone.cancel()  # what the route does when the client disconnects
            await first
            await asyncio.sleep(0.05)
            return scheduler.admission.outstanding
        finally:
            scheduler.close()

    assert asyncio.run(main()) == 0
    assert ran == [1]


def test_a_client_deadline_header_is_honoured_and_validated(client):
    late = client.post("/score", json={"text": "the stock fell"}, headers={"X-Request-Timeout-Ms": "0.001"})
    assert (late.status_code, late.json()["error"]["code"]) == (504, "deadline_exceeded")
    for bad in ("soon", "0", "-5", "1e9"):
        refused = client.post("/score", json={"text": "the"}, headers={"X-Request-Timeout-Ms": bad})
        assert (refused.status_code, refused.json()["error"]["code"]) == (422, "validation_error"), bad
    ok = client.post("/score", json={"text": "the"}, headers={"X-Request-Timeout-Ms": "5000"})
    assert ok.status_code == 200


def test_a_failing_group_fails_each_of_its_requests(models, monkeypatch):
    lm = models.registry.language_model("tiny-lm")

    def broken(precision, rows):
        raise RuntimeError("onnxruntime failed")

    monkeypatch.setattr(lm, "score_segments", broken)
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
        answer = post(client, "/score", {"texts": ["the stock fell", "shares fell"], "precision": "float32"})
        after = client.get("/metrics").text
    assert answer["precision"] == "float32" and len(answer["results"]) == 2
    # Exactly one more call, and it held both texts: the 2-row bucket grew, the 1-row one did not.
    assert _batch_rows_bucket(after, "1.0") == _batch_rows_bucket(before, "1.0")
    assert _batch_rows_bucket(after, "2.0") == _batch_rows_bucket(before, "2.0") + 1


def test_work_is_cancelled_when_the_client_goes_away():
    class GoneClient:  # what the ASGI server tells a handler once the connection is closed
        async def receive(self):
            await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}

    async def main():
        work = asyncio.ensure_future(asyncio.sleep(5, result="answer"))
        with pytest.raises(ClientClosedRequest):
            await unless_disconnected(GoneClient(), work)
        return work

    assert asyncio.run(main()).cancelled()


def test_under_overload_admitted_requests_wait_at_most_the_bound_and_the_rest_get_429(models, monkeypatch):
    """Closed-loop clients, three times as many as fit in the bound, against a model whose calls take
    10 ms: admitted requests (after the first calls, which teach admission the cost) wait about the
    bound plus one service time; the others are refused at once; the model stays busy."""
    lm = models.registry.language_model("tiny-lm")
    monkeypatch.setattr(lm, "score_segments", slow(lm.score_segments, 0.01, []))
    bound, clients, seconds = 0.1, 30, 2.0
    outcomes: list[tuple[float, float, str]] = []  # (started, seconds, outcome)

    async def client(scheduler, began):
        while (started := time.perf_counter()) - began < seconds:
            try:
                await scheduler.score(lm, ["the stock fell"], True, None)
                outcomes.append((started - began, time.perf_counter() - started, "200"))
            except Overloaded:
                outcomes.append((started - began, time.perf_counter() - started, "429"))
                await asyncio.sleep(0.005)  # a client that retries at once, but not in a busy loop

    async def main():
        scheduler = Scheduler(Admission(bound), PrefixStateCache(0), batching=False)
        try:
            began = time.perf_counter()
            await asyncio.gather(*(client(scheduler, began) for _ in range(clients)))
        finally:
            scheduler.close()

    freeze_heap()  # as the service does once its models are loaded (app.lifecycle): no full-heap GC pauses
    try:
        asyncio.run(main())
    finally:
        gc.unfreeze()
    settled = [o for o in outcomes if o[0] > 0.3]
    accepted = sorted(latency for _, latency, outcome in settled if outcome == "200")
    refused = [latency for _, latency, outcome in settled if outcome == "429"]
    assert accepted and refused
    # Without admission they would wait for all 30 clients' calls (300 ms). The slack of a few service
    # times is the error of the learnt costs (thread hops, timer jitter on a busy CI machine).
    assert accepted[int(0.99 * (len(accepted) - 1))] <= bound + 5 * 0.01
    assert max(refused) < 0.005  # at once
    assert len(accepted) / (seconds - 0.3) >= 0.7 / 0.01  # the model stays busy: >= 70% of 100 calls/s
