"""Shared fixtures: a tiny model store written by the real export code (untrained models, a few
dozen words), an app serving it through an in-process ASGI client, a live uvicorn subprocess, and
the store's models behind a scheduler with every onnxruntime call recorded."""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

# Starlette's TestClient warns that it will move to httpx2; the client works, so the warning is noise here.
warnings.filterwarnings("ignore", message=r"Using `httpx` with `starlette.testclient`", category=Warning)
from starlette.testclient import TestClient  # noqa: E402

from app.cache import PrefixStateCache  # noqa: E402
from app.config import Settings  # noqa: E402
from app.main import create_app  # noqa: E402
from app.registry import ModelRegistry  # noqa: E402
from app.scheduler import Admission, Scheduler  # noqa: E402
from bench.servers import running  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LM_WORDS = (
    "<eos> <unk> the company said it expects mr. is chairman stock fell N a of to and in 's market "
    "will has new year shares $ million"
).split()
SENTIMENT_WORDS = "<pad> <unk> a gorgeous , witty film dull and tedious it 's movie the . good bad".split()
LABELS = ["negative", "positive"]


def build_tiny_store(store: Path) -> Path:
    """``store/tiny-lm/1`` (2-layer LSTM, 16 units, tied) and ``store/tiny-sentiment/1``
    (1-layer biLSTM, 8 units), untrained, exported with the training code's own exporter."""
    import torch

    from app.text import Vocabulary
    from training.export import export_language_model, export_sentiment_model
    from training.model import LanguageModel, SentimentClassifier

    torch.manual_seed(0)
    lm_vocab = Vocabulary(LM_WORDS)
    lm = LanguageModel(len(lm_vocab), 16, 16, layers=2, dropout=0.0, tied=True, init_range=0.5)
    export_language_model(
        lm, lm_vocab, store, "tiny-lm", description="untrained 2x16 test model",
        architecture={"embedding_size": 16, "hidden_size": 16, "layers": 2, "tied": True, "dropout": 0.0},
        training={"dataset": "none: untrained test fixture"},
    )
    sentiment_vocab = Vocabulary(SENTIMENT_WORDS)
    classifier = SentimentClassifier(len(sentiment_vocab), 8, 8, layers=1, dropout=0.0, bidirectional=True,
                                     num_classes=len(LABELS), pad_id=sentiment_vocab.pad_id)
    export_sentiment_model(
        classifier, sentiment_vocab, LABELS, store, "tiny-sentiment", description="untrained 1x8 biLSTM test model",
        architecture={"embedding_size": 8, "hidden_size": 8, "layers": 1, "bidirectional": True},
        training={"dataset": "none: untrained test fixture"},
    )
    return store


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_store(tmp_path_factory.mktemp("store"))


def tiny_settings(store: Path, **overrides) -> Settings:
    return Settings(model_store=store, intra_op_threads=1, **overrides)


def wait_until_ready(client: TestClient | httpx.Client, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/health/ready").status_code == 200:
            return
        time.sleep(0.05)
    raise TimeoutError("the service did not become ready")


@pytest.fixture(scope="session")
def client(tiny_store: Path) -> Iterator[TestClient]:
    """The app over the tiny store, in process, models loaded."""
    with TestClient(create_app(tiny_settings(tiny_store)), raise_server_exceptions=False) as test_client:
        wait_until_ready(test_client)
        yield test_client


@pytest.fixture(scope="session")
def live_server(tiny_store: Path) -> Iterator[str]:
    """``python -m app`` on a free loopback port over the tiny store; yields its base URL."""
    with running("app", tiny_store, {"LSTM_SERVE_INTRA_OP_THREADS": "1"}, timeout=60) as server:
        yield server.base_url


def post(client: TestClient, path: str, body: dict) -> dict:
    """POST ``body`` as JSON and return the answer, which must be a 200."""
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


@dataclass
class RecordedModels:
    """The tiny store's models loaded in process; ``calls`` records every onnxruntime call after
    loading as (graph, rows, thread name)."""

    registry: ModelRegistry
    calls: list[tuple[str, int, str]]

    def rows(self, graph: str | None = None) -> list[int]:
        return [rows for name, rows, _ in self.calls if graph is None or name == graph]


@pytest.fixture
def models(tiny_store: Path) -> RecordedModels:
    calls: list[tuple[str, int, str]] = []

    def observer(name: str, version: int):
        return lambda graph, seconds, rows: calls.append((graph, rows, threading.current_thread().name))

    registry = ModelRegistry(tiny_store, threads=1, max_tokens=256, observer=observer)
    registry.load_all()
    calls.clear()
    return RecordedModels(registry, calls)


def scheduled(work: Callable[[Scheduler], list], *, batching: bool = True, max_size: int = 32,
              max_wait: float = 0.05, cache_bytes: int = 0, max_queue_wait: float = 60.0,
              timeout: float = 60.0, split_last_word: bool = False) -> list[Any]:
    """Start every request of ``work(scheduler)`` at once on a fresh scheduler and return their
    answers in order (an exception where a request failed)."""

    async def main() -> list[Any]:
        scheduler = Scheduler(Admission(max_queue_wait), PrefixStateCache(cache_bytes, split_last_word),
                              batching=batching,
                              max_size=max_size, max_wait=max_wait, timeout=timeout)
        try:
            return await asyncio.gather(*work(scheduler), return_exceptions=True)
        finally:
            scheduler.close()

    return asyncio.run(main())
