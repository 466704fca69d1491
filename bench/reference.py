"""The plain reference: the FastAPI + onnxruntime server most people would write for these models —
sync endpoints (FastAPI runs them on its thread pool), one ``InferenceSession`` per graph with
onnxruntime's default options, one call per request, no batching, no cache — with the service's
tokenizer, request shapes and response fields. ``python -m bench.reference`` serves it;
``LSTM_SERVE_MODEL_STORE`` and ``BENCH_PORT`` configure it.

It is what every speed figure of the service is set against (``python -m bench``): the service's
batching, prefix cache, admission and threading have to earn their keep over this."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel

from app.manifest import FULL, LAST, Manifest, load_manifest
from app.registry import PREFERRED_MODELS
from app.store import discover
from app.text import Vocabulary, get_normaliser


class PredictNext(BaseModel):
    """The request shapes of the benchmark's plain servers (this one and ``bench.baseline``)."""

    text: str = ""
    top_k: int = 5


class Texts(BaseModel):
    text: str | None = None
    texts: list[str] | None = None


def default_model(store: Path, task: str) -> tuple[Path, Manifest]:
    """The model the service answers ``task`` with when a request names none: the highest version of
    the task's preferred name where ``store`` has it, else of the first name."""
    found: dict[str, tuple[Path, Manifest]] = {}
    for version in discover(store):
        manifest = load_manifest(version.path)
        if manifest.task == task and (version.name not in found or manifest.version > found[version.name][1].version):
            found[version.name] = (version.path, manifest)
    if not found:
        raise ValueError(f"{store} holds no {task} model")
    preferred = PREFERRED_MODELS.get(task)
    return found[preferred if preferred in found else sorted(found)[0]]


def _session(directory: Path, manifest: Manifest, graph: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(directory / manifest.graphs[graph].file), providers=["CPUExecutionProvider"])


def create_reference_app(store: Path) -> FastAPI:
    lm_dir, lm_manifest = default_model(store, "language-model")
    lm_vocab = Vocabulary.load(lm_dir / lm_manifest.tokenizer.vocab_file)
    lm_normalise = get_normaliser(lm_manifest.tokenizer.normaliser)
    full = _session(lm_dir, lm_manifest, FULL)
    last = _session(lm_dir, lm_manifest, LAST) if LAST in lm_manifest.graphs else full
    layers, hidden = (int(lm_manifest.architecture[k]) for k in ("layers", "hidden_size"))
    eos = lm_vocab.eos_id

    sentiment_dir, sentiment_manifest = default_model(store, "sentiment")
    classifier = _session(sentiment_dir, sentiment_manifest, FULL)
    sentiment_vocab = Vocabulary.load(sentiment_dir / sentiment_manifest.tokenizer.vocab_file)
    sentiment_normalise = get_normaliser(sentiment_manifest.tokenizer.normaliser)
    labels = sentiment_manifest.labels or []

    def run_lm(session: ort.InferenceSession, ids: list[int]) -> np.ndarray:
        zeros = np.zeros((layers, 1, hidden), np.float32)
        return session.run(None, {"tokens": np.array([ids], np.int64), "h0": zeros, "c0": zeros})[0][0]

    app = FastAPI()

    @app.get("/health/ready")
    def ready() -> dict:
        return {"status": "ready"}

    @app.post("/predict-next")
    def predict_next(body: PredictNext) -> dict:
        tokens = lm_normalise(body.text)
        log_probs = run_lm(last, [eos, *lm_vocab.encode(tokens)])
        log_probs = log_probs if log_probs.ndim == 1 else log_probs[-1]
        best = np.argsort(-log_probs)[: body.top_k]
        return {"tokens": tokens, "predictions": [
            {"word": lm_vocab.tokens[i], "probability": math.exp(float(log_probs[i])), "log_prob": float(log_probs[i])}
            for i in best]}

    @app.post("/score")
    def score(body: Texts) -> dict:
        results = []
        for index, text in enumerate([body.text] if body.texts is None else body.texts):
            tokens = lm_normalise(text or "")
            targets = [*lm_vocab.encode(tokens), eos]
            log_probs = run_lm(full, [eos, *targets[:-1]])
            values = [float(v) for v in log_probs[np.arange(len(targets)), targets]]
            total = sum(values)
            results.append({"index": index, "tokens": tokens, "token_log_probs": [
                {"token": lm_vocab.tokens[t], "log_prob": v} for t, v in zip(targets, values, strict=True)],
                "total_log_prob": total, "token_count": len(values), "perplexity": math.exp(-total / len(values))})
        return {"results": results}

    @app.post("/sentiment")
    def sentiment(body: Texts) -> dict:
        results = []
        for index, text in enumerate([body.text] if body.texts is None else body.texts):
            tokens = sentiment_normalise(text or "")
            ids = sentiment_vocab.encode(tokens) or [sentiment_vocab.unk_id]
            probs = classifier.run(None, {"tokens": np.array([ids], np.int64),
                                          "lengths": np.array([len(ids)], np.int64)})[0][0]
            results.append({"index": index, "label": labels[int(np.argmax(probs))],
                            "probabilities": dict(zip(labels, (float(p) for p in probs), strict=True)),
                            "tokens": tokens})
        return {"results": results}

    return app


def main() -> None:
    import uvicorn

    app = create_reference_app(Path(os.environ.get("LSTM_SERVE_MODEL_STORE", "model_store")))
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["BENCH_PORT"]), log_level="warning")


if __name__ == "__main__":
    main()
