"""Clients that misbehave at the connection level, against ``python -m app`` on loopback: silent and
slow clients are cut off, oversized heads are refused without memory growth, the connection bound
makes room, pipelining works, and malformed HTTP is answered in the error envelope."""

from __future__ import annotations

import json
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from bench.servers import Server, running

READ_TIMEOUT = 1.0
KEEP_ALIVE = 1.0
MAX_CONNECTIONS = 48
MAX_HEADER_BYTES = 16384


@pytest.fixture(scope="module")
def server(tiny_store: Path) -> Iterator[Server]:
    env = {"LSTM_SERVE_INTRA_OP_THREADS": "1", "LSTM_SERVE_READ_TIMEOUT_SECONDS": str(READ_TIMEOUT),
           "LSTM_SERVE_KEEP_ALIVE_SECONDS": str(KEEP_ALIVE), "LSTM_SERVE_MAX_CONNECTIONS": str(MAX_CONNECTIONS)}
    with running("app", tiny_store, env, timeout=60) as started:
        yield started


def connect(server: Server) -> socket.socket:
    url = urlsplit(server.base_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=5)
    return sock


def exchange(server: Server, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection and return everything the server sends until it closes."""
    with connect(server) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendall(data)
        except OSError:  # the server answered and stopped reading before all of it was sent
            pass
        return read_until_closed(sock)


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Parse HTTP/1.1 responses framed by Content-Length, in order."""
    parsed = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
        length = int(headers.get("content-length", 0))
        parsed.append((int(status_line.split()[1]), headers, rest[:length]))
        data = rest[length:]
    return parsed


def only_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    [response] = responses(data)
    return response


def envelope(response: tuple[int, dict[str, str], bytes], status: int, code: str) -> dict:
    got_status, headers, body = response
    assert got_status == status, body
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code
    return error


def closed(sock: socket.socket, received: dict[socket.socket, bytes]) -> bool:
    """Whether the server has closed ``sock``, without waiting; what it sent goes to ``received``."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while chunk := sock.recv(65536):
            received[sock] = received.get(sock, b"") + chunk
        return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.settimeout(timeout)


def test_silent_and_slow_clients_are_cut_off_while_a_normal_client_keeps_its_latency(server):
    slow_head = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 64
    with httpx.Client(base_url=server.base_url, timeout=5) as client:
        quiet = []
        for _ in range(10):
            started = time.perf_counter()
            assert client.get("/health/live").status_code == 200
            quiet.append(time.perf_counter() - started)

        silent = [connect(server) for _ in range(20)]
        slow = [connect(server) for _ in range(10)]
        opened = time.monotonic()
        closed_after: dict[socket.socket, float] = {}
        received: dict[socket.socket, bytes] = {}
        busy = []
        for byte in range(len(slow_head)):
            for sock in slow:
                if sock not in closed_after:
                    sock.send(slow_head[byte:byte + 1])  # a header byte every 0.1 s: slowloris
            started = time.perf_counter()
            assert client.get("/health/live").status_code == 200
            busy.append(time.perf_counter() - started)
            for sock in silent + slow:
                if sock not in closed_after and closed(sock, received):
                    closed_after[sock] = time.monotonic() - opened
            if len(closed_after) == len(silent + slow) or time.monotonic() - opened > READ_TIMEOUT + 2:
                break
            time.sleep(0.1)
        for sock in silent + slow:
            sock.close()

    assert len(closed_after) == len(silent + slow)
    times = sorted(closed_after.values())
    assert READ_TIMEOUT - 0.1 <= times[0] and times[-1] <= READ_TIMEOUT + 1.0, times
    assert all(sock not in received for sock in silent)  # nothing sent: closed without an answer
    for sock in slow:  # a partial head: answered 408
        error = envelope(only_response(received[sock]), 408, "request_timeout")
        assert error["details"] == {"timeout_seconds": READ_TIMEOUT}
    assert statistics.median(busy) < max(0.1, 5 * statistics.median(quiet)), (quiet, busy)


def test_a_stalled_body_is_408_and_counted_as_the_client_going_away(server):
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /predict-next HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"text\": ")
        answer = read_until_closed(sock)
        waited = time.monotonic() - started
    envelope(only_response(answer), 408, "request_timeout")
    assert READ_TIMEOUT - 0.1 <= waited <= READ_TIMEOUT + 1.0
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert 'method="POST",status="499"' in metrics and 'status="500"' not in metrics


def test_an_idle_keep_alive_connection_is_closed(server):
    with connect(server) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        started = time.monotonic()
        rest = read_until_closed(sock)
        waited = time.monotonic() - started
    assert responses(first + rest)[0][0] == 200
    assert KEEP_ALIVE - 0.1 <= waited <= KEEP_ALIVE + 1.0


@pytest.mark.parametrize("size", [40_000, 64 << 20], ids=["40KB-in-one-read", "64MB-streamed"])
def test_an_oversized_header_block_is_431_without_memory_growth(server, size):
    before = server.rss_mb()
    for _ in range(2):
        with connect(server) as sock:
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
            chunk = b"a" * min(size, 1 << 20)
            try:
                for _ in range(size // len(chunk)):
                    sock.sendall(chunk)
                sock.sendall(b"\r\n\r\n")
            except OSError:  # answered, and the server stopped reading
                pass
            answer = read_until_closed(sock)
        error = envelope(only_response(answer), 431, "headers_too_large")
        assert error["details"] == {"limit_bytes": MAX_HEADER_BYTES}
    after = server.rss_mb()
    # MiB; with httptools two 64 MB headers were read whole: peak RSS +129 MiB
    assert after["peak_rss_mb"] - before["peak_rss_mb"] < 8 and after["rss_mb"] - before["rss_mb"] < 8


@pytest.mark.parametrize("count", [101, 100_000])
def test_too_many_headers_is_431(server, count):
    headers = b"".join(b"x-%d: y\r\n" % i for i in range(count))
    error = envelope(only_response(exchange(server, b"GET /health/live HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")),
                     431, "headers_too_large")
    assert error["details"] in ({"limit_headers": 100}, {"limit_bytes": MAX_HEADER_BYTES})


def test_pipelined_requests_are_answered_in_order(server):
    body = b'{"text": "the company said", "top_k": 2}'
    pipelined = (
        b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /predict-next HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        + b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /models/tiny-lm HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    answers = responses(exchange(server, pipelined))
    assert [status for status, _, _ in answers] == [200, 200, 404, 200, 200]
    assert json.loads(answers[0][2]) == {"status": "alive"}
    assert len(json.loads(answers[1][2])["predictions"]) == 2
    assert json.loads(answers[2][2])["error"]["code"] == "not_found"
    assert json.loads(answers[3][2])["name"] == "tiny-lm"


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"POST /predict-next HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"0\r\n\r\n", 400, "bad_request"),
        (b"G(T /health/live HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
        (b"GET /health/live HTTP/1.1\r\n\r\n", 400, "bad_request"),  # no Host
        (b"GET /health/live HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400, "bad_request"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n", 400, "bad_request"),  # TLS hello
        (b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "not_implemented"),
    ],
    ids=["content-length-and-chunked", "bad-method-token", "no-host", "bad-header-name", "tls-hello", "gzip-coding"],
)
def test_malformed_http_is_answered_in_the_envelope(server, request_bytes, status, code):
    error = envelope(only_response(exchange(server, request_bytes)), status, code)
    assert "G(T" not in error["message"] and "Bad Header" not in error["message"]  # the request is not echoed


def test_an_upgrade_request_is_served_as_http(server):
    request = (b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
               b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answers = responses(exchange(server, request))
    envelope(answers[0], 404, "not_found")
    assert answers[1][0] == 200


def test_at_the_connection_bound_the_longest_idle_connections_make_room(server):
    silent = [connect(server) for _ in range(MAX_CONNECTIONS + 12)]
    try:
        started = time.monotonic()
        with httpx.Client(base_url=server.base_url, timeout=5) as client:
            assert client.get("/health/live").status_code == 200
        assert time.monotonic() - started < READ_TIMEOUT / 2  # served at once, not after the silent ones time out
        received: dict[socket.socket, bytes] = {}
        evicted = [sock for sock in silent if closed(sock, received)]
        assert len(evicted) >= 13
        assert set(evicted) <= set(silent[:20]), str([silent.index(s) for s in evicted])  # the oldest went first
    finally:
        for sock in silent:
            sock.close()
