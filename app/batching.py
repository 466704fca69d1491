"""Cross-request micro-batching: work from requests that arrive together runs as one onnxruntime
call on the inference thread.

``MicroBatcher`` queues rows (texts, prefix steps) per key, a key naming work that can share a
call: the same model, graph and precision, and for next-word steps the same number of new tokens
(an LSTM's final state depends on every position, so steps are never padded). A queue goes to the
inference thread when it holds ``max_size`` rows, when the thread falls idle, when its oldest row
has waited ``max_wait`` — or at once when its request is the only one in the service, so a lone
client never waits. One group runs at a time; rows that arrive meanwhile form the next, so groups
grow with the load. The runtime's row primitives bucket and pad what they are given.

``InferenceScheduler`` is what the routes call: each request runs either alone on the inference
thread (batching off) or as rows through the batcher (batching on). float32 results are the same
either way. int8 graphs quantize activations with a scale computed per call, so an int8 result
moves slightly (within quantization noise, ~1e-4 in log-probability) with its call's companions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from app.errors import Overloaded
from app.runtime import (
    Classification,
    InferencePool,
    LanguageModelRuntime,
    NextWordDistribution,
    Precision,
    SentenceScore,
    SentimentRuntime,
    Step,
)

Row = TypeVar("Row")
Result = TypeVar("Result")


@dataclass
class _Request(Generic[Row, Result]):
    rows: list[Row]
    future: asyncio.Future[list[Result]]
    arrived: float


@dataclass
class _Queue(Generic[Row, Result]):
    run: Callable[[list[Row]], list[Result]]
    requests: list[_Request[Row, Result]] = field(default_factory=list)
    rows: int = 0
    timer: asyncio.TimerHandle | None = None


class MicroBatcher:
    """Groups rows from concurrent requests into one call of a row function on the inference
    thread. ``max_wait`` is in seconds. At most ``max_waiting`` requests may wait; more get 429."""

    def __init__(self, pool: InferencePool, max_size: int, max_wait: float, max_waiting: int):
        self._pool = pool
        self.max_size = max_size
        self.max_wait = max_wait
        self._max_waiting = max_waiting
        self._queues: dict[Hashable, _Queue[Any, Any]] = {}
        self._outstanding = 0  # requests submitted and not yet answered
        self._busy = False  # a group is on the inference thread

    async def submit(
        self, key: Hashable, rows: Sequence[Row], run: Callable[[list[Row]], list[Result]]
    ) -> list[Result]:
        """``run(rows)`` for this request's ``rows``, in one call with rows of other requests
        under the same ``key`` (whose ``run`` must be the same function). A request's rows are
        never split between calls."""
        if self._outstanding >= self._max_waiting:
            raise Overloaded(
                "too many requests are waiting for a model; retry shortly",
                {"waiting": self._outstanding}, headers={"Retry-After": "1"},
            )
        loop = asyncio.get_running_loop()
        queue = self._queues.setdefault(key, _Queue(run))
        request: _Request[Row, Result] = _Request(list(rows), loop.create_future(), time.perf_counter())
        queue.requests.append(request)
        queue.rows += len(request.rows)
        self._outstanding += 1
        try:
            if not self._busy:
                if queue.rows >= self.max_size or self._outstanding == 1 or self.max_wait <= 0:
                    self._dispatch(key)
                elif queue.timer is None:
                    queue.timer = loop.call_later(self.max_wait, self._on_timer, key)
            return await request.future
        finally:
            self._outstanding -= 1

    def _on_timer(self, key: Hashable) -> None:
        queue = self._queues.get(key)
        if queue is None:
            return
        queue.timer = None
        if not self._busy and queue.requests:
            self._dispatch(key)

    def _dispatch(self, key: Hashable) -> None:
        queue = self._queues[key]
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None
        taken: list[_Request[Any, Any]] = []
        size = 0
        while queue.requests and (not taken or size + len(queue.requests[0].rows) <= self.max_size):
            request = queue.requests.pop(0)
            taken.append(request)
            size += len(request.rows)
        queue.rows -= size
        if not queue.requests:
            del self._queues[key]
        self._busy = True
        asyncio.ensure_future(self._execute(queue.run, taken))

    async def _execute(self, run: Callable[[list[Any]], list[Any]], taken: list[_Request[Any, Any]]) -> None:
        rows = [row for request in taken for row in request.rows]
        try:
            results = await self._pool.run(run, rows)
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
            self._dispatch_oldest()

    def _dispatch_oldest(self) -> None:
        """The inference thread is free: send the queue whose oldest request has waited longest."""
        if self._queues:
            key = min(self._queues, key=lambda k: self._queues[k].requests[0].arrived)
            self._dispatch(key)


class InferenceScheduler:
    """The routes' way to a model: runs a request's work on the inference thread, alone, or (with a
    batcher) as rows sharing onnxruntime calls with other requests. ``default_precision`` applies
    to requests that name none."""

    def __init__(self, pool: InferencePool, batcher: MicroBatcher | None, default_precision: Precision):
        self.pool = pool
        self.batcher = batcher
        self.default_precision = default_precision

    async def predict_next(self, model: LanguageModelRuntime, text: str, top_k: int, include_special: bool,
                           precision: Precision | None) -> tuple[NextWordDistribution, Precision]:
        """Top-k next words after ``text`` and the precision they were computed at. Batched steps
        are keyed by their token count: only equal-length steps share a call."""
        chosen = model.precision(precision, self.default_precision)
        if self.batcher is None:
            result = await self.pool.run(model.next_word_distribution, text, top_k, include_special, chosen)
            return result, chosen
        context = model.tokenise(text)
        plan = model.resume(model.context_ids(context), chosen)
        start, state = plan.cached, plan.state
        for end in plan.ends:
            step = Step(plan.ids[start:end], state)
            key = (model.ref, "step", chosen, end - start)
            (state,) = await self.batcher.submit(key, [step], lambda steps: model.run_steps(chosen, steps))
            model.remember(plan.ids[:end], chosen, state)
            start = end
        assert state is not None
        return model.top_words(context, state.log_probs, top_k, include_special), chosen

    async def score(self, model: LanguageModelRuntime, texts: Sequence[str], count_eos: bool,
                    precision: Precision | None) -> tuple[list[SentenceScore], Precision]:
        chosen = model.precision(precision, self.default_precision)
        if self.batcher is None:
            return await self.pool.run(model.score_sentences, texts, count_eos, chosen), chosen
        encoded, targets = model.score_targets(texts, count_eos)
        key = (model.ref, "score", chosen)
        scored = await self.batcher.submit(key, targets, lambda rows: model.score_rows(chosen, rows))
        return [model.sentence_score(*row) for row in zip(encoded, targets, scored, strict=True)], chosen

    async def classify(self, model: SentimentRuntime, texts: Sequence[str],
                       precision: Precision | None) -> tuple[list[Classification], Precision]:
        chosen = model.precision(precision, self.default_precision)
        if self.batcher is None:
            return await self.pool.run(model.classify, texts, chosen), chosen
        encoded = model.encode(texts)
        key = (model.ref, "classify", chosen)
        probabilities = await self.batcher.submit(key, [t.ids for t in encoded],
                                                  lambda rows: model.classify_rows(chosen, rows))
        return [model.classification(t, p) for t, p in zip(encoded, probabilities, strict=True)], chosen
