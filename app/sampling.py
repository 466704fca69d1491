"""Choosing the next token when the language model writes (``POST /generate``): temperature,
top-k and nucleus (top-p) sampling, or the most probable token at temperature 0.

Pure numpy. Each sample draws from its own generator, seeded from the request's seed and the
sample's index, so the same request with the same seed writes the same text however its steps
are grouped into onnxruntime calls, streamed or not."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

FinishReason = Literal["eos", "stop", "length"]


@dataclass(frozen=True)
class Sampling:
    """``temperature`` 0 picks the most probable token; otherwise the distribution is sharpened
    (below 1) or flattened (above 1), cut to the ``top_k`` most probable tokens (None: all) and to
    the smallest set holding ``top_p`` of the probability, and sampled."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0


@dataclass(frozen=True)
class GeneratedToken:
    """Sample ``index`` chose ``token``, whose natural-log probability under the model (before
    temperature, top-k and top-p) is ``log_prob``."""

    index: int
    token: str
    log_prob: float


@dataclass(frozen=True)
class SampleEnd:
    """Sample ``index`` ended: ``eos`` (the model ended the sentence), ``stop`` (it chose a stop
    word) or ``length`` (it reached the token limit)."""

    index: int
    reason: FinishReason


def sample_generator(seed: int, index: int) -> np.random.Generator:
    """The random generator of sample ``index`` of a request with ``seed``."""
    return np.random.default_rng([seed, index])


def choose_token(log_probs: np.ndarray, sampling: Sampling, banned: Sequence[int], rng: np.random.Generator) -> int:
    """A token id drawn from ``log_probs`` [vocab] (natural logs) under ``sampling``, never one of
    ``banned``. Ties at temperature 0 go to the lowest id."""
    scores = log_probs.astype(np.float64)
    scores[list(banned)] = -np.inf
    if sampling.temperature == 0:
        return int(np.argmax(scores))
    scores = scores / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < scores.size:
        threshold = np.partition(scores, -sampling.top_k)[-sampling.top_k]
        scores[scores < threshold] = -np.inf
    order = np.argsort(-scores, kind="stable")
    probs = np.exp(scores[order] - scores[order[0]])
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        # Keep the most probable tokens up to and including the one that reaches top_p.
        keep = int(np.searchsorted(np.cumsum(probs), sampling.top_p)) + 1
        probs = probs[:keep] / probs[:keep].sum()
        order = order[:keep]
    return int(order[rng.choice(probs.size, p=probs)])
