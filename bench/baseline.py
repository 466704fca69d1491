"""The naive baseline: the PyTorch models rebuilt from the exported ONNX graphs' weights, called
once per request (no batching, no cache) behind a minimal FastAPI app with the service's request
shapes. ``python -m bench.baseline`` serves it; ``LSTM_SERVE_MODEL_STORE``, ``BENCH_PORT`` and
``BENCH_THREADS`` configure it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
import torch
from fastapi import FastAPI
from onnx import numpy_helper

from app.manifest import FULL, PARITY_TOLERANCE, Manifest
from app.sessions import create_session
from app.text import Vocabulary, get_normaliser
from bench.reference import PredictNext, Texts, default_model
from training.model import LanguageModel, SentimentClassifier


def onnx_lstm_to_torch(w: np.ndarray, r: np.ndarray, b: np.ndarray) -> dict[str, torch.Tensor]:
    """An ONNX LSTM's W [1, 4H, in], R [1, 4H, H], B [1, 8H] (= Wb then Rb) as a one-layer
    ``nn.LSTM``'s parameters. ONNX orders the gates i, o, f, c; PyTorch i, f, g(=c), o."""

    def reorder(x: np.ndarray) -> torch.Tensor:
        i, o, f, c = np.split(x, 4, axis=0)
        return torch.from_numpy(np.concatenate([i, f, c, o], axis=0).copy())

    wb, rb = np.split(b[0], 2)
    return {"weight_ih_l0": reorder(w[0]), "weight_hh_l0": reorder(r[0]),
            "bias_ih_l0": reorder(wb), "bias_hh_l0": reorder(rb)}


def _graph_weights(path: Path) -> tuple[dict[str, np.ndarray], list[tuple[str, list[str]]]]:
    proto = onnx.load(str(path))  # external weights load from beside the graph
    arrays = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    lstms = [(node.name, list(node.input)) for node in proto.graph.node if node.op_type == "LSTM"]
    return arrays, lstms


def language_model_from_onnx(directory: Path, manifest: Manifest) -> LanguageModel:
    arrays, lstms = _graph_weights(directory / manifest.graphs[FULL].file)
    embedding = arrays["embedding.weight"]
    hidden = arrays[lstms[0][1][2]].shape[-1]
    tied = bool(manifest.architecture.get("tied", False))
    model = LanguageModel(embedding.shape[0], embedding.shape[1], hidden, len(lstms), dropout=0.0, tied=tied,
                          init_range=0.1)
    state = {"embedding.weight": torch.from_numpy(embedding.copy()), "decoder.bias": torch.from_numpy(
        arrays["decoder.bias"].copy())}
    if not tied:
        (matmul,) = [a for name, a in arrays.items() if name.startswith("onnx::MatMul")]
        state["decoder.weight"] = torch.from_numpy(matmul.T.copy())
    for layer, (_, inputs) in enumerate(lstms):
        for key, value in onnx_lstm_to_torch(*(arrays[name] for name in inputs[1:4])).items():
            state[f"lstm.{key.removesuffix('_l0')}_l{layer}"] = value
    if tied:
        state["decoder.weight"] = state["embedding.weight"]
    model.load_state_dict(state)
    return model.eval()


def sentiment_model_from_onnx(directory: Path, manifest: Manifest) -> SentimentClassifier:
    arrays, lstms = _graph_weights(directory / manifest.graphs[FULL].file)
    embedding = arrays["embedding.weight"]
    layers = {}
    for name, inputs in lstms:
        found = re.search(r"(forward|backward)_layers\.(\d+)", name)
        if found is None:
            raise ValueError(f"cannot tell which layer LSTM node {name!r} is")
        layers[(found.group(1), int(found.group(2)))] = inputs
    hidden = arrays[lstms[0][1][2]].shape[-1]
    count = 1 + max(index for _, index in layers)
    bidirectional = any(direction == "backward" for direction, _ in layers)
    pad_id = manifest.tokenizer.special_tokens["pad"].id  # type: ignore[union-attr]
    model = SentimentClassifier(embedding.shape[0], embedding.shape[1], hidden, count, dropout=0.0,
                                bidirectional=bidirectional, num_classes=arrays["classifier.bias"].shape[0],
                                pad_id=pad_id)
    state = {"embedding.weight": embedding, "classifier.weight": arrays["classifier.weight"],
             "classifier.bias": arrays["classifier.bias"]}
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    for (direction, index), inputs in layers.items():
        for key, value in onnx_lstm_to_torch(*(arrays[name] for name in inputs[1:4])).items():
            tensors[f"{direction}_layers.{index}.{key}"] = value
    model.load_state_dict(tensors)
    return model.eval()


