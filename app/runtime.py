"""Model versions at run time: a version's onnxruntime sessions, tokenizer and self-test, and the
row-level primitives that make one onnxruntime call per group of rows
(``LanguageModelRuntime.run_steps`` / ``score_segments``, ``SentimentRuntime.classify_rows``) with what
turns their results into answers. ``app.scheduler`` decides which rows share a call and where it runs."""

from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from app.cache import ModelKey, PrefixState
from app.errors import InvalidStopWord, NoTokens, ServiceError, TooManyTokens
from app.manifest import FULL, LAST, PRECISIONS, Precision, Task, graph_name
from app.sessions import create_session
from app.store import ModelLoadError, VersionFiles
from app.text import EOS, PAD, UNK, Vocabulary, get_normaliser

log = logging.getLogger(__name__)

InferenceObserver = Callable[[str, float, int], None]
"""Called after each onnxruntime call with the graph's name, the call's wall time in seconds and
its batch size (rows)."""


class PrecisionUnavailable(ServiceError):
    """A request asked for a precision the model has no graphs for."""

    status, code = 422, "precision_unavailable"


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
class Completion:
    """The word being typed: ``prefix`` (normalised like any word), how many vocabulary words
    start with it, and the share of the next-word distribution they hold together."""

    prefix: str
    matches: int
    coverage: float


@dataclass(frozen=True)
class NextWordDistribution:
    context: Tokenised
    words: list[NextWord]  # most probable first
    completion: Completion | None = None  # set when the last word was completed, not predicted


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
class Segment:
    """Scoring work for one segment of a score plan (`app.prefix_trie`): read ``tokens`` from
    ``state`` ((h, c) [layers, hidden]; None: the zero state) and, after the token at each
    position, look up the log-probabilities of the ids ``reads[position]``; with ``keep_state``
    return the final state too (segments continue from it)."""

    tokens: Sequence[int]
    state: tuple[np.ndarray, np.ndarray] | None
    reads: Sequence[list[int]]
    keep_state: bool = False


@dataclass(frozen=True)
class SegmentResult:
    values: list[dict[int, float]]  # per position: token id -> natural-log probability
    state: tuple[np.ndarray, np.ndarray] | None  # (h, c) when the segment kept it


