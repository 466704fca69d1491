"""Models at run time: onnxruntime sessions (created here and nowhere else), the language model's
and the classifier's inference, the manifest's self-test, warm-up, and the thread they run on.

Each task's work comes in two layers: row-level primitives that make one onnxruntime call per
group of rows (``LanguageModelRuntime.run_steps`` / ``score_rows``, ``SentimentRuntime.classify_rows``),
which ``app.batching`` feeds with rows from many requests, and per-request methods built on them
(``next_word_distribution``, ``score_sentences``, ``classify``)."""

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
from typing import Any, Literal, TypeVar, get_args

import numpy as np
import onnxruntime as ort

from app.cache import PrefixState, PrefixStateCache
from app.errors import NoTokens, Overloaded, ServiceError, TooManyTokens
from app.store import Manifest, ModelLoadError, SelfTest
from app.text import EOS, PAD, UNK, Vocabulary, get_normaliser

# Token positions per onnxruntime call when texts are batched: the language model's output is
# [batch, seq, vocab] floats, so this bounds one call's memory (512 x 10k words = 20 MB, about
# twice that at the peak); larger calls gain little speed and would break the service's RSS budget.
BATCH_TOKEN_BUDGET = 512
# Rows shorter than this fraction of their group's longest row start a new group, so that one
# long text does not make many short ones pay for its padding.
MIN_ROW_FILL = 0.5

LM_SIGNATURE = ({"tokens", "h0", "c0"}, {"log_probs", "hn", "cn"})
SENTIMENT_SIGNATURE = ({"tokens", "lengths"}, {"probs"})

Precision = Literal["float32", "int8"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)

InferenceObserver = Callable[[str, float, int], None]
"""Called after each onnxruntime call with the graph's name, the call's wall time in seconds and
its batch size (rows)."""


class PrecisionUnavailable(ServiceError):
    """A request asked for a precision the model has no graphs for."""

    status, code = 422, "precision_unavailable"


def graph_name(base: str, precision: Precision) -> str:
    """The manifest's name for ``base`` ("full", "last") at ``precision``: "full" or "full-int8"."""
    return base if precision == "float32" else f"{base}-{precision}"


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
    # Without the arena, memory for a large batch goes back once the call returns; with it, each
    # session keeps its peak (measured: 130 MB -> 500 MB RSS after a few big /score batches) for
    # no measurable speed-up on these graphs.
    options.enable_cpu_mem_arena = False
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


@dataclass(frozen=True)
class Step:
    """Language-model work for one prefix: read ``tokens`` starting from ``state`` (None: the zero
    state, i.e. the start of the context, so ``tokens`` begins with ``<eos>``)."""

    tokens: Sequence[int]
    state: PrefixState | None


@dataclass(frozen=True)
class Resumption:
    """Where a prefix's computation starts: ``cached`` tokens of ``ids`` are already read into
    ``state`` (0 and None: nothing cached), and ``ends`` are the prefix lengths to run to, in order.
    An empty ``ends`` means ``state`` answers the whole prefix."""

    ids: list[int]
    cached: int
    state: PrefixState | None
    ends: list[int]


