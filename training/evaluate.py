"""Figures measured on an exported model-store version with onnxruntime, so the numbers in a
manifest are the numbers the service will reproduce."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.manifest import FULL, Manifest, ManifestError, load_manifest
from app.sessions import create_session
from app.text import Vocabulary
from training.data import DataError, pad_batch, read_labelled, read_lm_corpus

LM_EVAL_WINDOW = 35


def read_version(version_dir: Path) -> Manifest:
    """The validated manifest of a model-store version; a DataError if it is missing or invalid."""
    try:
        return load_manifest(version_dir)
    except ManifestError as e:
        raise DataError(f"not a model-store version ({e}): {version_dir}") from None


def read_vocabulary(version_dir: Path, manifest: Manifest) -> Vocabulary:
    """A version's vocabulary; a DataError naming the file when it cannot be read."""
    try:
        return Vocabulary.load(version_dir / manifest.tokenizer.vocab_file)
    except (OSError, ValueError) as e:
        raise DataError(f"{version_dir}: cannot read {manifest.tokenizer.vocab_file} ({e})") from None


def _session(version_dir: Path, manifest: Manifest, graph: str) -> ort.InferenceSession:
    if graph not in manifest.graphs:
        raise DataError(f"{version_dir} has no {graph!r} graph; it has {', '.join(manifest.graphs)}")
    return create_session(version_dir / manifest.graphs[graph].file)


def _perplexity(version_dir: Path, manifest: Manifest, path: Path, graph: str, compare_to: str | None = None) -> dict:
    """Perplexity of a pre-tokenized corpus (one sentence per line, ``<eos>`` after each),
    read as one stream with batch 1 and the state carried across windows: the test
    convention of Zaremba et al. With ``compare_to`` (another graph of the version, e.g. the float
    graph for an int8 one), also how often the two agree on the next word: the same most likely word
    (``top1_agreement``) and the share of their five most likely words in common (``top5_agreement``),
    over every position, each graph carrying its own state."""
    vocab = read_vocabulary(version_dir, manifest)
    sessions = [_session(version_dir, manifest, g) for g in (graph, compare_to) if g is not None]
    ids = [i for sentence in read_lm_corpus(path) for i in (*vocab.encode(sentence), vocab.eos_id)]
    stream = np.array([[vocab.eos_id, *ids]], dtype=np.int64)
    layers, _, hidden = manifest.graphs[graph].inputs["h0"].shape
    states = [(np.zeros((layers, 1, hidden), dtype=np.float32),) * 2 for _ in sessions]
    total = 0.0
    top1 = top5 = 0
    for start in range(0, stream.shape[1] - 1, LM_EVAL_WINDOW):
        inputs = stream[:, start : start + LM_EVAL_WINDOW]
        targets = stream[0, start + 1 : start + 1 + inputs.shape[1]]
        inputs = inputs[:, : targets.size]
        outputs = []
        for i, session in enumerate(sessions):
            h, c = states[i]
            log_probs, h, c = session.run(None, {"tokens": inputs, "h0": h, "c0": c})
            states[i] = (h, c)
            outputs.append(log_probs[0])
        total -= float(outputs[0][np.arange(targets.size), targets].sum())
        if compare_to is not None:
            top1 += int((outputs[0].argmax(-1) == outputs[1].argmax(-1)).sum())
            best = [np.argpartition(-out, 5, axis=-1)[:, :5].tolist() for out in outputs]  # unordered top five
            top5 += sum(len(set(a) & set(b)) for a, b in zip(*best, strict=True))
    tokens = stream.shape[1] - 1
    result = {"perplexity": round(math.exp(total / tokens), 3), "tokens": tokens, "file": path.name, "graph": graph}
    if compare_to is not None:
        result.update(compared_to=compare_to, top1_agreement=round(top1 / tokens, 4),
                      top5_agreement=round(top5 / (5 * tokens), 4))
    return result


def _accuracy(version_dir: Path, manifest: Manifest, path: Path, graph: str, compare_to: str | None = None) -> dict:
    """Accuracy on an ``stsa.*``-style file (``<label> <tokenized sentence>`` per line); with
    ``compare_to``, also how often the two graphs choose the same label (``label_agreement``)."""
    vocab = read_vocabulary(version_dir, manifest)
    sessions = [_session(version_dir, manifest, g) for g in (graph, compare_to) if g is not None]
    examples = read_labelled(path, len(manifest.labels))
    correct = agree = 0
    for start in range(0, len(examples), 128):
        chunk = examples[start : start + 128]
        tokens, lengths = pad_batch([vocab.encode(e.tokens) for e in chunk], vocab.pad_id)
        labels = [session.run(None, {"tokens": tokens.numpy(), "lengths": lengths.numpy()})[0].argmax(-1)
                  for session in sessions]
        correct += int((labels[0] == np.array([e.label for e in chunk])).sum())
        if compare_to is not None:
            agree += int((labels[0] == labels[1]).sum())
    result = {"accuracy": round(correct / len(examples), 4), "examples": len(examples), "file": path.name,
              "graph": graph}
    if compare_to is not None:
        result.update(compared_to=compare_to, label_agreement=round(agree / len(examples), 4))
    return result


_MEASURES = {"language-model": _perplexity, "sentiment": _accuracy}


def evaluate_version(version_dir: Path, path: Path, graph: str = FULL, manifest: Manifest | None = None,
                     compare_to: str | None = None) -> dict:
    """Perplexity (language model) or accuracy (classifier) of ``graph`` of the version in
    ``version_dir`` on the data file ``path``; with ``compare_to``, also how often ``graph`` agrees with
    that graph (next words, labels). ``manifest`` is the version's manifest when the caller holds it
    already (the exporter, before writing it); otherwise it is read from ``version_dir``."""
    if manifest is None:
        manifest = read_version(version_dir)
    if compare_to is not None and compare_to not in manifest.graphs:
        raise DataError(f"{version_dir} has no {compare_to!r} graph; it has {', '.join(manifest.graphs)}")
    return _MEASURES[manifest.task](version_dir, manifest, path, graph, compare_to)
