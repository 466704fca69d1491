"""Access control: bearer keys for the inference endpoints and a bearer token for /metrics.

Keys are checked by ``BearerAuth``, a pure ASGI middleware that runs before the request body is read,
so a client without a key costs no body buffering, no JSON parsing and no model work. Keys are held
only as SHA-256 digests; a presented key's digest is compared in constant time with every accepted
digest. The admin API keeps its own token (``app.routes.admin``)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings
from app.errors import Unauthorized, error_response
from app.schemas import error_responses

REALM = 'Bearer realm="lstm-serve"'
METRICS_REALM = 'Bearer realm="lstm-serve metrics"'
DIGEST_HEX_CHARS = 64

UNAUTHORIZED = error_responses({
    401: "API keys are configured (`LSTM_SERVE_API_KEYS`, `LSTM_SERVE_API_KEY_HASHES_FILE`) and the request has "
         "no `Authorization: Bearer <key>` header, or not an accepted key (`unauthorized`).",
})


class BearerKeys:
    """The accepted keys, as SHA-256 digests."""

    def __init__(self, digests: Iterable[bytes]):
        self.digests = tuple(digests)

    @classmethod
    def of(cls, keys: Iterable[str]) -> BearerKeys:
        return cls(_digest(key) for key in keys)

    def accepts(self, key: str) -> bool:
        """Whether ``key`` is one of the keys. Every digest is compared, so the time taken does not
        depend on which key matched, or on how much of one did."""
        presented = _digest(key)
        matched = False
        for digest in self.digests:
            matched |= hmac.compare_digest(presented, digest)
        return matched


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def read_key_hashes(path: Path) -> list[bytes]:
    """SHA-256 digests from a file: one hex digest per line; blank lines and text after '#' are ignored.
    Raises ValueError naming the line of anything else, so a typo stops the service instead of
    locking clients out one by one."""
    digests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip().lower()
        if not text:
            continue
        if len(text) != DIGEST_HEX_CHARS or any(c not in "0123456789abcdef" for c in text):
            raise ValueError(f"{path}, line {number}: expected a SHA-256 hex digest ({DIGEST_HEX_CHARS} hex digits)")
        digests.append(bytes.fromhex(text))
    return digests


def inference_keys(settings: Settings) -> BearerKeys | None:
    """The inference endpoints' keys from ``LSTM_SERVE_API_KEYS`` and ``LSTM_SERVE_API_KEY_HASHES_FILE``;
    None (open) while neither is set. A setting that is set but holds no key is refused rather than
    read as 'open'."""
    if settings.api_keys is None and settings.api_key_hashes_file is None:
        return None
    digests: list[bytes] = []
    if settings.api_keys is not None:
        keys = [key.strip() for key in settings.api_keys.get_secret_value().split(",") if key.strip()]
        if not keys:
            raise ValueError("LSTM_SERVE_API_KEYS is set but holds no key")
        digests += BearerKeys.of(keys).digests
    if settings.api_key_hashes_file is not None:
        digests += read_key_hashes(settings.api_key_hashes_file)
    return BearerKeys(digests)


@dataclass(frozen=True)
class Guard:
    """Requests to ``routes`` (any method) need a bearer key from ``keys``; refusals name ``realm``."""

    routes: Sequence[BaseRoute]
    keys: BearerKeys
    realm: str
    scheme_name: str
    description: str

    def route_for(self, scope: Scope) -> BaseRoute | None:
        for route in self.routes:
            if route.matches(scope)[0] is not Match.NONE:
                return route
        return None


def access_guards(settings: Settings, inference: Sequence[BaseRoute], metrics: Sequence[BaseRoute]) -> list[Guard]:
    """The guards the settings ask for: API keys on the inference routes, the metrics token on /metrics."""
    guards = []
    keys = inference_keys(settings)
    if keys is not None:
        guards.append(Guard(inference, keys, REALM, "apiKey",
                            "An API key (`LSTM_SERVE_API_KEYS`, `LSTM_SERVE_API_KEY_HASHES_FILE`)."))
    if settings.metrics and settings.metrics_token is not None:
        guards.append(Guard(metrics, BearerKeys.of([settings.metrics_token.get_secret_value()]), METRICS_REALM,
                            "metricsToken", "The metrics token (`LSTM_SERVE_METRICS_TOKEN`)."))
    return guards


class BearerAuth:
    """Answers 401 in the error envelope, with ``WWW-Authenticate``, to a request for a guarded route
    that has no ``Authorization: Bearer <key>`` header (or a malformed one) or a key that is not accepted.
    Other requests pass untouched."""

    def __init__(self, app: ASGIApp, guards: Sequence[Guard]):
        self.app = app
        self.guards = guards

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for guard in self.guards:
                route = guard.route_for(scope)
                if route is None:
                    continue
                refusal = _refusal(guard, _bearer(scope))
                if refusal is not None:
                    # The request metrics label answers by route template; routing has not run yet.
                    scope["route"] = route
                    await error_response(refusal.status, refusal.code, refusal.message, None,
                                         refusal.headers)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _bearer(scope: Scope) -> str | None:
    """The token of the first Authorization header if it is ``Bearer <token>``, else None."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer":
                return None
            return token.strip() or None
    return None


def _refusal(guard: Guard, token: str | None) -> Unauthorized | None:
    if token is None:
        return Unauthorized("send a key as 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": guard.realm})
    if not guard.keys.accepts(token):
        return Unauthorized("the key is not valid",
                            headers={"WWW-Authenticate": f'{guard.realm}, error="invalid_token"'})
    return None


def document_guards(app: FastAPI, guards: Sequence[Guard]) -> None:
    """Add each guard's bearer scheme to the OpenAPI document, and require it on its operations, so
    Swagger UI's Authorize button sends the key."""
    if not guards:
        return
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()  # FastAPI caches it; what is added here is added once
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        for guard in guards:
            schemes[guard.scheme_name] = {"type": "http", "scheme": "bearer", "description": guard.description}
            for route in guard.routes:
                operations = schema["paths"].get(getattr(route, "path", ""), {})
                for method in getattr(route, "methods", ()):
                    if method.lower() in operations:
                        operations[method.lower()]["security"] = [{guard.scheme_name: []}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