class ModelRuntime(ABC):
    """What both tasks share: identity, vocabulary, normaliser, sessions and the self-test."""

    task: str
    signature: tuple[set[str], set[str]]
    # Float graphs the service runs, by manifest name; each one's int8 twin is loaded beside it
    # when the manifest lists one.
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
        self._observe = observe or (lambda graph, seconds, rows: None)
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
        for name in (graph_name(g, p) for p in PRECISIONS for g in self.graphs):
            graph = manifest.graphs.get(name)
            if graph is None:
                continue
            try:
                self.sessions[name] = create_session(directory / graph.file, threads)
            except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
                raise ModelLoadError(f"onnxruntime cannot load {graph.file}: {type(e).__name__}") from e
            self._check_signature(name)
        self.special_ids = [self.vocab.id(token) for token in (EOS, UNK, PAD) if token in self.vocab]
        self.precisions: tuple[Precision, ...] = tuple(p for p in PRECISIONS if graph_name("full", p) in self.sessions)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def precision(self, requested: Precision | None, default: Precision) -> Precision:
        """The precision a request runs at: the one it asked for (422 when this model has no such
        graphs), else ``default`` where this model has it, else float32."""
        if requested is None:
            return default if default in self.precisions else "float32"
        if requested not in self.precisions:
            raise PrecisionUnavailable(
                f"{self.ref} has no {requested} graphs; ask for one of: {', '.join(self.precisions)}",
                {"requested": requested, "available": list(self.precisions)},
            )
        return requested

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
        self._observe(graph, time.perf_counter() - start, len(feeds["tokens"]))
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
    an empty prefix asks for the first word of a sentence. All log-probabilities are natural logs.

    Next-word prediction runs the last-position graph (no softmax at positions it would throw
    away) from the longest prefix found in the prefix-state cache; scoring runs the full graph."""

    task = "language-model"
    signature = LM_SIGNATURE
    graphs = ("full", "last")

    def __init__(self, manifest: Manifest, directory: Path, threads: int, max_tokens: int,
                 observe: InferenceObserver | None = None, cache: PrefixStateCache | None = None):
        super().__init__(manifest, directory, threads, max_tokens, observe)
        if self.vocab.eos_id is None:
            raise ModelLoadError(f"a language model's vocabulary needs {EOS}")
        self.eos_id: int = self.vocab.eos_id
        state = manifest.graphs["full"].inputs["h0"].shape
        if not (len(state) == 3 and isinstance(state[0], int) and isinstance(state[2], int)):
            raise ModelLoadError("the manifest does not give h0's [layers, batch, hidden] sizes")
        self.layers, self.hidden_size = state[0], state[2]
        self.cache = cache or PrefixStateCache(0)
        self._zero_state = np.zeros((self.layers, self.hidden_size), dtype=np.float32)

    def _state(self, batch: int) -> dict[str, np.ndarray]:
        zeros = np.zeros((self.layers, batch, self.hidden_size), dtype=np.float32)
        return {"h0": zeros, "c0": zeros}

    def _self_test_feeds(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Cases leave out h0/c0, meaning the zero state.
        return {**self._state(inputs["tokens"].shape[0]), **inputs}

    def step_graph(self, precision: Precision) -> str:
        """The graph next-word steps run on: the last-position graph, or the full graph for a
        model exported without one."""
        last = graph_name("last", precision)
        return last if last in self.sessions else graph_name("full", precision)

    def run_steps(self, precision: Precision, steps: Sequence[Step]) -> list[PrefixState]:
        """One onnxruntime call for ``steps``, which must all have the same number of tokens (an
        LSTM's final state depends on every position, so rows cannot be padded). Returns each
        step's state and next-word log-probabilities after its last token, as fresh arrays."""
        tokens = np.array([list(s.tokens) for s in steps], dtype=np.int64)
        h0 = np.stack([self._zero_state if s.state is None else s.state.h for s in steps], axis=1)
        c0 = np.stack([self._zero_state if s.state is None else s.state.c for s in steps], axis=1)
        graph = self.step_graph(precision)
        log_probs, hn, cn = self.run(graph, {"tokens": tokens, "h0": h0, "c0": c0})
        if log_probs.ndim == 3:  # the full graph
            log_probs = log_probs[:, -1]
        return [PrefixState(hn[:, row].copy(), cn[:, row].copy(), log_probs[row].copy()) for row in range(len(steps))]

    def context_ids(self, context: Tokenised) -> list[int]:
        """The token ids the model reads for a prefix: ``<eos>`` then the prefix."""
        return [self.eos_id, *context.ids]

    def resume(self, ids: list[int], precision: Precision) -> Resumption:
        """Plan the steps for the prefix ``ids`` from its longest cached prefix. When two or more
        tokens are new, the last one runs as a step of its own, so that the state before it is
        cached too: the next keystroke of an autocomplete client changes only the last word."""
        cached, state = self.cache.longest_prefix((self.name, self.version, precision), ids)
        n = len(ids)
        ends = [] if cached == n else [n] if n - cached == 1 else [n - 1, n]
        return Resumption(ids, cached, state, ends)

    def remember(self, ids: Sequence[int], precision: Precision, state: PrefixState) -> None:
        self.cache.put((self.name, self.version, precision), ids, state)

    def top_words(self, context: Tokenised, log_probs: np.ndarray, top_k: int,
                  include_special: bool) -> NextWordDistribution:
        """The ``top_k`` most probable words of ``log_probs`` [vocab], most probable first (ties by
        vocabulary id); ``<eos>``, ``<unk>`` and ``<pad>`` only when ``include_special``."""
        scores = log_probs.astype(np.float64)
        if not include_special:
            scores[self.special_ids] = -np.inf
        candidates = int(np.isfinite(scores).sum())
        k = min(top_k, candidates)
        top = np.argpartition(-scores, k - 1)[:k] if k else np.array([], dtype=np.int64)
        top = sorted(top.tolist(), key=lambda i: (-scores[i], i))
        words = [NextWord(self.vocab.tokens[i], math.exp(scores[i]), float(scores[i])) for i in top]
        return NextWordDistribution(context=context, words=words)

    def next_word_distribution(self, text: str, top_k: int, include_special: bool = False,
                               precision: Precision = "float32") -> NextWordDistribution:
        """The ``top_k`` most probable next words after ``<eos>`` + ``text``, most probable first
        (ties by vocabulary id). ``<eos>``, ``<unk>`` and ``<pad>`` only when ``include_special``."""
        context = self.tokenise(text)
        plan = self.resume(self.context_ids(context), precision)
        start, state = plan.cached, plan.state
        for end in plan.ends:
            (state,) = self.run_steps(precision, [Step(plan.ids[start:end], state)])
            self.remember(plan.ids[:end], precision, state)
            start = end
        assert state is not None
        return self.top_words(context, state.log_probs, top_k, include_special)

    def score_targets(self, texts: Sequence[str], count_eos: bool) -> tuple[list[Tokenised], list[list[int]]]:
        """Each text tokenised, and the ids scored for it: its tokens, then ``<eos>`` with ``count_eos``."""
        encoded = [self.tokenise(text, index) for index, text in enumerate(texts)]
        return encoded, [t.ids + [self.eos_id] if count_eos else t.ids for t in encoded]

    def score_rows(self, precision: Precision, targets: Sequence[list[int]]) -> list[list[float]]:
        """Natural-log probability of each target id given ``<eos>`` and the targets before it, per
        row. Rows of similar length share one full-graph call, right-padded: the LSTM is causal,
        so padding never changes a valid position, and only those are read."""
        scored: list[list[float]] = [[] for _ in targets]
        pending = [i for i, target in enumerate(targets) if target]
        for rows in _batches(pending, [len(targets[i]) for i in pending], BATCH_TOKEN_BUDGET):
            width = max(len(targets[i]) for i in rows)
            tokens = np.full((len(rows), width), self.eos_id, dtype=np.int64)
            for row, i in enumerate(rows):
                tokens[row, 1 : len(targets[i])] = targets[i][:-1]
            log_probs = self.run(graph_name("full", precision), {"tokens": tokens, **self._state(len(rows))})[0]
            for row, i in enumerate(rows):
                n = len(targets[i])
                scored[i] = log_probs[row, np.arange(n), targets[i]].astype(np.float64).tolist()
        return scored

    def sentence_score(self, text: Tokenised, target: list[int], values: list[float]) -> SentenceScore:
        total = float(sum(values))
        perplexity = math.exp(-total / len(values)) if values and -total / len(values) < 700 else None
        names = [self.vocab.tokens[i] for i in target]
        return SentenceScore(text, list(zip(names, values, strict=True)), total, perplexity)

    def score_sentences(self, texts: Sequence[str], count_eos: bool = True,
                        precision: Precision = "float32") -> list[SentenceScore]:
        """Each text's tokens scored left to right from ``<eos>``; with ``count_eos`` the closing
        ``<eos>`` is scored too (the PTB convention for perplexity)."""
        encoded, targets = self.score_targets(texts, count_eos)
        scored = self.score_rows(precision, targets)
        return [self.sentence_score(*row) for row in zip(encoded, targets, scored, strict=True)]

    def warm_up(self) -> None:
        for precision in self.precisions:
            self.run_steps(precision, [Step([self.eos_id], None)])
            self.score_rows(precision, [[self.eos_id]])


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

    def encode(self, texts: Sequence[str]) -> list[Tokenised]:
        """Each text tokenised; a text with no tokens is refused (422)."""
        encoded = [self.tokenise(text, index) for index, text in enumerate(texts)]
        for index, text in enumerate(encoded):
            if not text.ids:
                raise NoTokens(f"text {index} has no tokens after normalisation", {"index": index})
        return encoded

    def classify_rows(self, precision: Precision, rows: Sequence[list[int]]) -> list[np.ndarray]:
        """Per-label probabilities (float64 [classes]) of each non-empty row of token ids. Rows of
        similar length share one call, right-padded with their lengths given, which the graph
        guarantees leaves every result unchanged."""
        probabilities: list[np.ndarray] = [np.empty(0)] * len(rows)
        for group in _batches(list(range(len(rows))), [len(r) for r in rows], BATCH_TOKEN_BUDGET):
            lengths = np.array([len(rows[i]) for i in group], dtype=np.int64)
            tokens = np.full((len(group), int(lengths.max())), self.pad_id, dtype=np.int64)
            for row, i in enumerate(group):
                tokens[row, : lengths[row]] = rows[i]
            (probs,) = self.run(graph_name("full", precision), {"tokens": tokens, "lengths": lengths})
            for row, i in enumerate(group):
                probabilities[i] = probs[row].astype(np.float64)
        return probabilities

    def classification(self, text: Tokenised, probabilities: np.ndarray) -> Classification:
        return Classification(
            text=text,
            label=self.labels[int(np.argmax(probabilities))],
            probabilities={label: float(v) for label, v in zip(self.labels, probabilities, strict=True)},
        )

    def classify(self, texts: Sequence[str], precision: Precision = "float32") -> list[Classification]:
        """The label and per-label probabilities of each text; a text with no tokens is refused."""
        encoded = self.encode(texts)
        probabilities = self.classify_rows(precision, [t.ids for t in encoded])
        return [self.classification(t, p) for t, p in zip(encoded, probabilities, strict=True)]

    def warm_up(self) -> None:
        for precision in self.precisions:
            self.classify_rows(precision, [[self.pad_id]])


RUNTIMES: dict[str, type[ModelRuntime]] = {r.task: r for r in (LanguageModelRuntime, SentimentRuntime)}


def _batches(items: list[int], sizes: list[int], budget: int) -> Iterator[list[int]]:
    """Group ``items`` longest first so that rows x longest row stays within ``budget`` token
    positions and no row is shorter than ``MIN_ROW_FILL`` of its group's longest (length
    bucketing); an item longer than the budget gets a group of its own."""
    batch: list[int] = []
    width = 0
    for size, item in sorted(zip(sizes, items, strict=True), key=lambda pair: -pair[0]):
        if batch and ((len(batch) + 1) * width > budget or size < MIN_ROW_FILL * width):
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
