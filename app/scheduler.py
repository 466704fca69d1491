"""The one request path from a route to onnxruntime: admission, the request's steps, queueing,
grouping rows into calls, and running them on the inference thread.

    route ─► Scheduler.predict_next / score / classify
               1. tokenise, and for next words look up the prefix-state cache: this is the work to do
               2. admission: `Admission` refuses the request (429) when the work queued ahead of it would
                  keep it waiting longer than the bound; otherwise it waits, at most until its deadline
               3. queue the request's rows (texts, prefix steps) under a key naming the calls they may share
               4. group queued rows, cut texts into calls of similar length (`length_buckets`), and run each
                  call of a runtime row primitive on the inference thread
             ◄─ results, split back to each request

This module is the one owner of which rows share an onnxruntime call; ``app.runtime``'s row
primitives turn the rows they are given into exactly one call.

Step 1 runs on the event loop, in the request's own coroutine, before anything is queued: the
cache lookup decides the work (how many tokens are new, hence which calls a step may join and what
admission charges for it), a text over the token limit is refused before it takes a place in the
queue, and both are cheap (tokenisation is cached chunk by chunk in ``app.text``; a cache lookup is
a few dictionary probes). Only onnxruntime calls go to the inference thread.

Deadlines: every request has one (the service's default, or sooner if the client asks). A request
whose deadline passes while it waits is answered 504 ``deadline_exceeded`` at once and its rows are
dropped before they reach onnxruntime; so are the rows of a request whose client went away (the
route cancels it). A call already running is never interrupted: its result for such a request is
thrown away.

Grouping is the only thing the ``batching`` setting changes. With it on, rows of concurrent
requests under the same key share a call: a queue is dispatched when it holds ``max_size`` rows,
when the inference thread falls idle, when its oldest row has waited ``max_wait`` — or at once
when its request is the only one in the service, so a lone client never waits. One group runs at
a time; rows that arrive meanwhile form the next, so groups grow with the load. With it off, a
group is one request's rows. Results are identical either way (the row primitives pad so that no row
sees another; int8 graphs quantize at fixed scales, and ones that compute scales per call, from all
of a call's rows, are not served: ``app.runtime``)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar

from app.cache import PrefixState, PrefixStateCache, Resumption
from app.errors import DeadlineExceeded, Overloaded
from app.manifest import Precision
from app.prefix_trie import ScorePlan, plan_scoring
from app.runtime import (
    Classification,
    LanguageModelRuntime,
    NextWordDistribution,
    Segment,
    SegmentResult,
    SentenceScore,
    SentimentRuntime,
    Step,
    Tokenised,
)
from app.sampling import GeneratedToken, SampleEnd, Sampling, choose_token, sample_generator

Row = TypeVar("Row")
Result = TypeVar("Result")

INFERENCE_THREAD_NAME = "inference"
# Token positions per onnxruntime call over padded texts: the language model's output is
# [batch, seq, vocab] floats, so this bounds one call's memory (256 x 10k words = 10 MB, about three
# times that at the peak). Measured on ptb-lm at 32 connections of 8-sentence /score requests, 256
# against 512: as fast or faster (int8 77 vs 63-71 req/s, float32 59 vs 55-59) with a peak RSS 25-45 MB
# lower; 128 loses throughput (int8 67, float32 52): calls of too few rows read the LSTM's weights for
# too little work at every step.
BATCH_TOKEN_BUDGET = 256
# Rows shorter than this fraction of their call's longest row go to another call, so that one
# long text does not make many short ones pay for its padding.
MIN_ROW_FILL = 0.5


class Admission:
    """Whether a request may wait for a model, by expected waiting time: the onnxruntime time of
    the work admitted and not yet finished. A request that would wait longer than ``max_wait``
    seconds is refused at once with ``Overloaded`` (429) and a ``Retry-After`` for when the queue
    will have drained below the bound.

    Work is measured in token positions; what a position costs is learnt per model, kind of call
    and precision from the calls that ran (an exponential moving average of seconds per position; under
    load, of the time between back-to-back calls, so both batching's savings and the event loop's share
    count), starting from ``PRIOR_SECONDS_PER_POSITION``. Once calls of different sizes have been seen,
    a least-squares fit of a call's time to a fixed part plus a part per position replaces it (`cost`):
    a call of one-token steps costs far more than a position's worth, and charging its time per
    position made a cold 20-word prefix look like ~90 ms of work and refused /predict-next at 16
    connections while requests waited 45 ms.

    The sum of the costs still misses what they do not see (a request's rows split over several calls,
    the event loop's turns between them, timer jitter), and what the bound promises is a high percentile
    of the real wait, not its mean. So the expectation is **calibrated**: ``calibration`` tracks the
    ``CALIBRATION_QUANTILE`` of (time a request spent in the scheduler) / (the sum of costs it was
    admitted behind, its own included), learnt from requests that queued (expected at least
    ``CALIBRATION_MIN_SECONDS``) by a multiplicative stochastic-quantile update, and the expected wait
    is the sum of costs times it. Requests still in the scheduler count at once: when one has already
    spent more than its expectation times the calibration (the first half-second of a flood, when the
    event loop is busy with hundreds of new connections and nothing has finished to learn from), its
    ratio so far is used instead."""

    PRIOR_SECONDS_PER_POSITION = 2e-4  # a 10k-word softmax position on one core, rounded up
    SMOOTHING = 0.5  # a flood must be measured within a few calls: costs under load are several times higher
    CALIBRATION_QUANTILE = 0.98
    CALIBRATION_STEP = 0.05  # a ratio above the estimate raises it by 4.9%, one below lowers it by 0.1%
    CALIBRATION_MIN_SECONDS = 0.02  # below this a request hardly queued: its ratio is jitter
    CALIBRATION_LIMITS = (0.5, 4.0)
    FIT_DECAY = 0.9  # weight of a call in the per-call + per-position fit, multiplied in at every later call
    FIT_MIN_SPREAD = 0.25  # the fit is used once the calls' positions vary by this coefficient of variation

    def __init__(self, max_wait: float, observe: Callable[[str, float], None] | None = None):
        self.max_wait = max_wait
        self._observe = observe or (lambda endpoint, seconds: None)
        # How long the oldest request still queued has waited (set by the scheduler): when the costs
        # learnt so far are too low (a flood has just begun), the queue's real age says so at once.
        self.oldest_queued_age: Callable[[], float] = lambda: 0.0
        self.queued_seconds = 0.0  # expected onnxruntime time of admitted, unfinished work
        self.outstanding = 0  # admitted requests not yet answered
        self.calibration = 1.0  # the high quantile of real over expected time in the scheduler
        self._in_flight: dict[object, tuple[float, float]] = {}  # admitted, calibrating: (admitted at, expected)
        self._seconds_per_position: dict[Hashable, float] = {}
        # Per kind, decayed sums over calls for a least-squares fit of seconds = per call + positions x per
        # position, and the decayed mean rows per call: a call's fixed part is shared by the rows in it.
        self._fits: dict[Hashable, list[float]] = {}  # [n, positions, seconds, positions^2, positions*seconds, rows]

    def cost(self, kind: Hashable, positions: int, rows: int = 1) -> float:
        """Expected onnxruntime seconds for ``rows`` rows of ``positions`` token positions in all of
        ``kind`` of call: per position plus the rows' share of a call's fixed part once calls of
        different sizes have been seen (a call of one-token steps costs far more than a position's
        worth: the event loop, the thread hop, a softmax per row), else per position alone."""
        fit = self._fit(kind)
        if fit is not None:
            per_call, per_position, rows_per_call = fit
            return positions * per_position + per_call * min(1.0, rows / rows_per_call)
        return positions * self._seconds_per_position.get(kind, self.PRIOR_SECONDS_PER_POSITION)

    def observe(self, kind: Hashable, positions: int, seconds: float, rows: int = 1) -> None:
        """Learn from a call that ran ``rows`` rows of ``positions`` token positions in all of
        ``kind`` in ``seconds``."""
        if positions <= 0:
            return
        measured = seconds / positions
        previous = self._seconds_per_position.get(kind)
        self._seconds_per_position[kind] = measured if previous is None else (
            previous + self.SMOOTHING * (measured - previous))
        sums = self._fits.setdefault(kind, [0.0] * 6)
        for i, value in enumerate((1.0, positions, seconds, positions * positions, positions * seconds, rows)):
            sums[i] = sums[i] * self.FIT_DECAY + value

    def _fit(self, kind: Hashable) -> tuple[float, float, float] | None:
        """(seconds per call, seconds per position, rows per call) fitted to ``kind``'s recent calls, or
        None while their sizes have hardly varied."""
        sums = self._fits.get(kind)
        if sums is None:
            return None
        n, x, y, xx, xy, rows = sums
        mean = x / n
        variance = xx / n - mean * mean
        if variance <= (self.FIT_MIN_SPREAD * mean) ** 2:
            return None
        per_position = max(0.0, (xy / n - mean * y / n) / variance)  # 0: size made no difference
        per_call = max(0.0, y / n - per_position * mean)
        return per_call, per_position, max(1.0, rows / n)

    def calibrate(self, expected: float, real: float) -> None:
        """Learn from a request expected to spend ``expected`` seconds in the scheduler that spent ``real``."""
        if expected < self.CALIBRATION_MIN_SECONDS:
            return
        q, step = self.CALIBRATION_QUANTILE, self.CALIBRATION_STEP
        factor = 1 + step * q if real / expected > self.calibration else 1 - step * (1 - q)
        low, high = self.CALIBRATION_LIMITS
        self.calibration = min(high, max(low, self.calibration * factor))

    @property
    def expected_wait(self) -> float:
        factor = self.calibration
        if self._in_flight:
            now = time.perf_counter()
            factor = max(factor, max((now - admitted) / expected for admitted, expected in self._in_flight.values()))
        return max(self.queued_seconds * factor, self.oldest_queued_age())

    def check(self) -> None:
        """Raise `Overloaded` if a request arriving now would wait longer than the bound."""
        wait = self.expected_wait
        if wait > self.max_wait:
            retry_after = max(1, math.ceil(wait - self.max_wait))
            raise Overloaded(
                "the service is at capacity: a request now would wait longer than the bound; retry shortly",
                {"expected_wait_ms": round(wait * 1000), "max_wait_ms": round(self.max_wait * 1000),
                 "waiting": self.outstanding},
                headers={"Retry-After": str(retry_after)},
            )

    @contextmanager
    def admit(self, cost: float, endpoint: str, calibrate: bool = True) -> Iterator[None]:
        """Hold a place for a request whose work is expected to take ``cost`` seconds; the time it
        then spends in the scheduler (waiting, and its own calls) is reported as ``endpoint``'s and,
        with ``calibrate``, teaches `calibrate` (not for work paced by its client, like a stream)."""
        self.check()
        self.queued_seconds += cost
        expected = self.queued_seconds
        self.outstanding += 1
        admitted = time.perf_counter()
        key = object()  # this admission, in _in_flight
        if calibrate and expected >= self.CALIBRATION_MIN_SECONDS:
            self._in_flight[key] = (admitted, expected)
        try:
            yield
        finally:
            spent = time.perf_counter() - admitted
            self._in_flight.pop(key, None)
            self.outstanding -= 1
            self.queued_seconds = max(0.0, self.queued_seconds - cost) if self.outstanding else 0.0
            if calibrate:
                self.calibrate(expected, spent)
            self._observe(endpoint, spent)


@dataclass(frozen=True)
class Prompt:
    """The start of a generation: the prompt as the model read it and the precision it runs at."""

    context: Tokenised
    precision: Precision


@dataclass
class _Request(Generic[Row, Result]):
    rows: list[Row]
    future: asyncio.Future[list[Result]]
    arrived: float
    deadline: float  # event-loop time


@dataclass
class _Queue(Generic[Row, Result]):
    run: Callable[[list[Row]], list[Result]]
    padded: bool  # rows are texts padded to a common length: bucket them by length
    kind: Hashable  # what the call costs per position is learnt under this name
    requests: list[_Request[Row, Result]] = field(default_factory=list)
    rows: int = 0
    timer: asyncio.TimerHandle | None = None


class Scheduler:
    """What the routes call to run a model. ``max_wait`` (how long rows wait for companions) and
    ``timeout`` (a request's deadline when it asks for none sooner) are in seconds;
    ``default_precision`` applies to requests that name none."""

    def __init__(
        self,
        admission: Admission,
        cache: PrefixStateCache,
        *,
        batching: bool = True,
        max_size: int = 32,
        max_wait: float = 0.001,
        default_precision: Precision = "float32",
        timeout: float = 10.0,
        share_prefixes: bool = True,
    ):
        self.admission = admission
        self.cache = cache
        self.batching = batching
        self.max_size = max_size
        self.max_wait = max_wait if batching else 0.0
        self.default_precision = default_precision
        self.timeout = timeout
        self.share_prefixes = share_prefixes  # /score computes texts' common beginnings once
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=INFERENCE_THREAD_NAME)
        self._queues: dict[Hashable, _Queue[Any, Any]] = {}
        self._running: set[asyncio.Task[None]] = set()  # the group on the inference thread, referenced
        self._busy = False
        self._last_finished = 0.0  # perf_counter when the inference thread last finished a group
        admission.oldest_queued_age = self._oldest_queued_age

    # -- the requests' steps ----------------------------------------------------------------

    async def predict_next(self, model: LanguageModelRuntime, text: str, top_k: int, include_special: bool,
                           precision: Precision | None, deadline: float | None = None,
                           complete_last_word: bool = False) -> tuple[NextWordDistribution, Precision]:
        """Top-k next words after ``text`` and the precision they were computed at; with
        ``complete_last_word``, the top-k words that complete the word being typed (from the
        distribution after the words before it). The prefix runs from its longest cached prefix;
        steps are keyed by their token count, because only equal-length steps can share a call (an
        LSTM's final state depends on every position). ``deadline`` is in event-loop time (None:
        the default timeout from now)."""
        chosen = model.precision(precision, self.default_precision)
        deadline = self._deadline(deadline)
        context, typed = model.split_last_word(text) if complete_last_word else (model.tokenise(text), None)
        key = model.cache_key(chosen)
        plan = self.cache.plan(key, model.context_ids(context))
        kind = (model.ref, "step", chosen)
        cost = self.admission.cost(kind, len(plan.ids) - plan.cached)
        with self.admission.admit(cost, "/predict-next"), model.in_use():
            state = await self._read_prefix(model, chosen, plan, deadline)
            if typed is not None:
                return model.completions(context, state.log_probs, typed, top_k), chosen
            return model.top_words(context, state.log_probs, top_k, include_special), chosen

    async def generate(self, model: LanguageModelRuntime, text: str, sampling: Sampling, max_tokens: int, n: int,
                       seed: int, stop: Sequence[str], allow_unk: bool, precision: Precision | None,
                       deadline: float | None = None) -> AsyncIterator[Prompt | GeneratedToken | SampleEnd]:
        """Continue ``text`` with ``n`` samples of at most ``max_tokens`` tokens each. Yields the
        `Prompt` first (before any token: everything a client can get wrong has been refused by
        then), then each sample's tokens as they are chosen and a `SampleEnd` per sample
        (``eos``, ``stop`` for a word of ``stop``, or ``length``; neither ``<eos>`` nor the stop
        word is yielded). The prompt runs from the prefix-state cache; after it, each new token is
        one step from the state before it (never the prompt again), and the samples' steps share
        calls with each other and with other requests' one-token steps. ``<unk>`` is never chosen
        unless ``allow_unk``; ``<pad>`` never."""
        chosen = model.precision(precision, self.default_precision)
        deadline = self._deadline(deadline)
        context = model.tokenise(text)
        stop_ids = model.stop_ids(stop)
        banned = model.special_ids_except_eos(allow_unk)
        plan = self.cache.plan(model.cache_key(chosen), model.context_ids(context))
        kind = (model.ref, "step", chosen)
        cost = self.admission.cost(kind, len(plan.ids) - plan.cached + max_tokens)
        with self.admission.admit(cost, "/generate", calibrate=False), model.in_use():
            prompt = await self._read_prefix(model, chosen, plan, deadline)
            yield Prompt(context, chosen)
            generators = [sample_generator(seed, index) for index in range(n)]
            states = [prompt] * n
            active = list(range(n))
            for number in range(max_tokens):
                chosen_ids: dict[int, int] = {}
                for index in active:
                    token = choose_token(states[index].log_probs, sampling, banned, generators[index])
                    if token == model.eos_id or token in stop_ids:
                        yield SampleEnd(index, "eos" if token == model.eos_id else "stop")
                        continue
                    yield GeneratedToken(index, model.vocab.tokens[token], float(states[index].log_probs[token]))
                    chosen_ids[index] = token
                active = list(chosen_ids)
                if number == max_tokens - 1:
                    for index in active:
                        yield SampleEnd(index, "length")
                    return
                if not active:
                    return
                steps = [Step([chosen_ids[index]], states[index]) for index in active]
                new_states = await self._run((*kind, 1), kind, steps, partial(model.run_steps, chosen),
                                             padded=False, deadline=deadline)
                for index, state in zip(active, new_states, strict=True):
                    states[index] = state

    async def _read_prefix(self, model: LanguageModelRuntime, precision: Precision, plan: Resumption,
                           deadline: float) -> PrefixState:
        """The state after ``plan``'s prefix: its cached part, then its new tokens as steps (each
        step's state cached). Steps are keyed by their token count, because only equal-length steps
        can share a call (an LSTM's final state depends on every position)."""
        key = model.cache_key(precision)
        kind = (model.ref, "step", precision)
        start, state = plan.cached, plan.state
        for end in plan.ends:
            step = Step(plan.ids[start:end], state)
            (state,) = await self._run((*kind, end - start), kind, [step], partial(model.run_steps, precision),
                                       padded=False, deadline=deadline)
            self.cache.put(key, plan.ids[:end], state)
            start = end
        assert state is not None
        return state

    async def score(self, model: LanguageModelRuntime, texts: Sequence[str], count_eos: bool,
                    precision: Precision | None, deadline: float | None = None,
                    ) -> tuple[list[SentenceScore], Precision]:
        """Each text's tokens scored left to right from ``<eos>`` (the closing ``<eos>`` too with
        ``count_eos``). Texts that share a beginning (an n-best list) compute it once
        (`app.prefix_trie`): the plan's segments run round by round, leaves padded together with
        other requests' texts, segments that others continue from in calls of equal length."""
        chosen = model.precision(precision, self.default_precision)
        deadline = self._deadline(deadline)
        encoded, targets = model.score_targets(texts, count_eos)
        plan = plan_scoring(targets, model.eos_id, self.share_prefixes)
        kind = (model.ref, "score", chosen)
        run = partial(model.score_segments, chosen)
        cost = self.admission.cost(kind, plan.positions, len(plan.segments))
        with self.admission.admit(cost, "/score"), model.in_use():
            done: list[SegmentResult] = [None] * len(plan.segments)  # type: ignore[list-item]
            for indices in plan.rounds:
                calls: dict[Hashable, list[int]] = {}
                for index in indices:
                    segment = plan.segments[index]
                    key = (*kind, "branch", len(segment.tokens)) if segment.branches else kind
                    calls.setdefault(key, []).append(index)
                work = {key: self._run(key, kind, [self._segment(plan, i, done) for i in members], run,
                                       padded=key == kind, deadline=deadline)
                        for key, members in calls.items()}
                for key, results in zip(work, await _all(list(work.values())), strict=True):
                    for index, result in zip(calls[key], results, strict=True):
                        done[index] = result
            scored = plan.assemble([result.values for result in done], targets)
            return [model.sentence_score(*row) for row in zip(encoded, targets, scored, strict=True)], chosen

    @staticmethod
    def _segment(plan: ScorePlan, index: int, done: list[SegmentResult]) -> Segment:
        segment = plan.segments[index]
        state = None if segment.parent is None else done[segment.parent].state
        return Segment(segment.tokens, state, segment.reads, keep_state=segment.branches)

    async def classify(self, model: SentimentRuntime, texts: Sequence[str], precision: Precision | None,
                       deadline: float | None = None) -> tuple[list[Classification], Precision]:
        """The label and per-label probabilities of each text; a text with no tokens is refused."""
        chosen = model.precision(precision, self.default_precision)
        deadline = self._deadline(deadline)
        encoded = model.encode(texts)
        rows = [t.ids for t in encoded]
        kind = (model.ref, "classify", chosen)
        cost = self.admission.cost(kind, sum(map(len, rows)), len(rows))
        with self.admission.admit(cost, "/sentiment"), model.in_use():
            probabilities = await self._run(kind, kind, rows, partial(model.classify_rows, chosen), padded=True,
                                            deadline=deadline)
            return [model.classification(t, p) for t, p in zip(encoded, probabilities, strict=True)], chosen

    def _deadline(self, deadline: float | None) -> float:
        default = asyncio.get_running_loop().time() + self.timeout
        return default if deadline is None else min(deadline, default)

    # -- queueing, grouping, running --------------------------------------------------------

    async def _run(self, key: Hashable, kind: Hashable, rows: Sequence[Row], run: Callable[[list[Row]], list[Result]],
                   padded: bool, deadline: float) -> list[Result]:
        """``run(rows)`` for this request's ``rows`` on the inference thread, grouped with rows of
        other requests under the same ``key`` when batching (``run`` must then be the same
        function for the key). A group goes to the inference thread whole; with ``padded`` its
        rows (token-id lists) are cut into calls of similar length (`length_buckets`). Raises
        `DeadlineExceeded` at ``deadline`` (event-loop time)."""
        loop = asyncio.get_running_loop()
        queue = self._queues.setdefault(key, _Queue(run, padded, kind))
        request: _Request[Row, Result] = _Request(list(rows), loop.create_future(), time.perf_counter(), deadline)
        queue.requests.append(request)
        queue.rows += len(request.rows)
        if not self._busy:
            if queue.rows >= self.max_size or self.admission.outstanding <= 1 or self.max_wait <= 0:
                self._dispatch(key)
            elif queue.timer is None:
                queue.timer = loop.call_later(self.max_wait, self._on_timer, key)
        try:
            # On timeout or cancellation (the client went away) the future is cancelled, so a
            # group not yet dispatched leaves this request's rows out.
            return await asyncio.wait_for(request.future, max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise DeadlineExceeded(
                "the request's deadline passed before its answer was ready",
                {"waited_ms": round((time.perf_counter() - request.arrived) * 1000)},
            ) from None

    def _oldest_queued_age(self) -> float:
        """Seconds the oldest request waiting in a queue (not yet on the inference thread) has waited."""
        if not self._queues:
            return 0.0
        return time.perf_counter() - min(queue.requests[0].arrived for queue in self._queues.values())

    def _on_timer(self, key: Hashable) -> None:
        queue = self._queues.get(key)
        if queue is None:
            return
        queue.timer = None
        if not self._busy and queue.requests:
            self._dispatch(key)

    def _dispatch(self, key: Hashable, back_to_back: bool = False) -> None:
        """Take the group at the head of ``key``'s queue to the inference thread."""
        queue = self._queues[key]
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None
        taken: list[_Request[Any, Any]] = []
        size = 0
        now = asyncio.get_running_loop().time()
        while queue.requests and (not taken or (self.batching and size + len(queue.requests[0].rows) <= self.max_size)):
            request = queue.requests.pop(0)
            queue.rows -= len(request.rows)
            if request.future.done() or request.deadline <= now:  # withdrawn, timed out, or about to be
                continue
            taken.append(request)
            size += len(request.rows)
        if not queue.requests:
            del self._queues[key]
        if not taken:
            self._dispatch_oldest(back_to_back)
            return
        self._busy = True
        task = asyncio.get_running_loop().create_task(self._execute(queue, taken, back_to_back))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _execute(self, queue: _Queue[Any, Any], taken: list[_Request[Any, Any]], back_to_back: bool) -> None:
        rows = [row for request in taken for row in request.rows]
        call = partial(run_in_length_buckets, queue.run) if queue.padded else queue.run
        try:
            started = time.perf_counter()
            results = await asyncio.get_running_loop().run_in_executor(self._executor, call, rows)
            # Under load (this group was waiting when the one before it finished) a group costs the
            # time since that one finished: what keeps the next group waiting besides onnxruntime (the
            # event loop answering the last group and refusing others, the GIL) counts too, so the
            # expected wait is the wait a request will see.
            finished = time.perf_counter()
            cycle = finished - (self._last_finished if back_to_back else started)
            self._last_finished = finished
            self.admission.observe(queue.kind, sum(_positions(row) for row in rows), cycle, len(rows))
        except Exception as e:  # every request of the group gets the failure
            for request in taken:
                if not request.future.done():
                    request.future.set_exception(e)
        else:
            start = 0
            for request in taken:
                if not request.future.done():
                    request.future.set_result(results[start : start + len(request.rows)])
                start += len(request.rows)
        finally:
            self._busy = False
            self._dispatch_oldest(back_to_back=True)

    def _dispatch_oldest(self, back_to_back: bool) -> None:
        """The inference thread is free: send the queue whose oldest request has waited longest."""
        if self._queues:
            key = min(self._queues, key=lambda k: self._queues[k].requests[0].arrived)
            self._dispatch(key, back_to_back)

    def close(self) -> None:
        """Stop taking work: pending groups are cancelled, the inference thread ends after its call."""
        for task in self._running:
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


async def _all(calls: list[Coroutine[Any, Any, Result]]) -> list[Result]:
    """The results of ``calls`` run concurrently; the first failure cancels the others and is raised
    as itself (a request's deadline, say), not in an exception group. One call is simply awaited."""
    if len(calls) == 1:
        return [await calls[0]]
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(call) for call in calls]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


def _positions(row: Any) -> int:
    """Token positions a row makes onnxruntime compute: a scoring segment's or a next-word step's
    tokens, or a text's ids."""
    return len(row.tokens) if isinstance(row, Step | Segment) else len(row)


def length_buckets(sizes: Sequence[int], budget: int = BATCH_TOKEN_BUDGET) -> Iterator[list[int]]:
    """Indices of ``sizes`` grouped into calls, longest first, so that rows x longest row stays
    within ``budget`` token positions and no row is shorter than ``MIN_ROW_FILL`` of its call's
    longest; a row longer than the budget gets a call of its own."""
    bucket: list[int] = []
    width = 0
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        size = sizes[index]
        if bucket and ((len(bucket) + 1) * width > budget or size < MIN_ROW_FILL * width):
            yield bucket
            bucket = []
        if not bucket:
            width = size
        bucket.append(index)
    if bucket:
        yield bucket


def run_in_length_buckets(run: Callable[[list[Row]], list[Result]], rows: list[Row]) -> list[Any]:
    """``run`` over ``rows`` (token-id lists or scoring segments) in length buckets, results in the
    rows' order. An empty row needs no call: its result is an empty list (nothing to compute)."""
    results: list[Any] = [[] for _ in rows]
    pending = [i for i, row in enumerate(rows) if _positions(row)]
    for bucket in length_buckets([_positions(rows[i]) for i in pending]):
        indices = [pending[b] for b in bucket]
        for i, result in zip(indices, run([rows[i] for i in indices]), strict=True):
            results[i] = result
    return results
