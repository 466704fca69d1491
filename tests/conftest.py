"""Shared fixtures: a tiny model store written by the real export code (untrained models, a few
dozen words), an app serving it through an in-process ASGI client, and a live uvicorn subprocess."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

# Starlette's TestClient warns that it will move to httpx2; the client works, so the warning is noise here.
warnings.filterwarnings("ignore", message=r"Using `httpx` with `starlette.testclient`", category=Warning)
from starlette.testclient import TestClient  # noqa: E402

from app.config import Settings  # noqa: E402
from app.main import create_app  # noqa: E402
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
