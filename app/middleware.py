"""Pure ASGI middleware: the request-body size limit and the request metrics."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_response
from app.metrics import ServiceMetrics

UNMATCHED = "<unmatched>"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client went away before the answer


class BodySizeLimit:
    """Answers 413 (in the error envelope) when a request body exceeds ``max_bytes``. Bytes are
    counted as they arrive, so a chunked body without Content-Length is cut off too; reading
    stops at the limit. The body is buffered (at most ``max_bytes``) and replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            received += len(body)
            if received > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, "body_too_large", f"the request body is larger than {self.max_bytes} bytes",
            {"limit_bytes": self.max_bytes}, headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class RequestMetrics:
    """Counts requests and errors and times them, labelled by route template (``/models/{name}``),
    never by raw path, so the number of label values stays bounded."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        # Until the app answers: an app that raises is answered 500 by the error handlers; one that
        # returns without answering saw the client go (a disconnect, or the server's read timeout).
        status = 500
        answered = False
        root_path = scope.get("root_path", "")

        async def send_and_record(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
            if not answered:
                status = CLIENT_CLOSED_REQUEST
        finally:
            endpoint = getattr(scope.get("route"), "path", None)
            if endpoint is None and scope.get("root_path", "") != root_path:
                # A mounted app (the docs assets) answered; routing moved its prefix into root_path.
                endpoint = scope["root_path"][len(root_path):]
            endpoint = endpoint or UNMATCHED
            self.metrics.observe_request(scope["method"], endpoint, status, time.perf_counter() - started)
