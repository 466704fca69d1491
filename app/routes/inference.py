"""POST /predict-next, /score and /sentiment."""

# No `from __future__ import annotations`: the request classes are built per app (they carry the
# configured limits), and FastAPI must see them as real objects in the signatures below.

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute

from app.errors import InvalidJSON, UnsupportedMediaType
from app.routes.deps import Registry, Scheduler
from app.runtime import Tokenised
from app.schemas import (
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
            return await handler(request)

        return check_body


ERRORS = error_responses({
    404: "Unknown model or version (`model_not_found`).",
    413: "Body over the size limit (`body_too_large`).",
    415: "Body is not `application/json` (`unsupported_media_type`).",
    422: "Body fails the schema (`validation_error`), is not JSON or not UTF-8 (`invalid_json`), a text has "
         "too many tokens (`too_many_tokens`) or none (`empty_text`), the model is of another task "
         "(`wrong_task`) or has no graphs of the precision asked for (`precision_unavailable`).",
    429: "Too many requests waiting for a model (`overloaded`).",
    503: "Models still loading (`not_ready`) or the model is out of service (`model_unavailable`).",
})


def _ref(model: Any) -> ModelRef:
    return ModelRef(name=model.name, version=model.version)


def _texts(body: Any) -> list[str]:
    return [body.text] if body.texts is None else body.texts


def _tokens(text: Tokenised) -> dict[str, list[str]]:
    return {"tokens": text.tokens, "unknown": text.unknown}


def inference_router(requests: RequestSchemas) -> APIRouter:
    router = APIRouter(tags=["inference"], route_class=JSONBodyRoute, responses=ERRORS)

    @router.post("/predict-next", summary="Most probable next words after a prefix")
    async def predict_next(body: requests.predict_next, registry: Registry,
                           scheduler: Scheduler) -> PredictNextResponse:
        """Top-k next words after the prefix, from the language model's distribution at the last
        position (natural-log probabilities). Special tokens are left out unless `include_special`.
        A prefix that extends one seen before runs only its new words."""
        model = registry.language_model(body.model)
        result, precision = await scheduler.predict_next(model, body.text, body.top_k, body.include_special,
                                                         body.precision)
        return PredictNextResponse(
            model=_ref(model),
            precision=precision,
            **_tokens(result.context),
            predictions=[NextWord(word=w.word, probability=w.probability, log_prob=w.log_prob) for w in result.words],
        )

    @router.post("/score", summary="Log-probability and perplexity of texts")
    async def score(body: requests.score, registry: Registry, scheduler: Scheduler) -> ScoreResponse:
        """Per-token natural-log probabilities of each text given its left context (starting from
        `<eos>`), their total, the token count and perplexity. With `rank`, also the texts ordered
        by total log-probability, for rescoring an n-best list."""
        model = registry.language_model(body.model)
        scores, precision = await scheduler.score(model, _texts(body), body.count_eos, body.precision)
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
    async def sentiment(body: requests.sentiment, registry: Registry, scheduler: Scheduler) -> SentimentResponse:
        """The most probable label of each text and the probability of every label."""
        model = registry.sentiment_model(body.model)
        classifications, precision = await scheduler.classify(model, _texts(body), body.precision)
        return SentimentResponse(
            model=_ref(model),
            precision=precision,
            labels=model.labels,
            results=[
                SentimentResult(index=index, label=c.label, probabilities=c.probabilities, **_tokens(c.text))
                for index, c in enumerate(classifications)
            ],
        )

    return router