def check_parity(directory: Path, manifest: Manifest, model: torch.nn.Module) -> float:
    """Largest absolute difference between the rebuilt PyTorch model and the ONNX graph on a few
    random inputs; raises when it exceeds ``PARITY_TOLERANCE``."""
    session = create_session(directory / manifest.graphs[FULL].file)
    rng = np.random.default_rng(0)
    vocab = manifest.tokenizer.vocab_size
    worst = 0.0
    for batch, seq in ((1, 1), (2, 9), (3, 17)):
        tokens = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
        if isinstance(model, LanguageModel):
            zeros = np.zeros((model.layers, batch, model.hidden_size), np.float32)
            feeds = {"tokens": tokens, "h0": zeros, "c0": zeros}
        else:
            feeds = {"tokens": tokens, "lengths": np.full(batch, seq, dtype=np.int64)}
        expected = session.run(None, feeds)
        with torch.inference_mode():
            actual = model(*(torch.from_numpy(v) for v in feeds.values()))
        actual = actual if isinstance(actual, tuple) else (actual,)
        worst = max(worst, *(float(np.abs(e - a.numpy()).max()) for e, a in zip(expected, actual, strict=True)))
    if not worst <= PARITY_TOLERANCE:
        raise ValueError(f"{manifest.name}: PyTorch rebuilt from ONNX differs by {worst:.2e}")
    return worst


def create_baseline_app(store: Path) -> FastAPI:
    """The service's default language and sentiment models of ``store``, in PyTorch, answering
    /predict-next, /score and /sentiment one request at a time."""
    lm_dir, lm_manifest = default_model(store, "language-model")
    lm = language_model_from_onnx(lm_dir, lm_manifest)
    check_parity(lm_dir, lm_manifest, lm)
    lm_vocab = Vocabulary.load(lm_dir / lm_manifest.tokenizer.vocab_file)
    lm_normalise = get_normaliser(lm_manifest.tokenizer.normaliser)
    sentiment_dir, sentiment_manifest = default_model(store, "sentiment")
    classifier = sentiment_model_from_onnx(sentiment_dir, sentiment_manifest)
    check_parity(sentiment_dir, sentiment_manifest, classifier)
    sentiment_vocab = Vocabulary.load(sentiment_dir / sentiment_manifest.tokenizer.vocab_file)
    sentiment_normalise = get_normaliser(sentiment_manifest.tokenizer.normaliser)
    labels = sentiment_manifest.labels or []
    eos = lm_vocab.eos_id

    app = FastAPI()

    @app.get("/health/ready")
    def ready() -> dict:
        return {"status": "ready"}

    @app.post("/predict-next")
    def predict_next(body: PredictNext) -> dict:
        ids = [eos, *lm_vocab.encode(lm_normalise(body.text))]
        with torch.inference_mode():
            log_probs, _, _ = lm(torch.tensor([ids]), *lm.initial_state(1))
        values, indices = log_probs[0, -1].topk(body.top_k)
        return {"predictions": [{"word": lm_vocab.tokens[i], "log_prob": float(v)}
                                for v, i in zip(values.tolist(), indices.tolist(), strict=True)]}

    @app.post("/score")
    def score(body: Texts) -> dict:
        results = []
        for text in [body.text] if body.texts is None else body.texts:
            targets = [*lm_vocab.encode(lm_normalise(text or "")), eos]
            with torch.inference_mode():
                log_probs, _, _ = lm(torch.tensor([[eos, *targets[:-1]]]), *lm.initial_state(1))
            values = log_probs[0, torch.arange(len(targets)), torch.tensor(targets)].tolist()
            results.append({"total_log_prob": sum(values), "token_count": len(values)})
        return {"results": results}

    @app.post("/sentiment")
    def sentiment(body: Texts) -> dict:
        results = []
        for text in [body.text] if body.texts is None else body.texts:
            ids = sentiment_vocab.encode(sentiment_normalise(text or "")) or [sentiment_vocab.unk_id]
            with torch.inference_mode():
                probs = classifier(torch.tensor([ids]), torch.tensor([len(ids)]))[0].tolist()
            results.append({"label": labels[int(np.argmax(probs))], "probabilities": dict(zip(labels, probs,
                                                                                              strict=True))})
        return {"results": results}

    return app


def main() -> None:
    import uvicorn

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    app = create_baseline_app(Path(os.environ.get("LSTM_SERVE_MODEL_STORE", "model_store")))
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["BENCH_PORT"]), log_level="warning")


if __name__ == "__main__":
    main()
