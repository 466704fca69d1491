"""Scoring texts that share prefixes: the plan (segments, rounds, paths), that it reads every
target exactly where scoring each text alone would, and that /score computes less and answers the
same."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.prefix_trie import estimated_cost, plan_scoring
from tests.conftest import post, scheduled

START = 0


def run_plan_symbolically(plan) -> list[list[dict[int, tuple]]]:
    """What running the plan computes, with the model replaced by "the log-probability of t after
    prefix p" = (p, t): each segment's values from its parent's prefix and its own tokens."""
    prefixes: dict[int, tuple] = {}
    values: list[list[dict[int, tuple]]] = [[] for _ in plan.segments]
    for number, indices in enumerate(plan.rounds):
        for index in indices:
            segment = plan.segments[index]
            if segment.parent is not None:
                assert segment.parent in plan.rounds[number - 1], "a segment runs in the round after its parent"
                assert plan.segments[segment.parent].branches
            prefix = () if segment.parent is None else prefixes[segment.parent]
            for token, reads in zip(segment.tokens, segment.reads, strict=True):
                prefix = (*prefix, token)
                values[index].append({t: (prefix, t) for t in reads})
            prefixes[index] = prefix
    return values


texts = st.lists(st.lists(st.integers(1, 4), max_size=12), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(texts, st.booleans())
def test_every_target_is_read_after_exactly_its_own_prefix(targets, share):
    plan = plan_scoring(targets, START, share)
    assembled = plan.assemble(run_plan_symbolically(plan), targets)
    expected = [[((START, *target[:j]), target[j]) for j in range(len(target))] for target in targets]
    assert assembled == expected
    alone = sum(map(len, targets))
    assert plan.positions <= alone
    if not share:
        assert plan.positions == alone


def test_an_nbest_list_computes_its_common_beginning_once():
    common = list(range(1, 11))
    targets = [common + [20, 21, 22], common + [30, 21, 22], common + [20, 21, 23]]
    plan = plan_scoring(targets, START)
    # <eos> and the 10 common words once, then "20 21" (read by the first and third, whose last
    # words differ only as targets) and "30 21": 11 + 2 + 2 positions instead of 3 x 13.
    assert plan.positions == 15
    assert [len(r) for r in plan.rounds] == [1, 2]
    first = plan.segments[plan.rounds[0][0]]
    assert first.tokens == [START, *common] and first.branches and first.reads[-1] == [20, 30]


def test_texts_sharing_little_are_one_padded_call():
    targets = [[1, 2, 3, 4, 5, 6], [1, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17]]
    plan = plan_scoring(targets, START)
    # Sharing "<eos> 1" would cost a round trip and a call for two positions: not worth it.
    assert len(plan.rounds) == 1 and plan.positions == 18
    assert estimated_cost(plan) <= estimated_cost(plan_scoring(targets, START, share=False))


@settings(max_examples=200, deadline=None)
@given(texts)
def test_the_chosen_plan_never_costs_more_than_no_sharing(targets):
    assert estimated_cost(plan_scoring(targets, START)) <= estimated_cost(plan_scoring(targets, START, share=False))


NBEST = [
    "the company said it expects the stock market to fall",
    "the company said it expects the stock market to fell",
    "the company said it expects a stock market to fall",
    "the company said it expects the stock markets to fall",
    "the company said it expects the stock market",
    "the company said",
    "mr. company is chairman",
    "",
]


def test_nbest_scores_equal_scoring_each_text_alone(client):
    together = post(client, "/score", {"texts": NBEST, "rank": True})
    for text, result in zip(NBEST, together["results"], strict=True):
        (alone,) = post(client, "/score", {"text": text})["results"]
        assert [t["token"] for t in result["token_log_probs"]] == [t["token"] for t in alone["token_log_probs"]]
        for shared, single in zip(result["token_log_probs"], alone["token_log_probs"], strict=True):
            assert abs(shared["log_prob"] - single["log_prob"]) <= 1e-5
    totals = [r["total_log_prob"] for r in together["results"]]
    assert together["ranking"] == sorted(range(len(NBEST)), key=lambda i: (-totals[i], i))


def test_sharing_computes_fewer_positions_and_answers_the_same(models, monkeypatch):
    lm = models.registry.language_model(None)
    positions: list[int] = []
    score_segments = lm.score_segments

    def counting(precision, segments):
        positions.append(sum(len(segment.tokens) for segment in segments))
        return score_segments(precision, segments)

    monkeypatch.setattr(lm, "score_segments", counting)
    totals, computed = {}, {}
    for share in (True, False):
        positions.clear()

        def work(scheduler, share=share):
            scheduler.share_prefixes = share
            return [scheduler.score(lm, NBEST, True, None)]

        ((scores, _),) = scheduled(work)
        totals[share] = [score.total_log_prob for score in scores]
        computed[share] = sum(positions)
    # 63 positions one by one (each text's tokens and <eos>); 24 distinct prefixes, of which the
    # cheapest plan computes some twice rather than make more small calls.
    _, targets = lm.score_targets(NBEST, True)
    assert computed[False] == 63
    assert 24 <= computed[True] == plan_scoring(targets, lm.eos_id).positions < 63
    assert totals[True] == pytest.approx(totals[False], abs=1e-4)
