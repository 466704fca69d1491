"""The one request path from a route to onnxruntime: admission, the request's steps, queueing,
grouping rows into calls, and running them on the inference thread.

    route ─► Scheduler.predict_next / score / classify
               1. admission: `Admission` decides whether the request may wait for a model (429 if not)
               2. tokenise, and for next words look up the prefix-state cache
               3. queue the request's rows (texts, prefix steps) under a key naming the calls they may share
               4. group queued rows, cut texts into calls of similar length (`length_buckets`), and run each
                  call of a runtime row primitive on the inference thread
             ◄─ results, split back to each request

This module is the one owner of which rows share an onnxruntime call; ``app.runtime``'s row
primitives turn the rows they are given into exactly one call.

Step 2 runs on the event loop, in the request's own coroutine, before anything is queued: the
cache lookup decides the work (how many tokens are new, hence which calls a step may join), a
text over the token limit is refused before it takes a place in the queue, and both are cheap
(tokenisation is cached chunk by chunk in ``app.text``; a cache lookup is a few dictionary probes).
Only onnxruntime calls go to the inference thread.

Grouping is the only thing the ``batching`` setting changes. With it on, rows of concurrent
requests under the same key share a call: a queue is dispatched when it holds ``max_size`` rows,
when the inference thread falls idle, when its oldest row has waited ``max_wait`` — or at once
when its request is the only one in the service, so a lone client never waits. One group runs at
a time; rows that arrive meanwhile form the next, so groups grow with the load. With it off, a
group is one request's rows. float32 results are identical either way (the row primitives pad so
that no row sees another). int8 graphs quantize activations with a scale computed per call, so an
int8 result moves slightly with its call's companions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar

from app.cache import PrefixStateCache
from app.errors import Overloaded
from app.manifest import Precision
from app.runtime import (
    Classification,
    LanguageModelRuntime,
    NextWordDistribution,
    SentenceScore,
    SentimentRuntime,
    Step,
)

Row = TypeVar("Row")
Result = TypeVar("Result")

INFERENCE_THREAD_NAME = "inference"
# Token positions per onnxruntime call over padded texts: the language model's output is
# [batch, seq, vocab] floats, so this bounds one call's memory (512 x 10k words = 20 MB, about
# twice that at the peak); larger calls gain little speed and would break the service's RSS budget.
BATCH_TOKEN_BUDGET = 512
# Rows shorter than this fraction of their call's longest row go to another call, so that one
# long text does not make many short ones pay for its padding.
MIN_ROW_FILL = 0.5


class Admission:
    """Whether a request may wait for a model: at most ``max_waiting`` inference requests are in
    the service (queued or running) at once; one more gets ``Overloaded`` (429) at once."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self.outstanding = 0

    @contextmanager
    def admit(self) -> Iterator[None]:
        if self.outstanding >= self.max_waiting:
            raise Overloaded(
                "too many requests are waiting for a model; retry shortly",
                {"waiting": self.outstanding, "limit": self.max_waiting}, headers={"Retry-After": "1"},
            )
        self.outstanding += 1
        try:
            yield
        finally:
            self.outstanding -= 1


@dataclass
class _Request(Generic[Row, Result]):
    rows: list[Row]
    future: asyncio.Future[list[Result]]
    arrived: float


@dataclass
class _Queue(Generic[Row, Result]):
    run: Callable[[list[Row]], list[Result]]
    padded: bool  # rows are texts padded to a common length: bucket them by length
    requests: list[_Request[Row, Result]] = field(default_factory=list)
    rows: int = 0
    timer: asyncio.TimerHandle | None = None


