"""/predict-next with complete_last_word: the word being typed is completed from the distribution
after the words before it, whose state the prefix cache already holds."""

from __future__ import annotations

import math

import pytest

from app.text import Vocabulary
from tests.conftest import LM_WORDS, post, scheduled


def test_vocabulary_finds_words_by_prefix_without_special_tokens():
    vocab = Vocabulary(LM_WORDS)
    assert vocab.decode(vocab.ids_with_prefix("s")) == ["said", "shares", "stock"]
    assert vocab.decode(vocab.ids_with_prefix("stoc")) == ["stock"]
    assert vocab.ids_with_prefix("<") == [] and vocab.ids_with_prefix("") == []
    assert vocab.ids_with_prefix("zzz") == []


def test_the_word_being_typed_is_completed_from_the_words_before_it(client):
    answer = post(client, "/predict-next", {"text": "The company S", "top_k": 2, "complete_last_word": True})
    assert answer["tokens"] == ["the", "company"]
    assert answer["completion"]["prefix"] == "s" and answer["completion"]["matches"] == 3
    assert [p["word"][0] for p in answer["predictions"]] == ["s", "s"]
    # The same numbers as the next-word distribution after "the company".
    ranked = post(client, "/predict-next", {"text": "the company", "top_k": 100, "include_special": True})
    probabilities = {p["word"]: p["probability"] for p in ranked["predictions"]}
    expected = sorted((w for w in probabilities if w.startswith("s")), key=lambda w: -probabilities[w])
    assert [p["word"] for p in answer["predictions"]] == expected[:2]
    for p in answer["predictions"]:
        assert p["probability"] == pytest.approx(probabilities[p["word"]], rel=1e-5)
        assert p["log_prob"] == pytest.approx(math.log(p["probability"]), abs=1e-6)
    coverage = sum(probabilities[w] for w in expected)
    assert answer["completion"]["coverage"] == pytest.approx(coverage, rel=1e-5)


@pytest.mark.parametrize("text", ["the company ", "the company said,", "", "   "])
def test_a_finished_word_gets_next_words(client, text):
    completed = post(client, "/predict-next", {"text": text, "top_k": 3, "complete_last_word": True})
    plain = post(client, "/predict-next", {"text": text, "top_k": 3})
    assert completed["completion"] is None
    assert completed == plain


def test_a_prefix_no_word_starts_with_gets_no_predictions(client):
    answer = post(client, "/predict-next", {"text": "the xq", "complete_last_word": True})
    assert answer["predictions"] == []
    assert answer["completion"] == {"prefix": "xq", "matches": 0, "coverage": 0.0}


def test_the_partial_word_is_normalised_like_any_word(client):
    # PTB conventions: a number being typed is the number token N.
    answer = post(client, "/predict-next", {"text": "the company said 19", "complete_last_word": True})
    assert answer["completion"]["prefix"] == "N"
    assert [p["word"] for p in answer["predictions"]] == ["N"]


def test_completing_after_a_cached_prefix_runs_no_model_call(models):
    lm = models.registry.language_model(None)

    async def type_along(scheduler):
        await scheduler.predict_next(lm, "the company ", 5, False, None)
        calls = len(models.calls)
        for typed in ("the company s", "the company sa", "the company sai"):
            result, _ = await scheduler.predict_next(lm, typed, 5, False, None, complete_last_word=True)
            assert result.completion is not None and "said" in [w.word for w in result.words]
        return len(models.calls) - calls

    assert scheduled(lambda scheduler: [type_along(scheduler)], cache_bytes=1 << 20) == [0]
