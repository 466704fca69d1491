"""The HTTP server: uvicorn on h11, with bounds for clients that misbehave and a drain on SIGTERM
that drops nothing, with one worker or several.

Why h11 and not httptools (uvicorn's default): h11 bounds the request line and headers it buffers
(``max_incomplete_event_size``) and tells a too-large head (431) from a malformed one (400);
httptools buffers a header of any size. On top of uvicorn's ``H11Protocol``, :class:`Protocol` adds

- a read deadline: a request's head and body must arrive within ``read_timeout`` of its first byte
  (of the connection opening, for the first request); a client that stalls is answered 408, or simply
  disconnected if it sent nothing;
- a bound on the head's size and header count checked on the parsed request too (h11's own bound
  only applies while a head is incomplete, so a larger head arriving in one read would pass it);
- a bound on open connections: at the bound, the connection idle the longest (no request in
  progress: silent, trickling headers, or kept alive) is closed to make room; when every connection
  has a request in progress, the new one is;
- errors in the service's envelope (``app.errors.error_response``) instead of uvicorn's text/plain 400,
  written before a lingering close (the rest of what the client sends is read and dropped for a
  moment) so that the answer is not destroyed by a reset;
- the drain: when uvicorn shuts down it calls each connection's ``shutdown()``; from then on
  readiness answers 503 (the lifespan state's :class:`Shutdown`), a request in progress completes,
  every response carries ``Connection: close``, an idle connection may still send one more request, and
  the keep-alive and read deadlines close whatever stays idle; a request still running when the grace
  period ends is answered 503 in the envelope (uvicorn would answer a text/plain 500).

Closing a listening socket resets every connection the kernel has completed but no one has accepted
yet. uvicorn's multi-worker parent holds the shared socket open until every worker has exited, so with
several workers the connections that arrived during the drain piled up in the backlog and were all
reset at the end. Here the socket is closed as soon as the stop begins (by the parent for several
workers, by :class:`Server` for one), and first :func:`stop_queueing` makes the kernel drop new
connection attempts (clients retry the SYN a second later and find the port closed: refused) and waits
until what is already queued has been accepted, so that no connection is reset.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import resource
import socket
import struct
import sys
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn import Config
from uvicorn import Server as UvicornServer
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState
from uvicorn.supervisors.multiprocess import Multiprocess

from app.config import Settings
from app.errors import error_response

log = logging.getLogger(__name__)

# Longest a connection's next request waits to be read after a 429 with Retry-After.
MAX_RETRY_HOLD = 1.0

# Key of the ASGI lifespan state (shallow-copied into every request's scope["state"]) under which the
# server keeps its Shutdown; readiness reads it.
SHUTDOWN = "shutdown"
# After an error answer, what the client still sends is read and dropped for this long, up to this much,
# before the connection is closed (closing with unread data would reset it).
LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20
# Descriptors kept for everything but client connections (model files, pipes, onnxruntime, logging).
RESERVED_DESCRIPTORS = 64
# A worker still running this long after the grace period is killed by the supervisor.
KILL_MARGIN_SECONDS = 5.0
# How long the accept queue may take to empty once no new connection enters it.
ACCEPT_QUEUE_WAIT_SECONDS = 1.0
SO_ATTACH_FILTER = 26  # Linux, <asm-generic/socket.h>
DROP_EVERY_PACKET = struct.pack("HBBI", 0x06, 0, 0, 0)  # one classic BPF instruction: BPF_RET|BPF_K 0
TCPI_UNACKED_OFFSET = 24  # struct tcp_info: 8 one-byte fields, then rto, ato, snd_mss, rcv_mss, unacked (u32)
ERROR_CODES = {400: "bad_request", 408: "request_timeout", 431: "headers_too_large", 501: "not_implemented",
               505: "http_version_not_supported"}


@dataclass
class Shutdown:
    """Whether this worker has begun to shut down. One object per worker, shared by every request
    (scope["state"] is a shallow copy), so a request already in progress sees it change too."""

    started: bool = False


@dataclass(frozen=True)
class ConnectionLimits:
    """What a connection may cost: ``head_bytes`` (request line and headers), ``headers`` (count),
    ``read_timeout`` (seconds for a request's head and body to arrive), ``connections`` (open at once)."""

    head_bytes: int
    headers: int
    read_timeout: float
    connections: int


class ServerConfig(Config):
    """uvicorn's configuration, plus the limits :class:`Protocol` enforces (pickled to each worker)."""

    def __init__(self, app: Any, *, limits: ConnectionLimits, **kwargs: Any):
        super().__init__(app, **kwargs)
        self.limits = limits


class RejectedRequest(h11.RemoteProtocolError):
    """A request h11 accepts that this server refuses (too large, too many headers, ambiguous framing)."""

    def __init__(self, message: str, status: int, details: dict[str, int] | None = None):
        super().__init__(message, status)
        self.details = details


class _RequestParser(h11.Connection):
    """h11's server side, which remembers the last protocol error (uvicorn's handler does not get
    it), checks each parsed request against the limits, and adds ``Connection: close`` to responses
    once ``closing`` is set."""

    def __init__(self, limits: ConnectionLimits):
        super().__init__(h11.SERVER, max_incomplete_event_size=limits.head_bytes)
        self.limits = limits
        self.error: h11.RemoteProtocolError | None = None
        self.closing = False
        self.retry_after: float | None = None  # seconds, from the last response when it was a 429

    def next_event(self) -> Any:
        try:
            event = super().next_event()
            if isinstance(event, h11.Request):
                self._check(event)
        except h11.RemoteProtocolError as exc:
            self.error = exc
            raise
        return event

    def _check(self, request: h11.Request) -> None:
        if len(request.headers) > self.limits.headers:
            raise RejectedRequest(f"the request has more than {self.limits.headers} headers", 431,
                                  {"limit_headers": self.limits.headers})
        # ': ' and CRLF per header, spaces and CRLF around the request line
        size = len(request.method) + len(request.target) + 12 + sum(len(n) + len(v) + 4 for n, v in request.headers)
        if size > self.limits.head_bytes:
            raise too_large(self.limits.head_bytes)
        names = {name for name, _ in request.headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            raise RejectedRequest("a request may not carry both Content-Length and Transfer-Encoding", 400)

    def send(self, event: Any) -> bytes | None:
        if isinstance(event, h11.Response):
            self.retry_after = _retry_after(event) if event.status_code == 429 else None
        if self.closing and isinstance(event, h11.Response):
            event = h11.Response(status_code=event.status_code, reason=event.reason, http_version=event.http_version,
                                 headers=[*event.headers, (b"connection", b"close")])
        return super().send(event)


class Protocol(H11Protocol):
    """uvicorn's h11 protocol with the read deadline, the connection bound, enveloped errors and the
    drain described in this module's docstring."""

    config: ServerConfig
    _last_refusal_logged = 0.0

    def __init__(self, config: ServerConfig, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None):
        super().__init__(config, server_state, app_state, _loop)
        self.limits = config.limits
        self.conn = _RequestParser(self.limits)
        self.app = answer_when_cancelled(self.app)
        self.shutdown_state: Shutdown = app_state.setdefault(SHUTDOWN, Shutdown())
        self.idle_since = 0.0
        self._read_timer: asyncio.TimerHandle | None = None
        self._linger_budget: int | None = None  # bytes still dropped before closing; None: not lingering
        self._held: asyncio.TimerHandle | None = None  # reading held back after a 429 (on_response_complete)

    # -- connection bound ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.idle_since = time.monotonic()
        self._read_timer = self.loop.call_later(self.limits.read_timeout, self._read_timed_out)
        if len(self.connections) > self.limits.connections:
            self._make_room()

    def _make_room(self) -> None:
        idle = [c for c in self.connections if c is not self and c.evictable]
        victim = min(idle, key=lambda c: c.idle_since) if idle else self
        now = time.monotonic()
        if now - Protocol._last_refusal_logged > 10:
            Protocol._last_refusal_logged = now
            log.warning("%d connections open (the bound is %d): closing %s", len(self.connections),
                        self.limits.connections, "the longest idle" if idle else "the new one")
        victim.transport.close()

    @property
    def evictable(self) -> bool:
        """No request in progress: silent, sending a head, idle between requests, or lingering."""
        return not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete)

    # -- read deadline ------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._linger_budget is not None:
            self._linger_budget -= len(data)
            if self._linger_budget < 0:
                self.transport.close()
            return
        if self._read_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._read_timer = self.loop.call_later(self.limits.read_timeout, self._read_timed_out)
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete and not self.cycle.more_body:
            self._cancel_read_timer()  # the request is in; how long the app takes is not the client's doing

    def on_response_complete(self) -> None:
        self.idle_since = time.monotonic()
        hold = self.conn.retry_after
        if hold and not self.transport.is_closing():
            # A 429 told the client to retry after `hold` seconds: its connection's next request is
            # read then (at most MAX_RETRY_HOLD later), not at once. The refusal itself went out at once;
            # what is held back is a client retrying in a loop, whose refusals would otherwise take the
            # event loop from the requests that were admitted.
            self.conn.retry_after = None
            self.transport.pause_reading()
            self._held = self.loop.call_later(min(hold, MAX_RETRY_HOLD), self._release)
            return
        super().on_response_complete()

    def _release(self) -> None:
        self._held = None
        if self.transport.is_closing():
            return
        self.transport.resume_reading()
        super().on_response_complete()

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started or not cycle.more_body:
                return  # the request was read in time; the response is under way
        elif not self.conn.trailing_data[0]:
            self.transport.close()  # nothing of a request arrived: no one to answer
            return
        timeout = self.limits.read_timeout
        self._answer_and_close(408, f"the request did not arrive within {timeout:g} s", {"timeout_seconds": timeout})

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_timer()
        if self._held is not None:
            self._held.cancel()
            self._held = None
        super().connection_lost(exc)

    # -- protocol errors in the envelope ------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        error = self.conn.error
        if error is not None and error.error_status_hint == 431 and not isinstance(error, RejectedRequest):
            error = too_large(self.limits.head_bytes)  # h11's own bound, on an incomplete head
        if isinstance(error, RejectedRequest):
            status, message, details = error.error_status_hint, str(error), error.details
        else:  # h11's messages quote the request; the envelope never echoes what the client sent
            status = error.error_status_hint if error is not None else 400
            message = {501: "only the chunked transfer coding is supported",
                       505: "only HTTP/1.0 and HTTP/1.1 are supported"}.get(status, "the request is not valid HTTP/1.1")
            details = None
        self.logger.debug("refused a request (%d): %s", status, message)
        self._answer_and_close(status, message, details)

    def _answer_and_close(self, status: int, message: str, details: Any = None) -> None:
        self._cancel_read_timer()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:  # a second answer would corrupt the first
                self.transport.close()
                return
            cycle.disconnected = True  # the app's receive() now returns http.disconnect
            cycle.message_event.set()
        self.transport.write(envelope_bytes(status, ERROR_CODES.get(status, "bad_request"), message, details))
        self._linger_budget = LINGER_BYTES
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _unsupported_upgrade_warning(self) -> None:
        # uvicorn warns, per request, that a WebSocket library is missing; there is nothing to fix
        self.logger.debug("served a request that asked for a protocol upgrade as HTTP/1.1")

    # -- drain --------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Called by uvicorn on every open connection when it starts shutting down."""
        self.shutdown_state.started = True
        self.conn.closing = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False


def answer_when_cancelled(app: ASGIApp) -> ASGIApp:
    """``app``, answering 503 in the envelope when it is cancelled before it has started its response:
    uvicorn cancels the requests still running when the grace period ends, and would answer them with
    a text/plain 500."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, receive, send_tracked)
        except asyncio.CancelledError:
            if started or scope["type"] != "http":
                raise
            response = error_response(503, "not_ready", "the service shut down before the request completed")
            await response(scope, receive, send)

    return guarded


def _retry_after(response: h11.Response) -> float | None:
    for name, value in response.headers:
        if name == b"retry-after":
            try:
                return float(value)
            except ValueError:
                return None
    return None


def too_large(limit: int) -> RejectedRequest:
    return RejectedRequest(f"the request line and headers are larger than {limit} bytes", 431, {"limit_bytes": limit})


def envelope_bytes(status: int, code: str, message: str, details: Any = None) -> bytes:
    """A whole HTTP/1.1 response carrying the error envelope, for answers written outside the app."""
    response = error_response(status, code, message, details)
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    lines += [name + b": " + value for name, value in response.raw_headers]
    lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + response.body


def stop_queueing(sock: socket.socket) -> bool:
    """Make the kernel drop every packet to the listening ``sock`` (a socket filter), so no new
    connection enters its accept queue. False where this is not possible (not Linux)."""
    program = ctypes.create_string_buffer(DROP_EVERY_PACKET)
    # struct sock_fprog {unsigned short len; struct sock_filter *filter;}; the kernel copies the program
    fprog = struct.pack("@HP", 1, ctypes.addressof(program))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError:
        return False
    return True


def queued_connections(sock: socket.socket) -> int:
    """Connections the kernel completed on the listening ``sock`` that no one has accepted yet
    (Linux reports them as ``tcpi_unacked`` of a listening socket); 0 where it cannot tell."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, AttributeError):
        return 0
    return struct.unpack_from("I", info, TCPI_UNACKED_OFFSET)[0]


class Server(UvicornServer):
    """uvicorn's server (one worker), which lets its accept queue empty before it closes the socket."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        deadline = time.monotonic() + ACCEPT_QUEUE_WAIT_SECONDS
        if all(stop_queueing(sock) for sock in sockets or []):
            while any(queued_connections(sock) for sock in sockets or []) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)  # the event loop accepts them meanwhile
        await super().shutdown(sockets)


class Supervisor(Multiprocess):
    """uvicorn's supervisor of several workers, which closes the shared socket as soon as it is told
    to stop (once the workers have accepted what was queued) and kills a worker still running
    ``KILL_MARGIN_SECONDS`` after the grace period."""

    def terminate_all(self) -> None:
        deadline = time.monotonic() + ACCEPT_QUEUE_WAIT_SECONDS
        if all(stop_queueing(sock) for sock in self.sockets):
            while any(queued_connections(sock) for sock in self.sockets) and time.monotonic() < deadline:
                time.sleep(0.005)  # the workers accept them meanwhile
        for sock in self.sockets:
            sock.close()
        super().terminate_all()

    def join_all(self) -> None:
        deadline = time.monotonic() + (self.config.timeout_graceful_shutdown or 0) + KILL_MARGIN_SECONDS
        for process in self.processes:
            process.process.join(max(0.0, deadline - time.monotonic()))
            if process.process.is_alive():
                log.error("worker [%s] still running after the grace period; killing it", process.pid)
                process.kill()
                process.process.join()


def connection_bound(requested: int) -> int:
    """``requested``, lowered to fit the process's descriptor limit (less ``RESERVED_DESCRIPTORS``)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or requested <= soft - RESERVED_DESCRIPTORS:
        return requested
    bound = max(1, soft - RESERVED_DESCRIPTORS)
    log.warning("the descriptor limit is %d: at most %d connections per worker, not %d", soft, bound, requested)
    return bound


def server_config(settings: Settings, log_config: dict[str, Any] | None = None) -> ServerConfig:
    limits = ConnectionLimits(head_bytes=settings.max_header_bytes, headers=settings.max_headers,
                              read_timeout=settings.read_timeout_seconds,
                              connections=connection_bound(settings.max_connections))
    return ServerConfig(
        "app.main:create_app",
        limits=limits,
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        http=Protocol,
        ws="none",  # no WebSocket endpoints: an Upgrade request is served as plain HTTP/1.1
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.keep_alive_seconds,  # type: ignore[arg-type]  # uvicorn takes a float here
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,  # type: ignore[arg-type]
        log_level=settings.log_level,
        log_config=log_config,
        server_header=False,
    )


def serve(settings: Settings, log_config: dict[str, Any] | None = None) -> None:
    """Run the service until SIGTERM or SIGINT, as ``uvicorn.run`` would, with :class:`Protocol`, and
    :class:`Server` or, for several workers, :class:`Supervisor`."""
    config = server_config(settings, log_config)
    sockets = [config.bind_socket()]
    server = Server(config)
    try:
        if config.workers > 1:
            Supervisor(config, sockets=sockets).run()
            return
        server.run(sockets)
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled once it has shut down
        pass
    if not server.started:
        sys.exit(STARTUP_FAILURE)