class ModelRuntime(ABC):
    """What both tasks share: identity, vocabulary, normaliser, sessions and the self-test."""

    task: Task
    # Float graphs the service runs, by manifest name; each one's int8 twin is loaded beside it
    # when the manifest lists one.
    graphs: tuple[str, ...]

    def __init__(
        self,
        files: VersionFiles,
        threads: int,
        max_tokens: int,
        observe: InferenceObserver | None = None,
    ):
        manifest = files.manifest
        self.manifest = manifest
        self.name, self.version = manifest.name, manifest.version
        self.max_tokens = max_tokens
        self._observe = observe or (lambda graph, seconds, rows: None)
        try:
            self.normalise = get_normaliser(manifest.tokenizer.normaliser)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        try:
            self.vocab = Vocabulary.load(files.directory / manifest.tokenizer.vocab_file)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ModelLoadError(f"vocabulary {manifest.tokenizer.vocab_file} is not usable: {type(e).__name__}") from e
        self._check_tokenizer()
        self.sessions: dict[str, ort.InferenceSession] = {}
        for name in (graph_name(g, p) for p in PRECISIONS for g in self.graphs):
            graph = manifest.graphs.get(name)
            if graph is None:
                continue
            if not graph.deterministic:
                # A row's answer would move with the rows sharing its call, and batching decides those. Not a
                # warning: the model serves float32, and /models lists the precisions it has.
                log.info("%s@%s: not serving %s: its activation scales are computed per call, so answers "
                            "would depend on other requests; export the model again for int8 at fixed scales",
                            manifest.name, manifest.version, graph.file)
                continue
            try:
                self.sessions[name] = create_session(files.directory / graph.file, threads)
            except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
                raise ModelLoadError(f"onnxruntime cannot load {graph.file}: {type(e).__name__}") from e
            self._check_signature(name)
        self.load_id = 0  # which load of this version (set by the registry): cache entries never cross loads
        self.in_flight = 0  # requests using this runtime now
        self._on_drained: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self.special_ids = [self.vocab.id(token) for token in (EOS, UNK, PAD) if token in self.vocab]
        self.precisions: tuple[Precision, ...] = tuple(p for p in PRECISIONS if graph_name(FULL, p) in self.sessions)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @contextmanager
    def in_use(self) -> Iterator[None]:
        """Count a request as using this runtime while it runs, so a retired runtime is unloaded
        only after its last request has its answer."""
        with self._lock:
            self.in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1
                drained = self._on_drained if self.in_flight == 0 else None
                if drained:
                    self._on_drained = None
            if drained:
                drained()

    def retire(self, on_drained: Callable[[], None]) -> None:
        """Call ``on_drained`` once no request uses this runtime (at once when none does)."""
        with self._lock:
            if self.in_flight:
                self._on_drained = on_drained
                return
        on_drained()

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

    def _check_signature(self, name: str) -> None:
        """The graph file must have the names its manifest entry (checked against the task's
        signature when the manifest was read) promises."""
        session, spec = self.sessions[name], self.manifest.graphs[name]
        inputs = {i.name for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        if (inputs, outputs) != (set(spec.inputs), set(spec.outputs)):
            raise ModelLoadError(
                f"graph {name} has inputs {sorted(inputs)} and outputs {sorted(outputs)}; a {self.task} "
                f"needs {sorted(spec.inputs)} and {sorted(spec.outputs)}"
            )

    def tokenise(self, text: str, index: int = 0) -> Tokenised:
        """Normalise ``text`` and map it to ids; ``index`` is its place in the request (for errors)."""
        return self.encode_words(self.normalise(text), index)

    def encode_words(self, words: list[str], index: int = 0) -> Tokenised:
        """Normalised ``words`` mapped to ids (422 ``too_many_tokens`` over the limit)."""
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
        selftest = self.manifest.selftest
        for number, case in enumerate(selftest.cases):
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
    graphs = (FULL, LAST)

    def __init__(self, files: VersionFiles, threads: int, max_tokens: int, observe: InferenceObserver | None = None):
        super().__init__(files, threads, max_tokens, observe)
        manifest = files.manifest
        if self.vocab.eos_id is None:
            raise ModelLoadError(f"a language model's vocabulary needs {EOS}")
        self.eos_id: int = self.vocab.eos_id
        state = manifest.graphs[FULL].inputs["h0"].shape
        if not (len(state) == 3 and isinstance(state[0], int) and isinstance(state[2], int)):
            raise ModelLoadError("the manifest does not give h0's [layers, batch, hidden] sizes")
        self.layers, self.hidden_size = state[0], state[2]
        self._all_ids = np.arange(len(self.vocab))
        self._ordinary_ids = np.setdiff1d(self._all_ids, self.special_ids)  # what next-word answers rank
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
        last = graph_name(LAST, precision)
        return last if last in self.sessions else graph_name(FULL, precision)

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

    def cache_key(self, precision: Precision) -> ModelKey:
        """This runtime's key in the prefix-state cache: a state is only valid for the graph (and
        the load of it) that made it."""
        return (self.name, self.version, self.load_id, precision)

    def context_ids(self, context: Tokenised) -> list[int]:
        """The token ids the model reads for a prefix: ``<eos>`` then the prefix."""
        return [self.eos_id, *context.ids]

    def top_words(self, context: Tokenised, log_probs: np.ndarray, top_k: int,
                  include_special: bool) -> NextWordDistribution:
        """The ``top_k`` most probable words of ``log_probs`` [vocab], most probable first (ties by
        vocabulary id); ``<eos>``, ``<unk>`` and ``<pad>`` only when ``include_special``."""
        ids = self._all_ids if include_special else self._ordinary_ids
        return NextWordDistribution(context=context, words=self._most_probable(ids, log_probs, top_k))

    def _most_probable(self, ids: np.ndarray, log_probs: np.ndarray, top_k: int) -> list[NextWord]:
        """The ``top_k`` of ``ids`` most probable in ``log_probs`` [vocab], most probable first (ties
        by vocabulary id)."""
        scores = log_probs[ids].astype(np.float64)
        k = min(top_k, ids.size)
        top = np.argpartition(-scores, k - 1)[:k] if k else np.array([], dtype=np.int64)
        top = sorted(top.tolist(), key=lambda i: (-scores[i], ids[i]))
        return [NextWord(self.vocab.tokens[ids[i]], math.exp(scores[i]), float(scores[i])) for i in top]

    def split_last_word(self, text: str) -> tuple[Tokenised, str | None]:
        """``text`` as a context and the word still being typed at its end, normalised like every
        word (None when the text ends in whitespace or punctuation: its last word is finished)."""
        chunks = text.split()
        if not chunks or text[-1].isspace() or not (chunks[-1][-1].isalnum() or chunks[-1][-1] == "'"):
            return self.tokenise(text), None
        words = self.normalise(text)
        if not words:
            return self.tokenise(text), None
        return self.encode_words(words[:-1]), words[-1]

    def completions(self, context: Tokenised, log_probs: np.ndarray, prefix: str, top_k: int) -> NextWordDistribution:
        """The ``top_k`` most probable vocabulary words starting with ``prefix`` in ``log_probs``
        [vocab] (the distribution after ``context``), and the share of the distribution they cover."""
        ids = np.asarray(self.vocab.ids_with_prefix(prefix), dtype=np.int64)
        coverage = float(np.exp(log_probs[ids].astype(np.float64)).sum())
        words = self._most_probable(ids, log_probs, top_k)
        return NextWordDistribution(context, words, Completion(prefix, int(ids.size), min(1.0, coverage)))

    def stop_ids(self, words: Sequence[str]) -> frozenset[int]:
        """The vocabulary ids of stop words, each normalised like text; 422 ``invalid_stop_word`` for
        one that is not exactly one vocabulary word (it could never be generated)."""
        ids = set()
        for index, word in enumerate(words):
            tokens = self.normalise(word)
            if len(tokens) != 1 or tokens[0] not in self.vocab or self.vocab.id(tokens[0]) in self.special_ids:
                raise InvalidStopWord(
                    f"stop word {index} is not one word of the model's vocabulary after normalisation, so it "
                    "could never be generated", {"index": index, "tokens": len(tokens)})
            ids.add(self.vocab.id(tokens[0]))
        return frozenset(ids)

    def special_ids_except_eos(self, allow_unk: bool) -> list[int]:
        """Special tokens generation must not choose: ``<pad>``, and ``<unk>`` unless allowed
        (``<eos>`` ends a sample instead)."""
        return [i for i in self.special_ids if i != self.eos_id and (i != self.vocab.unk_id or not allow_unk)]

    def score_targets(self, texts: Sequence[str], count_eos: bool) -> tuple[list[Tokenised], list[list[int]]]:
        """Each text tokenised, and the ids scored for it: its tokens, then ``<eos>`` with ``count_eos``."""
        encoded = [self.tokenise(text, index) for index, text in enumerate(texts)]
        return encoded, [t.ids + [self.eos_id] if count_eos else t.ids for t in encoded]

    def score_segments(self, precision: Precision, segments: Sequence[Segment]) -> list[SegmentResult]:
        """One full-graph call for ``segments`` (`app.prefix_trie`): each row reads its tokens from its
        state, and its ``reads`` are looked up in the log-probabilities after each token. Rows are
        right-padded: the LSTM is causal, so padding never changes a valid position, and only those
        are read; a row that keeps its final state must be as long as the longest row."""
        width = max(len(segment.tokens) for segment in segments)
        tokens = np.full((len(segments), width), self.eos_id, dtype=np.int64)
        for row, segment in enumerate(segments):
            tokens[row, : len(segment.tokens)] = segment.tokens
        h0 = np.stack([self._zero_state if s.state is None else s.state[0] for s in segments], axis=1)
        c0 = np.stack([self._zero_state if s.state is None else s.state[1] for s in segments], axis=1)
        log_probs, hn, cn = self.run(graph_name(FULL, precision), {"tokens": tokens, "h0": h0, "c0": c0})
        results = []
        for row, segment in enumerate(segments):
            values = [dict(zip(reads, log_probs[row, position, reads].astype(np.float64).tolist(), strict=True))
                      for position, reads in enumerate(segment.reads)]
            state = None
            if segment.keep_state:
                if len(segment.tokens) != width:
                    raise ValueError("a segment that keeps its state cannot share a call with longer ones")
                state = (hn[:, row].copy(), cn[:, row].copy())
            results.append(SegmentResult(values, state))
        return results

    def sentence_score(self, text: Tokenised, target: list[int], values: list[float]) -> SentenceScore:
        total = float(sum(values))
        perplexity = math.exp(-total / len(values)) if values and -total / len(values) < 700 else None
        names = [self.vocab.tokens[i] for i in target]
        return SentenceScore(text, list(zip(names, values, strict=True)), total, perplexity)

    def warm_up(self) -> None:
        for precision in self.precisions:
            self.run_steps(precision, [Step([self.eos_id], None)])
            self.score_segments(precision, [Segment([self.eos_id], None, [[self.eos_id]])])


class SentimentRuntime(ModelRuntime):
    """A sentence classifier over right-padded token ids; probabilities come from the graph's softmax."""

    task = "sentiment"
    graphs = (FULL,)

    def __init__(self, files: VersionFiles, threads: int, max_tokens: int, observe: InferenceObserver | None = None):
        super().__init__(files, threads, max_tokens, observe)
        manifest = files.manifest
        if self.vocab.pad_id is None:
            raise ModelLoadError(f"a sentiment vocabulary needs {PAD}")
        self.pad_id: int = self.vocab.pad_id
        classes = manifest.graphs[FULL].outputs["probs"].shape[-1]
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
        """Per-label probabilities (float64 [classes]) of each row of token ids (every row non-empty),
        in one call. Rows are right-padded with their lengths given, which the graph guarantees
        leaves every result unchanged."""
        lengths = np.array([len(row) for row in rows], dtype=np.int64)
        tokens = np.full((len(rows), int(lengths.max())), self.pad_id, dtype=np.int64)
        for i, row in enumerate(rows):
            tokens[i, : lengths[i]] = row
        (probs,) = self.run(graph_name(FULL, precision), {"tokens": tokens, "lengths": lengths})
        return [p.astype(np.float64) for p in probs]

    def classification(self, text: Tokenised, probabilities: np.ndarray) -> Classification:
        return Classification(
            text=text,
            label=self.labels[int(np.argmax(probabilities))],
            probabilities={label: float(v) for label, v in zip(self.labels, probabilities, strict=True)},
        )

    def warm_up(self) -> None:
        for precision in self.precisions:
            self.classify_rows(precision, [[self.pad_id]])


RUNTIMES: dict[Task, type[ModelRuntime]] = {r.task: r for r in (LanguageModelRuntime, SentimentRuntime)}
