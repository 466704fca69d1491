"""POST /generate: sampling options, reproducibility, streaming, stop conditions, errors, and the
steps it runs (one per token, shared between samples); the sampling function on its own."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import numpy as np
import pytest

from app.sampling import GeneratedToken, Sampling, choose_token, sample_generator
from app.scheduler import Prompt
from tests.conftest import post, scheduled

BODY = {"text": "the company said", "max_tokens": 12, "temperature": 1.5, "seed": 11, "n": 3}


def events(stream_text: str) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event."""
    found = re.findall(r"event: (\w+)\ndata: (.*)\n\n", stream_text)
    return [(name, json.loads(data)) for name, data in found]


def test_the_same_seed_writes_the_same_tokens(client):
    first, second = post(client, "/generate", BODY), post(client, "/generate", BODY)
    assert first == second
    assert first["seed"] == 11 and len(first["samples"]) == 3
    other = post(client, "/generate", {**BODY, "seed": 12})
    assert other["samples"] != first["samples"]


def test_streaming_sends_the_same_tokens_as_one_answer(client):
    whole = post(client, "/generate", BODY)
    response = client.post("/generate", json={**BODY, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    received = events(response.text)
    assert received[-1] == ("done", whole)
    tokens = [[] for _ in range(3)]
    for name, data in received[:-1]:
        assert name == "token"
        tokens[data["index"]].append(data["token"])
    assert tokens == [sample["tokens"] for sample in whole["samples"]]
    # Accept: text/event-stream asks for the same.
    by_header = client.post("/generate", json=BODY, headers={"Accept": "text/event-stream"})
    assert events(by_header.text) == received


def test_a_random_seed_is_returned_and_reproduces_the_text(client):
    body = {key: value for key, value in BODY.items() if key != "seed"}
    first = post(client, "/generate", body)
    assert post(client, "/generate", {**body, "seed": first["seed"]})["samples"] == first["samples"]


def test_unk_is_never_written_unless_allowed(client):
    body = {"text": "", "max_tokens": 60, "temperature": 5.0, "n": 8, "seed": 3}
    written = [t for s in post(client, "/generate", body)["samples"] for t in s["tokens"]]
    assert len(written) > 100 and "<unk>" not in written and "<pad>" not in written
    allowed = [t for s in post(client, "/generate", {**body, "allow_unk": True})["samples"] for t in s["tokens"]]
    assert "<unk>" in allowed


def test_temperature_zero_takes_the_most_probable_word(client):
    ranked = post(client, "/predict-next", {"text": "the company", "top_k": 3, "include_special": True})
    best = next(p for p in ranked["predictions"] if p["word"] != "<unk>")
    (sample,) = post(client, "/generate", {"text": "the company", "temperature": 0, "max_tokens": 5})["samples"]
    if best["word"] == "<eos>":
        assert sample["tokens"] == [] and sample["finish_reason"] == "eos"
    else:
        assert sample["tokens"][0] == best["word"]
        assert sample["log_probs"][0] == pytest.approx(best["log_prob"], abs=1e-5)


def test_log_probs_are_the_models_not_the_tempered_ones(client):
    (sample,) = post(client, "/generate", {"text": "the", "max_tokens": 6, "temperature": 3.0, "seed": 5})["samples"]
    if not sample["tokens"]:
        pytest.skip("the sample ended at once")
    scored = post(client, "/score", {"text": "the " + " ".join(sample["tokens"]), "count_eos": False})
    scores = [t["log_prob"] for t in scored["results"][0]["token_log_probs"]][1:]
    assert sample["log_probs"] == pytest.approx(scores, abs=1e-4)


def test_a_stop_word_ends_the_sample_without_being_written(client):
    body = {"text": "the", "max_tokens": 30, "temperature": 1.0, "seed": 2}
    (free,) = post(client, "/generate", body)["samples"]
    assert len(free["tokens"]) >= 3, "pick another seed: this sample is too short for the test"
    word = free["tokens"][2]
    (stopped,) = post(client, "/generate", {**body, "stop": [word.upper() if word.isalpha() else word]})["samples"]
    cut = free["tokens"].index(word)
    assert stopped["tokens"] == free["tokens"][:cut]
    assert stopped["finish_reason"] == "stop"


def test_finish_reasons_match_the_lengths(client):
    samples = post(client, "/generate", {"text": "the", "max_tokens": 4, "temperature": 2.0, "n": 8, "seed": 9})[
        "samples"]
    assert [s["index"] for s in samples] == list(range(8))
    for sample in samples:
        assert len(sample["tokens"]) == len(sample["log_probs"]) <= 4
        assert sample["text"] == " ".join(sample["tokens"])
        assert (sample["finish_reason"] == "length") == (len(sample["tokens"]) == 4)
    assert "length" in {s["finish_reason"] for s in samples}


@pytest.mark.parametrize("body, code", [
    ({"max_tokens": 0}, "validation_error"),
    ({"max_tokens": 201}, "validation_error"),
    ({"n": 9}, "validation_error"),
    ({"top_p": 0}, "validation_error"),
    ({"temperature": -1}, "validation_error"),
    ({"top_k": None}, "validation_error"),
    ({"seed": 2**53}, "validation_error"),  # past what a JavaScript client can hold exactly
    ({"stop": ["not-a-word-of-the-vocabulary"]}, "invalid_stop_word"),
    ({"stop": ["the company"]}, "invalid_stop_word"),
    ({"model": "tiny-sentiment"}, "wrong_task"),
])
def test_bad_generation_requests_are_refused_in_the_envelope(client, body, code):
    response = client.post("/generate", json={"text": "the", **body})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == code


def test_samples_step_together_one_token_per_call(models):
    lm = models.registry.language_model(None)

    async def collect(scheduler):
        found = []
        async for event in scheduler.generate(lm, "the company", Sampling(temperature=0.0), 5, 4, 0, [], False,
                                              None):
            found.append(event)
        return found

    (found,) = scheduled(lambda scheduler: [collect(scheduler)])
    assert isinstance(found[0], Prompt) and found[0].context.tokens == ["the", "company"]
    steps = models.rows("last")
    # The prompt is one call, then one call per token for every sample still writing (none for the
    # last token): greedy samples are identical, so all four step together.
    tokens = sum(isinstance(event, GeneratedToken) for event in found) // 4
    assert steps == [1] + [4] * min(tokens, 4), steps


def test_closing_the_generator_stops_its_steps(models):
    lm = models.registry.language_model(None)
    seen = {}

    async def first_token_then_close(scheduler):
        generation = scheduler.generate(lm, "the", Sampling(temperature=0.0), 200, 2, 0, [], False, None)
        async for event in generation:
            if not isinstance(event, Prompt):
                break
        await generation.aclose()
        seen["calls"], seen["outstanding"] = len(models.calls), scheduler.admission.outstanding
        await asyncio.sleep(0.2)
        return len(models.calls)

    (calls_later,) = scheduled(lambda scheduler: [first_token_then_close(scheduler)])
    assert seen["outstanding"] == 0
    assert seen["calls"] == calls_later <= 2


def test_a_client_that_closes_the_stream_stops_the_generation(live_server):
    body = {"text": "the", "max_tokens": 200, "temperature": 0}
    (whole,) = httpx.post(f"{live_server}/generate", json=body).json()["samples"]
    if whole["finish_reason"] != "length":
        pytest.skip("the tiny model's greedy continuation ends early; nothing long to interrupt")
    before = _step_calls(httpx.get(f"{live_server}/metrics").text)
    with httpx.Client(timeout=10) as client, \
            client.stream("POST", f"{live_server}/generate", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        next(line for line in response.iter_lines() if line.startswith("data:"))
    time.sleep(0.5)
    after = _step_calls(httpx.get(f"{live_server}/metrics").text)
    time.sleep(0.3)
    assert _step_calls(httpx.get(f"{live_server}/metrics").text) == after
    assert after - before < 200, "the generation ran to the end after its client had gone"


def _step_calls(metrics: str) -> float:
    """onnxruntime calls of the last-position graph so far, from /metrics."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("lstm_serve_inference_duration_seconds_count") and 'graph="last"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_temperature_zero_is_the_argmax_and_bans_hold():
    log_probs = np.log(np.array([0.1, 0.5, 0.3, 0.1]))
    rng = sample_generator(0, 0)
    assert choose_token(log_probs, Sampling(temperature=0), [], rng) == 1
    assert choose_token(log_probs, Sampling(temperature=0), [1], rng) == 2


def test_top_k_and_top_p_cut_the_distribution():
    log_probs = np.log(np.array([0.05, 0.5, 0.3, 0.15]))
    rng = sample_generator(1, 0)
    top2 = {choose_token(log_probs, Sampling(temperature=1.0, top_k=2), [], rng) for _ in range(300)}
    assert top2 == {1, 2}
    # 0.5 + 0.3 reaches 0.7: the nucleus is {1, 2}.
    nucleus = {choose_token(log_probs, Sampling(temperature=1.0, top_p=0.7), [], rng) for _ in range(300)}
    assert nucleus == {1, 2}
    everything = {choose_token(log_probs, Sampling(temperature=1.0), [], rng) for _ in range(2000)}
    assert everything == {0, 1, 2, 3}


def test_temperature_flattens_and_sharpens():
    log_probs = np.log(np.array([0.9, 0.1]))
    draws = {t: [choose_token(log_probs, Sampling(temperature=t), [], sample_generator(4, i)) for i in range(2000)]
             for t in (0.5, 1.0, 3.0)}
    share = {t: draws[t].count(1) / 2000 for t in draws}
    assert share[0.5] < share[1.0] < share[3.0]
    assert share[1.0] == pytest.approx(0.1, abs=0.03)
