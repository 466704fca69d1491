"""The HTTP API's request and response bodies. Requests are strict (a number where a string
belongs is a 422) and refuse unknown keys. The request classes are built per app by
``request_schemas`` so the configured limits are both enforced and published in the OpenAPI schema."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.manifest import MODEL_NAME_MAX_CHARS, MODEL_SPEC_PATTERN, Precision

MAX_TOP_K = 100
MAX_GENERATE_TOKENS = 200
MAX_SAMPLES = 8
MAX_STOP_WORDS = 16
MAX_SEED = 2**53 - 1  # JavaScript's numbers are exact up to here: a browser can send back any seed


@dataclass(frozen=True)
class Limits:
    max_text_chars: int
    max_texts: int
    max_text_tokens: int


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _one_of_text_or_texts(request: BaseModel) -> None:
    if len({"text", "texts"} & request.model_fields_set) != 1:
        raise ValueError("give exactly one of 'text' and 'texts'")


# Optional fields below default to None meaning "not given"; their JSON schema does not allow
# null, and strict validation refuses an explicit null.
ModelSpec = Annotated[
    str,
    Field(
        pattern=MODEL_SPEC_PATTERN,
        max_length=MODEL_NAME_MAX_CHARS + 10,  # "@" and a version of at most 9 digits
        description="Model to use: `name` (its highest version in service) or `name@version`. "
        "Default: the task's default model (`ptb-lm` / `sst2-sentiment` when present).",
        examples=["ptb-lm", "ptb-lm@1"],
    ),
]

PrecisionField = Annotated[
    Precision,
    Field(
        description="Graphs to run: `float32`, or `int8` (the language model's output layer in int8 at fixed "
        "scales: faster, numbers within about 1e-2 of float32's, the same answer whatever else the service is "
        "doing; 422 `precision_unavailable` for a model without int8 graphs). Default: the service's "
        "configured default precision where the model has it, else float32.",
    ),
]
PrecisionUsed = Annotated[Precision, Field(description="Precision of the graphs that answered.")]

ONE_OF_TEXT_OR_TEXTS: dict[str, Any] = {"oneOf": [{"required": ["text"]}, {"required": ["texts"]}]}


@dataclass(frozen=True)
class RequestSchemas:
    predict_next: type[_Request]
    score: type[_Request]
    sentiment: type[_Request]
    generate: type[_Request]


def request_schemas(limits: Limits) -> RequestSchemas:
    """Request bodies with ``limits`` as JSON-schema constraints (``maxLength``, ``maxItems``)."""
    token_rule = f"at most {limits.max_text_tokens} tokens after normalisation (else 422 too_many_tokens)"
    Text = Annotated[
        str, Field(max_length=limits.max_text_chars, description=f"At most {limits.max_text_chars} characters, "
                   f"{token_rule}.")
    ]
    Texts = Annotated[
        list[Text],
        Field(min_length=1, max_length=limits.max_texts,
              description=f"1 to {limits.max_texts} texts, each at most {limits.max_text_chars} characters and "
              f"{token_rule}."),
    ]

    class PredictNextRequest(_Request):
        """The prefix of a sentence whose next word is wanted."""

        model_config = ConfigDict(json_schema_extra={"examples": [
            {"text": "the company said it", "top_k": 3},
            {"text": "the stock mar", "top_k": 3, "complete_last_word": True},
        ]})

        text: Text = Field(
            "", description=f"Prefix; empty asks for the first word of a sentence. At most "
            f"{limits.max_text_chars} characters and {limits.max_text_tokens} tokens.",
        )
        top_k: int = Field(5, ge=1, le=MAX_TOP_K, description="How many words to return.")
        include_special: bool = Field(False, description="Also rank `<eos>`, `<unk>` and `<pad>`.")
        complete_last_word: bool = Field(
            False, description="Treat the last word as still being typed (a keyboard or search box: \"the stock "
            "mar\"): answer the vocabulary words that start with it, ranked by the distribution after the words "
            "before it, and say which share of that distribution they cover (`completion`). Text ending in "
            "whitespace or punctuation has no word being typed and gets next words as usual. The partial word is "
            "normalised like any other (lower case, numbers as `N` for PTB).",
        )
        model: ModelSpec = None  # type: ignore[assignment]
        precision: PrecisionField = None  # type: ignore[assignment]

    class ScoreRequest(_Request):
        """Texts to score with the language model. Give exactly one of `text` and `texts`."""

        model_config = ConfigDict(json_schema_extra={
            **ONE_OF_TEXT_OR_TEXTS,
            "examples": [{"texts": ["the stock fell", "the stock fel"], "rank": True}],
        })

        text: Text = None  # type: ignore[assignment]
        texts: Texts = None  # type: ignore[assignment]
        count_eos: bool = Field(True, description="Score the closing `<eos>` too (the PTB perplexity convention).")
        rank: bool = Field(
            False, description="Also return the texts' indices ranked by total log-probability, best first "
            "(n-best rescoring).",
        )
        model: ModelSpec = None  # type: ignore[assignment]
        precision: PrecisionField = None  # type: ignore[assignment]

        @model_validator(mode="after")
        def _one_text_field(self) -> ScoreRequest:
            _one_of_text_or_texts(self)
            return self

    class SentimentRequest(_Request):
        """Texts to classify. Give exactly one of `text` and `texts`."""

        model_config = ConfigDict(json_schema_extra={
            **ONE_OF_TEXT_OR_TEXTS,
            "examples": [{"text": "a gorgeous, witty film"}],
        })

        text: Text = None  # type: ignore[assignment]
        texts: Texts = None  # type: ignore[assignment]
        model: ModelSpec = None  # type: ignore[assignment]
        precision: PrecisionField = None  # type: ignore[assignment]

        @model_validator(mode="after")
        def _one_text_field(self) -> SentimentRequest:
            _one_of_text_or_texts(self)
            return self

    class GenerateRequest(_Request):
        """A prompt for the language model to continue, and how to sample."""

        model_config = ConfigDict(json_schema_extra={"examples": [
            {"text": "the company said", "max_tokens": 12, "temperature": 0.8, "top_k": 40, "seed": 7},
            {"text": "stock prices", "max_tokens": 20, "stream": True, "seed": 1},
        ]})

        text: Text = Field(
            "", description=f"Prompt; empty starts a new sentence. At most {limits.max_text_chars} characters and "
            f"{limits.max_text_tokens} tokens.",
        )
        max_tokens: int = Field(20, ge=1, le=MAX_GENERATE_TOKENS, description="Most tokens to write per sample.")
        temperature: float = Field(
            1.0, ge=0, le=5, description="Below 1 sharper, above 1 flatter than the model's distribution; 0 always "
            "takes the most probable token (then `seed`, `top_k` and `top_p` change nothing).",
        )
        top_k: int = Field(None, ge=1, le=10_000,  # type: ignore[assignment]
                           description="Sample only among the k most probable tokens. Default: all.")
        top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: only among the most probable tokens "
                             "that together hold this much probability.")
        seed: int = Field(None, ge=0, le=MAX_SEED,  # type: ignore[assignment]
                          description="Same seed and request, same text. Default: a random seed, returned in the "
                          "response so the text can be reproduced.")
        stop: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
            [], max_length=MAX_STOP_WORDS, description="Words that end a sample (not included), normalised like "
            "text; each must be one vocabulary word (else 422 `invalid_stop_word`). `<eos>` always ends a sample.",
        )
        n: int = Field(1, ge=1, le=MAX_SAMPLES, description="Independent samples to write.")
        allow_unk: bool = Field(False, description="Let the model write `<unk>` (never written otherwise).")
        stream: bool = Field(
            False, description="Answer as server-sent events (`text/event-stream`): an event `token` "
            "(`{index, token, log_prob}`) per token as it is chosen, then `done` with the whole response as "
            "without streaming, or `error` (the error envelope) if something fails after the stream began.",
        )
        model: ModelSpec = None  # type: ignore[assignment]
        precision: PrecisionField = None  # type: ignore[assignment]

    return RequestSchemas(PredictNextRequest, ScoreRequest, SentimentRequest, GenerateRequest)


class ModelRef(_Response):
    name: str
    version: int


class NextWord(_Response):
    word: str
    probability: float = Field(description="In [0, 1].")
    log_prob: float = Field(description="Natural log of `probability`.")


class Completion(_Response):
    prefix: str = Field(description="The word being typed, normalised (e.g. `mar`).")
    matches: int = Field(description="Vocabulary words that start with `prefix` (special tokens left out).")
    coverage: float = Field(description="Total probability of those words after the context: how likely it is "
                            "that the word being typed is one the model knows.")


class PredictNextResponse(_Response):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": {"name": "ptb-lm", "version": 1},
        "precision": "float32",
        "tokens": ["the", "company", "said", "it"],
        "unknown": [],
        "predictions": [
            {"word": "will", "probability": 0.0912, "log_prob": -2.3948},
            {"word": "is", "probability": 0.0674, "log_prob": -2.6971},
            {"word": "has", "probability": 0.0532, "log_prob": -2.9337},
        ],
    }]})

    model: ModelRef
    precision: PrecisionUsed
    tokens: list[str] = Field(description="The prefix as the model saw it, after normalisation, "
                              "unknown words as `<unk>`; the context also starts with an implicit `<eos>`.")
    unknown: list[str] = Field(description="The words that became `<unk>`, in order.")
    predictions: list[NextWord] = Field(description="Most probable first.")
    completion: Completion | None = Field(
        None, description="With `complete_last_word` and a word being typed: that word and how much of the "
        "distribution its completions cover; `predictions` are then those completions (possibly none). "
        "`tokens` leave the word being typed out.",
    )


class ScoreConventions(_Response):
    log_base: Literal["e"] = Field("e", description="Log-probabilities are natural logs.")
    context_start: str = Field(description="Token the model is fed before each text.")
    closing_eos_counted: bool = Field(description="Whether the closing `<eos>` is scored and counted.")
    perplexity: Literal["exp(-total_log_prob / token_count)"] = "exp(-total_log_prob / token_count)"


class TokenLogProb(_Response):
    token: str
    log_prob: float = Field(description="Natural log of the token's probability given its left context.")


class TextScore(_Response):
    index: int = Field(description="Position of the text in the request.")
    tokens: list[str] = Field(description="The text after normalisation, unknown words as `<unk>`.")
    unknown: list[str]
    token_log_probs: list[TokenLogProb] = Field(description="One per scored token, closing `<eos>` last when counted.")
    total_log_prob: float
    token_count: int
    perplexity: float | None = Field(description="exp(-total_log_prob / token_count); null when nothing was scored.")


class ScoreResponse(_Response):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": {"name": "ptb-lm", "version": 1},
        "precision": "float32",
        "conventions": {"log_base": "e", "context_start": "<eos>", "closing_eos_counted": True,
                        "perplexity": "exp(-total_log_prob / token_count)"},
        "results": [{
            "index": 0, "tokens": ["the", "stock", "fell"], "unknown": [],
            "token_log_probs": [{"token": "the", "log_prob": -2.91}, {"token": "stock", "log_prob": -6.12},
                                {"token": "fell", "log_prob": -5.02}, {"token": "<eos>", "log_prob": -3.3}],
            "total_log_prob": -17.35, "token_count": 4, "perplexity": 76.6,
        }],
        "ranking": None,
    }]})

    model: ModelRef
    precision: PrecisionUsed
    conventions: ScoreConventions
    results: list[TextScore] = Field(description="In request order.")
    ranking: list[int] | None = Field(description="With `rank`: text indices by total log-probability, best first.")


class SentimentResult(_Response):
    index: int = Field(description="Position of the text in the request.")
    label: str
    probabilities: dict[str, float] = Field(description="Probability per label; they sum to 1.")
    tokens: list[str] = Field(description="The text after normalisation, unknown words as `<unk>`.")
    unknown: list[str]


class SentimentResponse(_Response):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": {"name": "sst2-sentiment", "version": 2},
        "precision": "float32",
        "labels": ["negative", "positive"],
        "results": [{"index": 0, "label": "positive", "probabilities": {"negative": 0.04, "positive": 0.96},
                     "tokens": ["a", "gorgeous", ",", "witty", "film"], "unknown": []}],
    }]})

    model: ModelRef
    precision: PrecisionUsed
    labels: list[str]
    results: list[SentimentResult] = Field(description="In request order.")


class GeneratedSample(_Response):
    index: int = Field(description="Sample number, 0 to n - 1.")
    tokens: list[str] = Field(description="The tokens written, in order (no `<eos>`, no stop word).")
    log_probs: list[float] = Field(description="Natural-log probability of each token under the model, before "
                                   "temperature, top-k and top-p.")
    text: str = Field(description="The tokens joined by spaces (the corpus's conventions: lower case, `N` for "
                      "numbers with PTB).")
    finish_reason: Literal["eos", "stop", "length"] = Field(
        description="`eos`: the model ended the sentence; `stop`: it wrote a stop word; `length`: `max_tokens`.")


class GenerateResponse(_Response):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": {"name": "ptb-lm", "version": 2},
        "precision": "float32",
        "seed": 7,
        "tokens": ["the", "company", "said"],
        "unknown": [],
        "samples": [{"index": 0, "tokens": ["it", "expects", "to", "complete", "the", "sale"],
                     "log_probs": [-1.59, -3.72, -0.21, -4.61, -0.9, -2.66],
                     "text": "it expects to complete the sale", "finish_reason": "eos"}],
    }]})

    model: ModelRef
    precision: PrecisionUsed
    seed: int = Field(description="The seed used (the request's, or the one chosen for it).")
    tokens: list[str] = Field(description="The prompt as the model saw it, after normalisation, unknown words "
                              "as `<unk>`.")
    unknown: list[str] = Field(description="The prompt's words that became `<unk>`, in order.")
    samples: list[GeneratedSample] = Field(description="One per sample, by index.")


class ModelVersionInfo(_Response):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "version": 2, "state": "serving", "reason": None, "files_changed": None, "task": "language-model",
        "created": "2025-01-01T00:00:00+00:00", "description": "2x650 tied LSTM on PTB", "vocab_size": 10000,
        "precisions": ["float32", "int8"], "labels": None, "architecture": {"layers": 2, "hidden_size": 650},
        "training": {"data": "ptb"}, "metrics": {"test": {"perplexity": 85.0}},
    }]})

    version: int
    state: Literal["loading", "serving", "failed", "unloaded"]
    reason: str | None = Field(description="Why the version is out of service, when it is.")
    files_changed: str | None = Field(
        None, description="A serving version whose files on disk no longer verify: why. It keeps serving what it "
        "loaded; restore the files, or remove the version's folder to retire it.")
    task: str | None
    created: str | None
    description: str | None
    vocab_size: int | None
    precisions: list[str] | None = Field(description="Precisions a request may ask for (`float32`, `int8`).")
    labels: list[str] | None
    architecture: dict[str, Any] | None
    training: dict[str, Any] | None
    metrics: dict[str, Any] | None


class ModelInfo(_Response):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "name": "ptb-lm", "task": "language-model", "default_version": 1,
        "versions": [{
            "version": 1, "state": "serving", "reason": None, "task": "language-model",
            "created": "2025-01-01T00:00:00+00:00", "description": "2x400 tied LSTM on PTB",
            "vocab_size": 10000, "precisions": ["float32", "int8"], "labels": None,
            "architecture": {"layers": 2, "hidden_size": 400, "embedding_size": 400, "tied": True},
            "training": {"dataset": "ptb"}, "metrics": {"valid_perplexity": 110.0, "test_perplexity": 106.0},
        }],
    }]})

    name: str
    task: str | None
    default_version: int | None = Field(description="Version served when a request names no version: the pinned "
                                        "one while it serves, else the highest version in service.")
    pinned_version: int | None = Field(None, description="Version pinned as the default by an operator, if any.")
    versions: list[ModelVersionInfo]


class ModelList(_Response):
    model_config = ConfigDict(json_schema_extra={"examples": [{"models": ModelInfo.model_json_schema()["examples"]}]})

    models: list[ModelInfo]


class Liveness(_Response):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "alive"}]})

    status: Literal["alive"] = "alive"


class Readiness(_Response):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ready", "serving": ["ptb-lm@1"],
                                                               "failed": [], "missing": []}]})

    status: Literal["ready"] = "ready"
    serving: list[str]
    failed: list[str]
    missing: list[str] = Field(description="Models in the store with no version in service.")


class AdminStatus(_Response):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "models": ModelInfo.model_json_schema()["examples"], "draining": ["ptb-lm@1"],
        "reconciles": {"start-up": 1, "periodic": 12, "admin": 1},
    }]})

    models: list[ModelInfo]
    draining: list[str] = Field(description="Retired versions still answering requests in flight.")
    reconciles: dict[str, int] = Field(description="Reconciles with the store since start-up, by trigger.")


class ReconcileResult(_Response):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "trigger": "admin", "loaded": ["ptb-lm@2"], "failed": ["ptb-lm@3"], "removed": ["ptb-lm@1"], "changed": [],
        "seconds": 1.3,
    }]})

    trigger: str
    loaded: list[str] = Field(description="Versions verified, warmed and put in service.")
    failed: list[str] = Field(description="Versions refused (see their reason in /models).")
    removed: list[str] = Field(description="Versions gone from the store, retired.")
    changed: list[str] = Field(description="Serving versions whose files changed on disk: replaced with other "
                               "content that verifies (now served), or no longer verifying (see `files_changed`).")
    seconds: float


class PinRequest(_Request):
    model_config = ConfigDict(json_schema_extra={"examples": [{"version": 1}]})

    version: int = Field(ge=1, description="A version in service to make the default.")


class ErrorBody(_Response):
    code: str = Field(description="Stable machine-readable code, e.g. `validation_error`, `model_not_found`.")
    message: str
    details: Any = Field(description="Structured context; never the client's text.")


class ErrorResponse(_Response):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "error": {"code": "model_not_found", "message": "there is no model 'nope'",
                  "details": {"available": ["ptb-lm@1"]}},
    }]})

    error: ErrorBody


def error_responses(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses: each one the error envelope, with a description."""
    return {status: {"model": ErrorResponse, "description": text} for status, text in descriptions.items()}
