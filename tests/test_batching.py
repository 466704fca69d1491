"""Cross-request micro-batching: requests that arrive together share onnxruntime calls, and each
gets the answer it would have got alone."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from conftest import tiny_settings, wait_until_ready
from starlette.testclient import TestClient

from app.batching import InferenceScheduler, MicroBatcher
from app.cache import PrefixStateCache
from app.errors import Overloaded
from app.main import create_app
from app.registry import ModelRegistry
from app.runtime import InferencePool

SENTENCES = ["the stock fell", "mr. smith is chairman of the company", "", "shares fell N $",
             "the company said it expects new shares in the market this year", "said"]
REVIEWS = ["dull and tedious", "a gorgeous , witty film that is good and not bad at all", "good", "a movie"]
PREFIXES = ["", "the", "the company", "the company said", "the stock", "shares fell", "mr. smith is"]


@pytest.fixture(scope="module")
def calls(tiny_store):
    """A registry over the tiny store whose onnxruntime calls are recorded as (graph, rows)."""
    recorded: list[tuple[str, int]] = []
    registry = ModelRegistry(tiny_store, threads=1, max_tokens=256,
                             observer=lambda name, version: lambda graph, seconds, rows: recorded.append((graph, rows)))
    registry.load_all()
    return registry, recorded


def run_concurrently(registry, max_size: int, work) -> list:
    """Start every request of ``work(scheduler, ...)`` at once on a batching scheduler."""

    async def main():
        pool = InferencePool(max_waiting=256)
        batcher = MicroBatcher(pool, max_size=max_size, max_wait=0.05, max_waiting=256)
        try:
            return await asyncio.gather(*work(InferenceScheduler(pool, batcher, "float32")))
        finally:
            pool.close()

    return asyncio.run(main())


def test_concurrent_scores_share_calls_and_match_the_unbatched_scores(calls):
    registry, recorded = calls
    lm = registry.language_model("tiny-lm")
    recorded.clear()
    answers = run_concurrently(registry, 64, lambda s: [s.score(lm, [text], True, None) for text in SENTENCES])
    full_calls = [rows for graph, rows in recorded if graph == "full"]
    assert sum(full_calls) == len(SENTENCES) and len(full_calls) < len(SENTENCES)
    for text, (scores, precision) in zip(SENTENCES, answers, strict=True):
        (alone,) = lm.score_sentences([text])
        (batched,) = scores
        assert precision == "float32"
        assert batched.text == alone.text and batched.token_count == alone.token_count
        for (token, value), (token_alone, value_alone) in zip(batched.token_log_probs, alone.token_log_probs,
                                                              strict=True):
            assert token == token_alone and abs(value - value_alone) <= 1e-5


def test_concurrent_classifications_share_calls_and_match_the_unbatched_ones(calls):
    registry, recorded = calls
    classifier = registry.sentiment_model("tiny-sentiment")
    recorded.clear()
    answers = run_concurrently(registry, 64, lambda s: [s.classify(classifier, [text], None) for text in REVIEWS])
    assert len(recorded) < len(REVIEWS)
    for text, (results, _) in zip(REVIEWS, answers, strict=True):
        (alone,) = classifier.classify([text])
        for label, probability in results[0].probabilities.items():
            assert abs(probability - alone.probabilities[label]) <= 1e-5


def test_concurrent_next_word_steps_share_calls_and_match_the_unbatched_ones(tiny_store):
    recorded: list[tuple[str, int]] = []
    registry = ModelRegistry(tiny_store, threads=1, max_tokens=256, cache=PrefixStateCache(1 << 20),
                             observer=lambda name, version: lambda graph, seconds, rows: recorded.append((graph, rows)))
    registry.load_all()
    lm = registry.language_model("tiny-lm")
    reference = ModelRegistry(tiny_store, threads=1, max_tokens=256)
    reference.load_all()
    alone = reference.language_model("tiny-lm")
    recorded.clear()
    answers = run_concurrently(
        registry, 64, lambda s: [s.predict_next(lm, text, 100, True, None) for text in PREFIXES])
    assert {graph for graph, _ in recorded} == {"last"}
    assert max(rows for _, rows in recorded) > 1
    for text, (result, _) in zip(PREFIXES, answers, strict=True):
        expected = {w.word: w.log_prob for w in alone.next_word_distribution(text, 100, True).words}
        got = {w.word: w.log_prob for w in result.words}
        assert got.keys() == expected.keys()
        assert all(abs(got[word] - expected[word]) <= 1e-5 for word in got)


def test_a_group_never_exceeds_the_maximum_batch_size(calls):
    registry, recorded = calls
    lm = registry.language_model("tiny-lm")
    recorded.clear()
    run_concurrently(registry, 2, lambda s: [s.score(lm, ["the stock fell"], True, None) for _ in range(7)])
    assert sum(rows for _, rows in recorded) == 7
    assert max(rows for _, rows in recorded) <= 2


def test_a_lone_request_does_not_wait_and_runs_off_the_event_loop():
    async def main():
        pool = InferencePool(max_waiting=4)
        batcher = MicroBatcher(pool, max_size=32, max_wait=5.0, max_waiting=4)
        try:
            started = time.perf_counter()
            threads = await batcher.submit("key", [1, 2], lambda rows: [threading.current_thread().name] * len(rows))
            return threads, time.perf_counter() - started
        finally:
            pool.close()

    threads, seconds = asyncio.run(main())
    assert all(name.startswith("inference") for name in threads)
    assert seconds < 1.0  # far below the 5 s maximum wait


def test_too_many_waiting_requests_are_refused_by_the_batcher():
    async def main():
        pool = InferencePool(max_waiting=8)
        batcher = MicroBatcher(pool, max_size=32, max_wait=0.01, max_waiting=2)
        slow = lambda rows: time.sleep(0.2) or rows  # noqa: E731
        try:
            first = asyncio.ensure_future(batcher.submit("a", [1], slow))
            second = asyncio.ensure_future(batcher.submit("a", [2], slow))
            await asyncio.sleep(0.02)
            with pytest.raises(Overloaded):
                await batcher.submit("a", [3], slow)
            assert await first == [1] and await second == [2]
        finally:
            pool.close()

    asyncio.run(main())


def test_a_failing_group_fails_each_of_its_requests():
    def broken(rows):
        raise RuntimeError("onnxruntime failed")

    async def main():
        pool = InferencePool(max_waiting=8)
        batcher = MicroBatcher(pool, max_size=32, max_wait=0.01, max_waiting=8)
        try:
            return await asyncio.gather(*(batcher.submit("a", [i], broken) for i in range(3)), return_exceptions=True)
        finally:
            pool.close()

    assert all(isinstance(e, RuntimeError) for e in asyncio.run(main()))


def test_batching_can_be_turned_off_and_batch_sizes_are_in_metrics(tiny_store):
    for batching in (True, False):
        with TestClient(create_app(tiny_settings(tiny_store, batching=batching))) as client:
            wait_until_ready(client)
            assert (client.app.state.scheduler.batcher is None) is not batching
            answer = client.post("/score", json={"texts": ["the stock fell", "shares fell"]}).json()
            assert answer["precision"] == "float32" and len(answer["results"]) == 2
            metrics = client.get("/metrics").text
        assert 'lstm_serve_inference_batch_rows_bucket{graph="full",le="2.0",model="tiny-lm",version="1"}' in metrics
