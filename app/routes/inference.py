"""POST /predict-next, /score and /sentiment: validate, resolve the model, hand the work to the
scheduler with the request's deadline, and answer — unless the client has gone away, in which case
the work is cancelled (its rows never reach onnxruntime) and nobody is answered."""

# No `from __future__ import annotations`: the request classes are built per app (they carry the
# configured limits), and FastAPI must see them as real objects in the signatures below.

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import (
    ClientClosedRequest,
    InvalidJSON,
    Overloaded,
    ServiceError,
    UnsupportedMediaType,
    error_response,
)
from app.routes.deps import Registry, Scheduler
from app.runtime import Tokenised
from app.sampling import GeneratedToken, SampleEnd, Sampling
from app.scheduler import Admission, Prompt
from app.schemas import (
    Completion,
    GeneratedSample,
    GenerateResponse,
    ModelRef,
    NextWord,
    PredictNextResponse,
    RequestSchemas,
    ScoreConventions,
    ScoreResponse,
    SentimentResponse,
    SentimentResult,
    TextScore,
    TokenLogProb,
    error_responses,
)
from app.text import EOS

log = logging.getLogger(__name__)


class JSONBodyRoute(APIRoute):
    """Checks a body before FastAPI parses it: JSON media type or 415, UTF-8 or 422 ``invalid_json``
    (FastAPI's own answer would be a bare 400). Routes without a body are left alone."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def check_body(request: Request) -> Response:
            media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "application/json" and not media_type.endswith("+json"):
                raise UnsupportedMediaType("send the body as application/json", {"accepted": ["application/json"]})
            try:
                (await request.body()).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidJSON("the request body is not UTF-8") from None
            try:
                return await handler(request)
            except HTTPException as e:
                # FastAPI's answer when the JSON parser itself fails (a RecursionError on deeply nested
                # arrays): still a body that is not JSON we can read.
                if e.status_code == 400:
                    raise InvalidJSON("the request body is not valid JSON (nested too deeply)") from None
                raise

        return check_body


class LoadShedding:
    """Pure ASGI middleware: while the inference queue is over the admission bound, a request to an
    inference endpoint is refused (429, in the envelope) before its body is read, parsed or
    tokenised. Under a flood of clients that retry at once, refusals are most of the traffic, and
    they take event-loop time from the requests that were admitted: here they cost next to nothing."""

    def __init__(self, app: ASGIApp, admission: Admission, paths: frozenset[str]):
        self.app = app
        self.admission = admission
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            try:
                self.admission.check()
            except Overloaded as e:
                await error_response(e.status, e.code, e.message, e.details, e.headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


INFERENCE_PATHS = frozenset({"/predict-next", "/score", "/sentiment", "/generate"})


ERRORS = error_responses({
    404: "Unknown model or version (`model_not_found`).",
    413: "Body over the size limit (`body_too_large`).",
    415: "Body is not `application/json` (`unsupported_media_type`).",
    422: "Body fails the schema (`validation_error`), is not JSON or not UTF-8 (`invalid_json`), a text has "
         "too many tokens (`too_many_tokens`) or none (`empty_text`), the model is of another task "
         "(`wrong_task`) or has no graphs of the precision asked for (`precision_unavailable`).",
    429: "The service is at capacity: the request would wait longer than the admission bound (`overloaded`, "
         "with `Retry-After` in seconds).",
    504: "The request's deadline (the service's timeout, or `X-Request-Timeout-Ms`) passed before its answer "
         "(`deadline_exceeded`).",
    503: "Models still loading (`not_ready`) or the model is out of service (`model_unavailable`).",
})


T = TypeVar("T")
RANDOM_SEEDS = 2**31  # seeds chosen for requests that give none: short enough to read and type
TIMEOUT_HEADER = "X-Request-Timeout-Ms"
MAX_TIMEOUT_MS = 600_000


async def request_deadline(
    timeout_ms: Annotated[float | None, Header(
        alias=TIMEOUT_HEADER, gt=0, le=MAX_TIMEOUT_MS,
        description="Answer within this many milliseconds or not at all (504 `deadline_exceeded`); the "
        "service's own timeout applies when this is longer or absent.",
    )] = None,
) -> float | None:
    """The request's deadline in event-loop time, when the client set one."""
    return None if timeout_ms is None else asyncio.get_running_loop().time() + timeout_ms / 1000


