"""The one error envelope, ``{"error": {"code", "message", "details"}}``, and the handlers that
turn every failure into it. Responses never carry a stack trace, and validation errors never
echo what the client sent."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

# Validation details are capped so a body with thousands of bad items gets a small answer.
MAX_REPORTED_ERRORS = 20
MAX_LOCATION_CHARS = 64

HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    401: "unauthorized",
    403: "forbidden",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "overloaded",
    431: "headers_too_large",
    503: "not_ready",
}


class ServiceError(Exception):
    """A failure the client is told about: HTTP status, stable machine-readable code, a message
    for people, and optional structured details (never the client's text)."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, details: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers


class ModelNotFound(ServiceError):
    status, code = 404, "model_not_found"


class WrongTask(ServiceError):
    status, code = 422, "wrong_task"


class TooManyTokens(ServiceError):
    status, code = 422, "too_many_tokens"


class NoTokens(ServiceError):
    status, code = 422, "empty_text"


class InvalidStopWord(ServiceError):
    status, code = 422, "invalid_stop_word"


class InvalidJSON(ServiceError):
    status, code = 422, "invalid_json"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class Overloaded(ServiceError):
    status, code = 429, "overloaded"


class DeadlineExceeded(ServiceError):
    status, code = 504, "deadline_exceeded"


class ClientClosedRequest(ServiceError):
    """The client went away before its answer; nobody reads this (nginx's 499, for the metrics)."""

    status, code = 499, "client_closed_request"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class AdminDisabled(ServiceError):
    status, code = 403, "admin_disabled"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class ModelUnavailable(ServiceError):
    status, code = 503, "model_unavailable"


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "details": details}}, status_code=status, headers=headers
    )


def _safe_location(loc: tuple | list) -> list[str | int]:
    return [part if isinstance(part, int) else str(part)[:MAX_LOCATION_CHARS] for part in loc]


def validation_details(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """Pydantic errors without ``input`` (the client's own data) and with only scalar context
    (limits, patterns), at most ``MAX_REPORTED_ERRORS`` of them."""
    reported = []
    for error in errors[:MAX_REPORTED_ERRORS]:
        entry: dict[str, Any] = {
            "loc": _safe_location(error.get("loc", ())),
            "type": error.get("type"),
            "msg": error.get("msg"),
        }
        context = {k: v for k, v in (error.get("ctx") or {}).items() if isinstance(v, int | float | str | bool)}
        if context and error.get("type") != "value_error":
            entry["ctx"] = context
        reported.append(entry)
    return {"errors": reported, "total": len(errors)}


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(InvalidJSON.status, InvalidJSON.code, "the request body is not valid JSON")
    return error_response(
        422, "validation_error", "the request does not match the schema", validation_details(errors)
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = HTTP_CODES.get(exc.status_code, "http_error")
    message = {
        404: "no such endpoint",
        405: f"{request.method} is not allowed here",
    }.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, code, message, None, exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal error; the server log has the details")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