class Scheduler:
    """What the routes call to run a model. ``max_wait`` is in seconds; ``default_precision``
    applies to requests that name none."""

    def __init__(
        self,
        admission: Admission,
        cache: PrefixStateCache,
        *,
        batching: bool = True,
        max_size: int = 32,
        max_wait: float = 0.001,
        default_precision: Precision = "float32",
    ):
        self.admission = admission
        self.cache = cache
        self.batching = batching
        self.max_size = max_size
        self.max_wait = max_wait if batching else 0.0
        self.default_precision = default_precision
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=INFERENCE_THREAD_NAME)
        self._queues: dict[Hashable, _Queue[Any, Any]] = {}
        self._running: set[asyncio.Task[None]] = set()  # the group on the inference thread, referenced
        self._busy = False

    # -- the requests' steps ----------------------------------------------------------------

    async def predict_next(self, model: LanguageModelRuntime, text: str, top_k: int, include_special: bool,
                           precision: Precision | None) -> tuple[NextWordDistribution, Precision]:
        """Top-k next words after ``text`` and the precision they were computed at. The prefix runs
        from its longest cached prefix; steps are keyed by their token count, because only
        equal-length steps can share a call (an LSTM's final state depends on every position)."""
        chosen = model.precision(precision, self.default_precision)
        with self.admission.admit(), model.in_use():
            context = model.tokenise(text)
            key = model.cache_key(chosen)
            plan = self.cache.plan(key, model.context_ids(context))
            start, state = plan.cached, plan.state
            for end in plan.ends:
                step = Step(plan.ids[start:end], state)
                (state,) = await self._run((model.ref, "step", chosen, end - start), [step],
                                           partial(model.run_steps, chosen), padded=False)
                self.cache.put(key, plan.ids[:end], state)
                start = end
            assert state is not None
            return model.top_words(context, state.log_probs, top_k, include_special), chosen

    async def score(self, model: LanguageModelRuntime, texts: Sequence[str], count_eos: bool,
                    precision: Precision | None) -> tuple[list[SentenceScore], Precision]:
        """Each text's tokens scored left to right from ``<eos>`` (the closing ``<eos>`` too with
        ``count_eos``)."""
        chosen = model.precision(precision, self.default_precision)
        with self.admission.admit(), model.in_use():
            encoded, targets = model.score_targets(texts, count_eos)
            scored = await self._run((model.ref, "score", chosen), targets, partial(model.score_rows, chosen),
                                     padded=True)
            return [model.sentence_score(*row) for row in zip(encoded, targets, scored, strict=True)], chosen

    async def classify(self, model: SentimentRuntime, texts: Sequence[str],
                       precision: Precision | None) -> tuple[list[Classification], Precision]:
        """The label and per-label probabilities of each text; a text with no tokens is refused."""
        chosen = model.precision(precision, self.default_precision)
        with self.admission.admit(), model.in_use():
            encoded = model.encode(texts)
            probabilities = await self._run((model.ref, "classify", chosen), [t.ids for t in encoded],
                                            partial(model.classify_rows, chosen), padded=True)
            return [model.classification(t, p) for t, p in zip(encoded, probabilities, strict=True)], chosen

    # -- queueing, grouping, running --------------------------------------------------------

    async def _run(self, key: Hashable, rows: Sequence[Row], run: Callable[[list[Row]], list[Result]],
                   padded: bool) -> list[Result]:
        """``run(rows)`` for this request's ``rows`` on the inference thread, grouped with rows of
        other requests under the same ``key`` when batching (``run`` must then be the same
        function for the key). A group goes to the inference thread whole; with ``padded`` its
        rows (token-id lists) are cut into calls of similar length (`length_buckets`)."""
        loop = asyncio.get_running_loop()
        queue = self._queues.setdefault(key, _Queue(run, padded))
        request: _Request[Row, Result] = _Request(list(rows), loop.create_future(), time.perf_counter())
        queue.requests.append(request)
        queue.rows += len(request.rows)
        if not self._busy:
            if queue.rows >= self.max_size or self.admission.outstanding <= 1 or self.max_wait <= 0:
                self._dispatch(key)
            elif queue.timer is None:
                queue.timer = loop.call_later(self.max_wait, self._on_timer, key)
        return await request.future

    def _on_timer(self, key: Hashable) -> None:
        queue = self._queues.get(key)
        if queue is None:
            return
        queue.timer = None
        if not self._busy and queue.requests:
            self._dispatch(key)

    def _dispatch(self, key: Hashable) -> None:
        """Take the group at the head of ``key``'s queue to the inference thread."""
        queue = self._queues[key]
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None
        taken: list[_Request[Any, Any]] = []
        size = 0
        while queue.requests and (not taken or (self.batching and size + len(queue.requests[0].rows) <= self.max_size)):
            request = queue.requests.pop(0)
            taken.append(request)
            size += len(request.rows)
        queue.rows -= size
        if not queue.requests:
            del self._queues[key]
        self._busy = True
        task = asyncio.get_running_loop().create_task(self._execute(queue, taken))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _execute(self, queue: _Queue[Any, Any], taken: list[_Request[Any, Any]]) -> None:
        rows = [row for request in taken for row in request.rows]
        call = partial(run_in_length_buckets, queue.run) if queue.padded else queue.run
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, call, rows)
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

    def close(self) -> None:
        """Stop taking work: pending groups are cancelled, the inference thread ends after its call."""
        for task in self._running:
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


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


def run_in_length_buckets(run: Callable[[list[list[int]]], list[Result]], rows: list[list[int]]) -> list[Any]:
    """``run`` over ``rows`` (token-id lists) in length buckets, results in the rows' order. An
    empty row needs no call: its result is an empty list (no token to score)."""
    results: list[Any] = [[] for _ in rows]
    pending = [i for i, row in enumerate(rows) if row]
    for bucket in length_buckets([len(rows[i]) for i in pending]):
        indices = [pending[b] for b in bucket]
        for i, result in zip(indices, run([rows[i] for i in indices]), strict=True):
            results[i] = result
    return results
