"""Figures measured on an exported model-store version with onnxruntime, so the numbers in a
manifest are the numbers the service will reproduce."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.text import Vocabulary
from training.data import DataError, pad_batch, read_labelled, read_lm_corpus

LM_EVAL_WINDOW = 35


def onnx_session(path: Path) -> ort.InferenceSession:
    """A CPU onnxruntime session over ``path`` (its external weights load from beside it)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _load(version_dir: Path, graph: str = "full") -> tuple[dict, Vocabulary, ort.InferenceSession]:
    manifest_path = version_dir / "manifest.json"
    if not manifest_path.exists():
        raise DataError(f"not a model-store version (no manifest.json): {version_dir}")
    manifest = json.loads(manifest_path.read_text())
    vocab = Vocabulary.load(version_dir / manifest["tokenizer"]["vocab_file"])
    if graph not in manifest["graphs"]:
        raise DataError(f"{version_dir} has no {graph!r} graph; it has {', '.join(manifest['graphs'])}")
    session = onnx_session(version_dir / manifest["graphs"][graph]["file"])
    return manifest, vocab, session


def lm_perplexity(version_dir: Path, path: Path, graph: str = "full") -> dict:
    """Perplexity of a pre-tokenized corpus (one sentence per line, ``<eos>`` after each),
    read as one stream with batch 1 and the state carried across windows: the test
    convention of Zaremba et al."""
    manifest, vocab, session = _load(version_dir, graph)
    if manifest["task"] != "language-model":
        raise DataError(f"{version_dir} is a {manifest['task']} model, not a language model")
    ids = [i for sentence in read_lm_corpus(path) for i in (*vocab.encode(sentence), vocab.eos_id)]
    stream = np.array([[vocab.eos_id, *ids]], dtype=np.int64)
    shape = manifest["graphs"]["full"]["inputs"]["h0"]["shape"]
    h = c = np.zeros((shape[0], 1, shape[2]), dtype=np.float32)
    total = 0.0
    for start in range(0, stream.shape[1] - 1, LM_EVAL_WINDOW):
        inputs = stream[:, start : start + LM_EVAL_WINDOW]
        targets = stream[0, start + 1 : start + 1 + inputs.shape[1]]
        inputs = inputs[:, : targets.size]
        log_probs, h, c = session.run(None, {"tokens": inputs, "h0": h, "c0": c})
        total -= float(log_probs[0, np.arange(targets.size), targets].sum())
    tokens = stream.shape[1] - 1
    return {"perplexity": round(math.exp(total / tokens), 3), "tokens": tokens, "file": path.name, "graph": graph}


def sentiment_accuracy(version_dir: Path, path: Path, graph: str = "full") -> dict:
    """Accuracy on an ``stsa.*``-style file (``<label> <tokenized sentence>`` per line)."""
    manifest, vocab, session = _load(version_dir, graph)
    if manifest["task"] != "sentiment":
        raise DataError(f"{version_dir} is a {manifest['task']} model, not a sentiment model")
    examples = read_labelled(path, len(manifest["labels"]))
    correct = 0
    for start in range(0, len(examples), 128):
        chunk = examples[start : start + 128]
        tokens, lengths = pad_batch([vocab.encode(e.tokens) for e in chunk], vocab.pad_id)
        (probs,) = session.run(None, {"tokens": tokens.numpy(), "lengths": lengths.numpy()})
        correct += int((probs.argmax(-1) == np.array([e.label for e in chunk])).sum())
    return {"accuracy": round(correct / len(examples), 4), "examples": len(examples), "file": path.name,
            "graph": graph}


def evaluate_version(version_dir: Path, path: Path, graph: str = "full") -> dict:
    """Perplexity or accuracy, by the version's task."""
    manifest, _, _ = _load(version_dir, graph)
    if manifest["task"] == "language-model":
        return lm_perplexity(version_dir, path, graph)
    return sentiment_accuracy(version_dir, path, graph)
