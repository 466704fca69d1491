"""Models at run time: onnxruntime sessions (created here and nowhere else), the language model's
and the classifier's inference, the manifest's self-test, warm-up, and the thread they run on."""

from __future__ import annotations

import asyncio
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort

from app.errors import NoTokens, Overloaded, TooManyTokens
from app.store import Manifest, ModelLoadError, SelfTest
from app.text import EOS, PAD, UNK, Vocabulary, get_normaliser

# Token positions per onnxruntime call when a request's texts are batched: the language model's
# output is [batch, seq, vocab] floats, so this bounds one call's memory (4096 x 10k words = 164 MB).
BATCH_TOKEN_BUDGET = 4096

LM_SIGNATURE = ({"tokens", "h0", "c0"}, {"log_probs", "hn", "cn"})
SENTIMENT_SIGNATURE = ({"tokens", "lengths"}, {"probs"})

InferenceObserver = Callable[[str, float], None]
"""Called after each onnxruntime call with the graph's name and the call's wall time in seconds."""


def create_session(path: Path, threads: int) -> ort.InferenceSession:
    """An onnxruntime CPU session over ``path`` (external weights load from beside it) using at most
    ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle threads sleep instead of spinning: the CPUs are shared with uvicorn's own work.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Tokenised:
    """A text as the model sees it: ``tokens`` after normalisation with out-of-vocabulary words
    as ``<unk>``, ``unknown`` those words as written (in order), and the token ``ids``."""

    tokens: list[str]
    unknown: list[str]
    ids: list[int]


@dataclass(frozen=True)
class NextWord:
    word: str
    probability: float
    log_prob: float  # natural log


@dataclass(frozen=True)
class NextWordDistribution:
    context: Tokenised
    words: list[NextWord]  # most probable first


@dataclass(frozen=True)
class SentenceScore:
    """``token_log_probs`` pairs each scored token (the closing ``<eos>`` last, when counted) with
    its natural-log probability given everything to its left, starting from ``<eos>``."""

    text: Tokenised
    token_log_probs: list[tuple[str, float]]
    total_log_prob: float
    perplexity: float | None  # exp(-total / count); None when no token was scored

    @property
    def token_count(self) -> int:
        return len(self.token_log_probs)


@dataclass(frozen=True)
class Classification:
    text: Tokenised
    label: str
    probabilities: dict[str, float]  # label -> probability, in the model's label order


class ModelRuntime(ABC):
    """What both tasks share: identity, vocabulary, normaliser, sessions and the self-test."""

    task: str
    signature: tuple[set[str], set[str]]
    # Graphs the service runs, by manifest name; others (an int8 twin, say) are verified but not loaded.
    graphs: tuple[str, ...]

    def __init__(
        self,
        manifest: Manifest,
        directory: Path,
        threads: int,
        max_tokens: int,
        observe: InferenceObserver | None = None,
    ):
        self.manifest = manifest
        self.name, self.version = manifest.name, manifest.version
        self.max_tokens = max_tokens
        self._observe = observe or (lambda graph, seconds: None)
        try:
            self.normalise = get_normaliser(manifest.tokenizer.normaliser)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        try:
            self.vocab = Vocabulary.load(directory / manifest.tokenizer.vocab_file)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ModelLoadError(f"vocabulary {manifest.tokenizer.vocab_file} is not usable: {type(e).__name__}") from e
        self._check_tokenizer()
        self.sessions: dict[str, ort.InferenceSession] = {}
        for graph_name in self.graphs:
            graph = manifest.graphs.get(graph_name)
            if graph is None:
                continue
            try:
                self.sessions[graph_name] = create_session(directory / graph.file, threads)
            except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
                raise ModelLoadError(f"onnxruntime cannot load {graph.file}: {type(e).__name__}") from e
            self._check_signature(graph_name)
        self.special_ids = [self.vocab.id(token) for token in (EOS, UNK, PAD) if token in self.vocab]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def _check_tokenizer(self) -> None:
        spec = self.manifest.tokenizer
        if len(self.vocab) != spec.vocab_size:
            raise ModelLoadError(f"vocabulary has {len(self.vocab)} tokens, the manifest says {spec.vocab_size}")
        for key, special in spec.special_tokens.items():
            if special is not None and (special.token not in self.vocab or self.vocab.id(special.token) != special.id):
                raise ModelLoadError(f"special token {key} is not {special.token!r} at id {special.id}")

    def _check_signature(self, graph_name: str) -> None:
        session = self.sessions[graph_name]
        inputs = {i.name for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        if (inputs, outputs) != self.signature:
            raise ModelLoadError(
                f"graph {graph_name} has inputs {sorted(inputs)} and outputs {sorted(outputs)}; a {self.task} "
                f"needs {sorted(self.signature[0])} and {sorted(self.signature[1])}"
            )

    def tokenise(self, text: str, index: int = 0) -> Tokenised:
        """Normalise ``text`` and map it to ids; ``index`` is its place in the request (for errors)."""
        words = self.normalise(text)
        if len(words) > self.max_tokens:
            raise TooManyTokens(
                f"text {index} has {len(words)} tokens after normalisation; the limit is {self.max_tokens}",
                {"index": index, "tokens": len(words), "limit": self.max_tokens},
            )
        ids = self.vocab.encode(words)
        tokens = [self.vocab.tokens[i] for i in ids]
        return Tokenised(tokens=tokens, unknown=self.vocab.unknown(words), ids=ids)

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        start = time.perf_counter()
        outputs = self.sessions[graph].run(None, feeds)
        self._observe(graph, time.perf_counter() - start)
        return outputs

    def _self_test_feeds(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return inputs

    def self_test(self) -> None:
        """Run the manifest's self-test cases; raise ``ModelLoadError`` on the first mismatch."""
        selftest: SelfTest = self.manifest.selftest
        for number, case in enumerate(selftest.cases):
            if case.graph not in self.manifest.graphs:
                raise ModelLoadError(f"self-test case {number} names graph {case.graph!r}, which is not listed")
            if case.graph not in self.sessions:
                continue  # a graph the service does not run
            session = self.sessions[case.graph]
            types = {i.name: i.type for i in session.get_inputs()}
            try:
                given = {
                    name: np.asarray(value, dtype=np.int64 if "int64" in types.get(name, "") else np.float32)
                    for name, value in case.inputs.items()
                }
                feeds = self._self_test_feeds(case.graph, given)
                names = [o.name for o in session.get_outputs()]
                outputs = dict(zip(names, self.run(case.graph, feeds), strict=True))
            except Exception as e:  # a malformed case or a graph that fails to run
                raise ModelLoadError(f"self-test case {number} does not run: {type(e).__name__}") from e
            for check in case.checks:
                try:
                    actual = float(outputs[check.output][tuple(check.index)])
                except (KeyError, IndexError):
                    raise ModelLoadError(f"self-test case {number} checks {check.output}{check.index}, "
                                         "which the graph does not produce") from None
                if not abs(actual - check.value) <= selftest.tolerance:
                    raise ModelLoadError(
                        f"self-test case {number}: {check.output}{check.index} is {actual:.6g}, "
                        f"expected {check.value:.6g} (tolerance {selftest.tolerance:g})"
                    )

    @abstractmethod
    def warm_up(self) -> None:
        """Run each graph once so the first request does not pay for onnxruntime's lazy set-up."""