Deadline = Annotated[float | None, Depends(request_deadline)]


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result, or, if the client goes away first, ``work`` cancelled (a request still
    queued leaves the queue before its rows reach onnxruntime) and `ClientClosedRequest`."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if task not in done:
        raise ClientClosedRequest("the client closed the connection before its answer was ready")
    return task.result()


def _ref(model: Any) -> ModelRef:
    return ModelRef(name=model.name, version=model.version)


def _texts(body: Any) -> list[str]:
    return [body.text] if body.texts is None else body.texts


def _tokens(text: Tokenised) -> dict[str, list[str]]:
    return {"tokens": text.tokens, "unknown": text.unknown}


def inference_router(requests: RequestSchemas) -> APIRouter:
    router = APIRouter(tags=["inference"], route_class=JSONBodyRoute, responses=ERRORS)

    @router.post("/predict-next", summary="Most probable next words after a prefix")
    async def predict_next(body: requests.predict_next, registry: Registry, scheduler: Scheduler,
                           request: Request, deadline: Deadline) -> PredictNextResponse:
        """Top-k next words after the prefix, from the language model's distribution at the last
        position (natural-log probabilities). Special tokens are left out unless `include_special`.
        A prefix that extends one seen before runs only its new words.

        With `complete_last_word`, a prefix that ends mid-word (`"the stock mar"`) is answered with
        the words completing it (`market`, `marketing`, ...) from the distribution after the words
        before it, and `completion` says how much of that distribution they cover."""
        model = registry.language_model(body.model)
        result, precision = await unless_disconnected(request, scheduler.predict_next(
            model, body.text, body.top_k, body.include_special, body.precision, deadline,
            body.complete_last_word))
        return PredictNextResponse(
            model=_ref(model),
            precision=precision,
            **_tokens(result.context),
            predictions=[NextWord(word=w.word, probability=w.probability, log_prob=w.log_prob) for w in result.words],
            completion=None if result.completion is None else Completion(
                prefix=result.completion.prefix, matches=result.completion.matches,
                coverage=result.completion.coverage),
        )

    @router.post("/score", summary="Log-probability and perplexity of texts")
    async def score(body: requests.score, registry: Registry, scheduler: Scheduler, request: Request,
                    deadline: Deadline) -> ScoreResponse:
        """Per-token natural-log probabilities of each text given its left context (starting from
        `<eos>`), their total, the token count and perplexity. With `rank`, also the texts ordered
        by total log-probability, for rescoring an n-best list."""
        model = registry.language_model(body.model)
        scores, precision = await unless_disconnected(request, scheduler.score(
            model, _texts(body), body.count_eos, body.precision, deadline))
        results = [
            TextScore(
                index=index, **_tokens(s.text),
                token_log_probs=[TokenLogProb(token=t, log_prob=lp) for t, lp in s.token_log_probs],
                total_log_prob=s.total_log_prob, token_count=s.token_count, perplexity=s.perplexity,
            )
            for index, s in enumerate(scores)
        ]
        ranking = sorted(range(len(scores)), key=lambda i: (-scores[i].total_log_prob, i)) if body.rank else None
        return ScoreResponse(
            model=_ref(model),
            precision=precision,
            conventions=ScoreConventions(context_start=EOS, closing_eos_counted=body.count_eos),
            results=results,
            ranking=ranking,
        )

    @router.post("/sentiment", summary="Sentiment label and per-label probabilities")
    async def sentiment(body: requests.sentiment, registry: Registry, scheduler: Scheduler, request: Request,
                        deadline: Deadline) -> SentimentResponse:
        """The most probable label of each text and the probability of every label."""
        model = registry.sentiment_model(body.model)
        classifications, precision = await unless_disconnected(request, scheduler.classify(
            model, _texts(body), body.precision, deadline))
        return SentimentResponse(
            model=_ref(model),
            precision=precision,
            labels=model.labels,
            results=[
                SentimentResult(index=index, label=c.label, probabilities=c.probabilities, **_tokens(c.text))
                for index, c in enumerate(classifications)
            ],
        )

    @router.post(
        "/generate", summary="Continue a prompt by sampling from the language model",
        responses={200: {"content": {"text/event-stream": {
            # One server-sent event, as OpenAPI 3.2 describes event streams (and schemathesis checks them).
            "schema": {"type": "object", "required": ["event", "data"], "properties": {
                "event": {"type": "string", "enum": ["token", "done", "error"]},
                "data": {"type": "string", "description": "JSON: `{index, token, log_prob}` for `token`, the "
                         "response below for `done`, the error envelope for `error`."},
            }},
            "example": 'event: token\ndata: {"index": 0, "token": "it", "log_prob": -1.59}\n\n'
                       'event: token\ndata: {"index": 0, "token": "expects", "log_prob": -3.72}\n\n'
                       'event: done\ndata: {"model": {"name": "ptb-lm", "version": 2}, ..., "samples": [...]}\n\n',
        }}, "description": "The generated samples; with `stream`, server-sent events instead."}},
    )
    async def generate(body: requests.generate, registry: Registry, scheduler: Scheduler, request: Request,
                       deadline: Deadline) -> GenerateResponse:
        """Sample a continuation of the prompt from the language model, token by token: temperature,
        top-k and nucleus (top-p) sampling, or the most probable token at temperature 0. A sample
        ends at `<eos>`, at a stop word or after `max_tokens`. The same request with the same `seed`
        writes the same tokens, streamed or not. The prompt reads from the prefix cache; each new
        token costs one LSTM step.

        With `"stream": true` (or `Accept: text/event-stream`) the answer is server-sent events: one
        `token` event per token as it is chosen, then `done` with the response below; errors before
        the first event are answered as usual, later ones as an `error` event with the error
        envelope. A client that goes away stops the generation."""
        model = registry.language_model(body.model)
        seed = secrets.randbelow(RANDOM_SEEDS) if body.seed is None else body.seed
        events = scheduler.generate(
            model, body.text, Sampling(body.temperature, body.top_k, body.top_p), body.max_tokens, body.n, seed,
            body.stop, body.allow_unk, body.precision, deadline)
        transcript = _Transcript(_ref(model), seed, body.n)
        # On an error or a disconnect the generator has finished (or is cancelled) inside these calls.
        transcript.add(await unless_disconnected(request, anext(events)))
        if not (body.stream or "text/event-stream" in request.headers.get("accept", "")):
            await unless_disconnected(request, transcript.read_all(events))
            return transcript.response()
        return StreamingResponse(transcript.stream(events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router


class _Transcript:
    """A generation's events gathered into the response, as they come (streamed or not)."""

    def __init__(self, model: ModelRef, seed: int, n: int):
        self.model, self.seed = model, seed
        self.prompt: Prompt | None = None
        self.tokens: list[list[str]] = [[] for _ in range(n)]
        self.log_probs: list[list[float]] = [[] for _ in range(n)]
        self.reasons: list[str] = ["length"] * n

    def add(self, event: Prompt | GeneratedToken | SampleEnd) -> None:
        if isinstance(event, Prompt):
            self.prompt = event
        elif isinstance(event, GeneratedToken):
            self.tokens[event.index].append(event.token)
            self.log_probs[event.index].append(event.log_prob)
        else:
            self.reasons[event.index] = event.reason

    async def read_all(self, events: AsyncIterator[Any]) -> None:
        async for event in events:
            self.add(event)

    def response(self) -> GenerateResponse:
        assert self.prompt is not None
        return GenerateResponse(
            model=self.model, precision=self.prompt.precision, seed=self.seed, **_tokens(self.prompt.context),
            samples=[GeneratedSample(index=i, tokens=tokens, log_probs=self.log_probs[i], text=" ".join(tokens),
                                     finish_reason=self.reasons[i]) for i, tokens in enumerate(self.tokens)],
        )

    async def stream(self, events: AsyncIterator[Any]) -> AsyncIterator[str]:
        """Server-sent events: ``token`` per token, then ``done`` (the response) or ``error``."""
        try:
            async for event in events:
                self.add(event)
                if isinstance(event, GeneratedToken):
                    yield _event("token", {"index": event.index, "token": event.token, "log_prob": event.log_prob})
            yield _event("done", self.response().model_dump(mode="json"))
        except ServiceError as e:
            yield _event("error", {"error": {"code": e.code, "message": e.message, "details": e.details}})
        except Exception:
            log.exception("generation failed after its stream began")
            yield _event("error", {"error": {"code": "internal_error", "message": "the generation failed",
                                             "details": None}})
        finally:
            await events.aclose()


def _event(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
