"""Overload, end to end on loopback: at ten times the concurrency that saturates the service, only
200 and 429 come back and the service recovers at once. How long admitted requests wait is pinned
in process (tests/test_scheduler.py), where the load generator does not compete with the service for
the two CPUs; `python -m bench --faults` measures it end to end on the shipped models."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import httpx
import pytest

from app.server import MAX_RETRY_HOLD
from bench.load import python_load
from bench.servers import running

BOUND_MS = 100
CLIENTS = 160  # ten times the 16 that saturate this model here
WORDS = [f"w{i}" for i in range(3000)]


@pytest.fixture(scope="module")
def slower_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A language model big enough (3,002 words, 2 x 128 units) that onnxruntime, not HTTP, is what
    saturates the service, so admission has something to measure."""
    import torch

    from app.text import EOS, UNK, Vocabulary
    from training.export import export_language_model
    from training.model import LanguageModel

    torch.manual_seed(0)
    vocab = Vocabulary([EOS, UNK, *WORDS])
    model = LanguageModel(len(vocab), 128, 128, layers=2, dropout=0.0, tied=True, init_range=0.1)
    store = tmp_path_factory.mktemp("slower")
    export_language_model(model, vocab, store, "slower-lm", normaliser="whitespace",
                          architecture={"layers": 2, "hidden_size": 128}, training={"data": "none: test fixture"})
    return store


def body(rng: random.Random) -> bytes:
    return json.dumps({"texts": [" ".join(rng.choices(WORDS, k=24)) for _ in range(8)]}).encode()


def test_a_flood_gets_only_200_and_429_and_the_service_recovers(slower_store):
    env = {"LSTM_SERVE_MAX_QUEUE_WAIT_MS": str(BOUND_MS), "LSTM_SERVE_INTRA_OP_THREADS": "1",
           "LSTM_SERVE_LOG_LEVEL": "error"}
    with running("app", slower_store, env, timeout=60) as server:
        alone = asyncio.run(python_load(server.base_url, "/score", body, 1, 1.0))
        flood = asyncio.run(python_load(server.base_url, "/score", body, CLIENTS, 3.0))
        after = asyncio.run(python_load(server.base_url, "/score", body, 1, 1.0))
        metrics = httpx.get(f"{server.base_url}/metrics").text
    assert set(alone.statuses) == {"200"} and set(after.statuses) == {"200"}
    assert set(flood.statuses) == {"200", "429"}, flood.statuses  # no 5xx, no reset connection
    # A connection refused with Retry-After is not read again for (at most) a second: clients that
    # retry at once cannot turn the flood into thousands of refusals a second.
    assert flood.statuses["429"] <= CLIENTS * (3.0 / MAX_RETRY_HOLD + 1), flood.statuses
    # Once the flood is over, requests are served as before it (nothing was left queued).
    assert after.p50_ms < 5 * alone.p50_ms, (alone, after)
    assert 'lstm_serve_http_requests_total{endpoint="/score",method="POST",status="429"}' in metrics