class LanguageModelRuntime(ModelRuntime):
    """A word-level LSTM language model. Context starts with ``<eos>`` (a sentence boundary), so
    an empty prefix asks for the first word of a sentence. All log-probabilities are natural logs."""

    task = "language-model"
    signature = LM_SIGNATURE
    graphs = ("full", "last")

    def __init__(self, manifest: Manifest, directory: Path, threads: int, max_tokens: int,
                 observe: InferenceObserver | None = None):
        super().__init__(manifest, directory, threads, max_tokens, observe)
        if self.vocab.eos_id is None:
            raise ModelLoadError(f"a language model's vocabulary needs {EOS}")
        self.eos_id: int = self.vocab.eos_id
        state = manifest.graphs["full"].inputs["h0"].shape
        if not (len(state) == 3 and isinstance(state[0], int) and isinstance(state[2], int)):
            raise ModelLoadError("the manifest does not give h0's [layers, batch, hidden] sizes")
        self.layers, self.hidden_size = state[0], state[2]
        self.next_word_graph = "last" if "last" in self.sessions else "full"

    def _state(self, batch: int) -> dict[str, np.ndarray]:
        zeros = np.zeros((self.layers, batch, self.hidden_size), dtype=np.float32)
        return {"h0": zeros, "c0": zeros}

    def _self_test_feeds(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Cases leave out h0/c0, meaning the zero state.
        return {**self._state(inputs["tokens"].shape[0]), **inputs}

    def next_word_distribution(self, text: str, top_k: int, include_special: bool = False) -> NextWordDistribution:
        """The ``top_k`` most probable next words after ``<eos>`` + ``text``, most probable first
        (ties by vocabulary id). ``<eos>``, ``<unk>`` and ``<pad>`` only when ``include_special``."""
        context = self.tokenise(text)
        tokens = np.array([[self.eos_id, *context.ids]], dtype=np.int64)
        log_probs = self.run(self.next_word_graph, {"tokens": tokens, **self._state(1)})[0]
        scores = log_probs.reshape(-1, log_probs.shape[-1])[-1].astype(np.float64)
        if not include_special:
            scores[self.special_ids] = -np.inf
        candidates = int(np.isfinite(scores).sum())
        k = min(top_k, candidates)
        top = np.argpartition(-scores, k - 1)[:k] if k else np.array([], dtype=np.int64)
        top = sorted(top.tolist(), key=lambda i: (-scores[i], i))
        words = [NextWord(self.vocab.tokens[i], math.exp(scores[i]), float(scores[i])) for i in top]
        return NextWordDistribution(context=context, words=words)

    def score_sentences(self, texts: Sequence[str], count_eos: bool = True) -> list[SentenceScore]:
        """Each text's tokens scored left to right from ``<eos>``; with ``count_eos`` the closing
        ``<eos>`` is scored too (the PTB convention for perplexity)."""
        encoded = [self.tokenise(text, index) for index, text in enumerate(texts)]
        targets = [t.ids + [self.eos_id] if count_eos else t.ids for t in encoded]
        scored: list[list[float]] = [[] for _ in texts]
        pending = [i for i, target in enumerate(targets) if target]
        for rows in _batches(pending, [len(targets[i]) for i in pending], BATCH_TOKEN_BUDGET):
            width = max(len(targets[i]) for i in rows)
            # Right padding with <eos> is safe: the LSTM is causal, padded positions are ignored.
            tokens = np.full((len(rows), width), self.eos_id, dtype=np.int64)
            for row, i in enumerate(rows):
                inputs = [self.eos_id, *encoded[i].ids][: len(targets[i])]
                tokens[row, : len(inputs)] = inputs
            log_probs = self.run("full", {"tokens": tokens, **self._state(len(rows))})[0]
            for row, i in enumerate(rows):
                n = len(targets[i])
                scored[i] = log_probs[row, np.arange(n), targets[i]].astype(np.float64).tolist()
        results = []
        for text, target, values in zip(encoded, targets, scored, strict=True):
            total = float(sum(values))
            perplexity = math.exp(-total / len(values)) if values and -total / len(values) < 700 else None
            names = [self.vocab.tokens[i] for i in target]
            results.append(SentenceScore(text, list(zip(names, values, strict=True)), total, perplexity))
        return results

    def warm_up(self) -> None:
        self.next_word_distribution("", top_k=1)
        self.score_sentences(["warm up"])


class SentimentRuntime(ModelRuntime):
    """A sentence classifier over right-padded token ids; probabilities come from the graph's softmax."""

    task = "sentiment"
    signature = SENTIMENT_SIGNATURE
    graphs = ("full",)

    def __init__(self, manifest: Manifest, directory: Path, threads: int, max_tokens: int,
                 observe: InferenceObserver | None = None):
        super().__init__(manifest, directory, threads, max_tokens, observe)
        if self.vocab.pad_id is None:
            raise ModelLoadError(f"a sentiment vocabulary needs {PAD}")
        self.pad_id: int = self.vocab.pad_id
        classes = manifest.graphs["full"].outputs["probs"].shape[-1]
        if not manifest.labels or (isinstance(classes, int) and classes != len(manifest.labels)):
            raise ModelLoadError(f"the manifest's labels do not match the graph's {classes} classes")
        self.labels: list[str] = manifest.labels

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        """The label and per-label probabilities of each text; a text with no tokens is refused."""
        encoded = [self.tokenise(text, index) for index, text in enumerate(texts)]
        for index, text in enumerate(encoded):
            if not text.ids:
                raise NoTokens(f"text {index} has no tokens after normalisation", {"index": index})
        probabilities: list[np.ndarray] = [np.empty(0)] * len(texts)
        for rows in _batches(list(range(len(texts))), [len(t.ids) for t in encoded], BATCH_TOKEN_BUDGET):
            lengths = np.array([len(encoded[i].ids) for i in rows], dtype=np.int64)
            tokens = np.full((len(rows), int(lengths.max())), self.pad_id, dtype=np.int64)
            for row, i in enumerate(rows):
                tokens[row, : lengths[row]] = encoded[i].ids
            (probs,) = self.run("full", {"tokens": tokens, "lengths": lengths})
            for row, i in enumerate(rows):
                probabilities[i] = probs[row].astype(np.float64)
        return [
            Classification(
                text=text,
                label=self.labels[int(np.argmax(p))],
                probabilities={label: float(v) for label, v in zip(self.labels, p, strict=True)},
            )
            for text, p in zip(encoded, probabilities, strict=True)
        ]

    def warm_up(self) -> None:
        self.classify(["a warm up"])


RUNTIMES: dict[str, type[ModelRuntime]] = {r.task: r for r in (LanguageModelRuntime, SentimentRuntime)}


def _batches(items: list[int], sizes: list[int], budget: int) -> Iterator[list[int]]:
    """Group ``items`` longest first so that rows x longest row stays within ``budget`` token
    positions; an item longer than the budget gets a batch of its own."""
    batch: list[int] = []
    width = 0
    for size, item in sorted(zip(sizes, items, strict=True), key=lambda pair: -pair[0]):
        if batch and (len(batch) + 1) * width > budget:
            yield batch
            batch = []
        if not batch:
            width = size
        batch.append(item)
    if batch:
        yield batch


T = TypeVar("T")


class InferencePool:
    """Runs model calls on one dedicated thread, so onnxruntime never blocks the event loop and
    calls do not compete for the CPUs each session's intra-op threads already use. At most
    ``max_waiting`` calls may wait; beyond that callers get ``Overloaded`` (429) at once."""

    def __init__(self, max_waiting: int):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._max_waiting = max_waiting
        self._waiting = 0

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._waiting >= self._max_waiting:
            raise Overloaded(
                "too many requests are waiting for a model; retry shortly",
                {"waiting": self._waiting}, headers={"Retry-After": "1"},
            )
        self._waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args, **kwargs))
        finally:
            self._waiting -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
