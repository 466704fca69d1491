"""The prefix-state cache: a bounded LRU of LSTM states, and next-word answers that are the same
with it as without it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import scheduled, tiny_settings, wait_until_ready
from starlette.testclient import TestClient

from app.cache import ENTRY_OVERHEAD_BYTES, PrefixState, PrefixStateCache
from app.main import create_app

MODEL = ("tiny-lm", 1, 1, "float32")


def state(value: float, vocab: int = 10) -> PrefixState:
    return PrefixState(np.full((2, 4), value, np.float32), np.full((2, 4), value, np.float32),
                       np.full(vocab, value, np.float32))


def entry_bytes(ids: tuple[int, ...], vocab: int = 10) -> int:
    return state(0, vocab).nbytes + 8 * len(ids) + ENTRY_OVERHEAD_BYTES


def test_the_longest_cached_prefix_is_found():
    cache = PrefixStateCache(1 << 20)
    cache.put(MODEL, [0, 5], state(1))
    cache.put(MODEL, [0, 5, 6, 7], state(2))
    cache.put(MODEL, [0, 9], state(3))
    assert cache.longest_prefix(MODEL, [0, 5, 6, 7, 8])[0] == 4
    length, found = cache.longest_prefix(MODEL, [0, 5, 6])
    assert length == 2 and found is not None and found.h[0, 0] == 1
    assert cache.longest_prefix(MODEL, [0, 5, 6, 7])[1].h[0, 0] == 2  # exact
    assert cache.longest_prefix(MODEL, [1, 5]) == (0, None)
    assert cache.longest_prefix(("tiny-lm", 1, "int8"), [0, 5]) == (0, None)  # other precision
    assert cache.longest_prefix(("tiny-lm", 2, "float32"), [0, 5]) == (0, None)  # other version
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (3, 3, 3)


def test_least_recently_used_entries_are_evicted_to_stay_within_the_byte_bound():
    size = entry_bytes((0, 1))
    cache = PrefixStateCache(3 * size)
    for token in (1, 2, 3):
        cache.put(MODEL, [0, token], state(token))
    cache.longest_prefix(MODEL, [0, 1])  # 1 is now the most recently used
    cache.put(MODEL, [0, 4], state(4))
    assert cache.longest_prefix(MODEL, [0, 2]) == (0, None)
    assert cache.longest_prefix(MODEL, [0, 1])[0] == 2
    stats = cache.stats()
    assert (stats.evictions, stats.entries, stats.bytes) == (1, 3, 3 * size)
    assert stats.bytes <= cache.max_bytes


def test_a_zero_byte_cache_is_disabled():
    cache = PrefixStateCache(0)
    cache.put(MODEL, [0, 1], state(1))
    assert cache.longest_prefix(MODEL, [0, 1]) == (0, None)
    assert cache.stats().entries == 0


def distributions(models, texts: list[str], precision: str, cache_bytes: int,
                  split_last_word: bool = False) -> list[dict[str, float]]:
    """The next-word distributions after ``texts``, asked one after another of one scheduler (so
    each can find the ones before it in the cache)."""
    lm = models.registry.language_model("tiny-lm")
    results = []

    async def one_by_one(scheduler):
        for text in texts:
            result, _ = await scheduler.predict_next(lm, text, 100, True, precision)
            results.append({w.word: w.log_prob for w in result.words})

    scheduled(lambda scheduler: [one_by_one(scheduler)], cache_bytes=cache_bytes, split_last_word=split_last_word)
    return results


# Reading a prefix in two calls instead of one moves no answer, float32 or int8 (whose activation
# scales are fixed, not computed from the values in a call).
TOLERANCE = {"float32": 1e-5, "int8": 1e-5}


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_growing_prefixes_give_the_uncached_answer(models, precision):
    """With ``split_last_word`` (LSTM_SERVE_CACHE_SPLIT_LAST_WORD)."""
    words = "the company said it expects the stock fell in the market".split()
    texts = [" ".join(words[:n]) for n in range(len(words) + 1)]  # an autocomplete client: one more word each time
    texts += ["the company said it expects the stock fell in the market",  # exact hit
              "the company said it expects shares of the new year",  # a shorter prefix, several new tokens
              "the company said it will"]  # the prefix minus its last word is cached, another last word
    cached = distributions(models, texts, precision, cache_bytes=1 << 20, split_last_word=True)
    calls_cached = len(models.calls)
    uncached = distributions(models, texts, precision, cache_bytes=0, split_last_word=True)
    # Cached, each keystroke runs only its new word (15 calls); uncached, each prefix runs in two (29).
    assert calls_cached < 0.6 * (len(models.calls) - calls_cached)
    for text, got, expected in zip(texts, cached, uncached, strict=True):
        assert got.keys() == expected.keys()
        assert all(abs(got[w] - expected[w]) <= TOLERANCE[precision] for w in got), text


def test_a_prefix_extending_a_cached_one_runs_only_its_new_tokens(models):
    lm = models.registry.language_model("tiny-lm")
    calls = []

    async def keystrokes(scheduler):
        for text in ("the company said it", "the company said it expects", "the company said it expects"):
            await scheduler.predict_next(lm, text, 3, False, None)
            calls.append([(graph, rows) for graph, rows, _ in models.calls])
            models.calls.clear()

    scheduled(lambda scheduler: [keystrokes(scheduler)], cache_bytes=1 << 20)
    # Cold: the prefix in one call on the last-position graph; then only the new word; then nothing.
    assert calls == [[("last", 1)], [("last", 1)], []]
    calls.clear()
    scheduled(lambda scheduler: [keystrokes(scheduler)], cache_bytes=1 << 20, split_last_word=True)
    # Split: the prefix minus its last word, then the last word; then only the new word; then nothing.
    assert calls == [[("last", 1), ("last", 1)], [("last", 1)], []]


def test_cache_counters_are_in_metrics(tiny_store):
    with TestClient(create_app(tiny_settings(tiny_store, cache_bytes=1 << 20))) as client:
        wait_until_ready(client)
        for text in ("the", "the company", "the company said"):
            assert client.post("/predict-next", json={"text": text}).status_code == 200
        metrics = client.get("/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("lstm_serve_prefix_cache")}
    assert values["lstm_serve_prefix_cache_hits_total"] >= 2
    assert values["lstm_serve_prefix_cache_misses_total"] >= 1
    assert values["lstm_serve_prefix_cache_evictions_total"] == 0
    assert 0 < values["lstm_serve_prefix_cache_bytes"] <= 1 << 20
    assert values["lstm_serve_prefix_cache_max_bytes"] == 1 << 20


def test_by_default_a_new_prefix_is_one_call_and_extending_it_reads_only_the_new_words(models):
    texts = ["the company said it expects", "the company said it expects the stock", "the company said"]
    cached = distributions(models, texts, "float32", cache_bytes=1 << 20)
    # One call per request: the first reads 6 positions (<eos> and five words), the second only its 2 new
    # words, the third (a prefix of a cached prefix, never cached itself) its 4.
    assert len(models.calls) == 3
    models.calls.clear()
    uncached = distributions(models, texts, "float32", cache_bytes=0)
    assert len(models.calls) == 3
    for text, got, expected in zip(texts, cached, uncached, strict=True):
        assert got.keys() == expected.keys()
        assert all(abs(got[w] - expected[w]) <= TOLERANCE["float32"] for w in got), text
