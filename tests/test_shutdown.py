"""SIGTERM under load, against ``python -m app`` on loopback with one worker and with two: readiness
turns 503, accepted requests complete, no connection is reset, the process exits within the grace
period."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from bench.servers import Server, running

GRACE = 3.0
KEEP_ALIVE = 1.0  # a kept-alive connection left idle during the drain is closed after this
BODY = b'{"text": "the company said", "top_k": 3}'


def connect(server: Server) -> socket.socket:
    url = urlsplit(server.base_url)
    return socket.create_connection((url.hostname, url.port), timeout=5)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response framed by Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(status_line.split()[1]), headers, body


def exited(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie not yet reaped counts: ``running`` reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def worker_pids(parent: int) -> set[int]:
    """uvicorn's worker processes (multiprocessing's resource tracker is a child too)."""
    tasks = Path(f"/proc/{parent}/task").iterdir()
    children = {pid for task in tasks for pid in (task / "children").read_text().split()}
    return {int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()}


def serving_pid(sock: socket.socket, candidates: set[int]) -> int | None:
    """The process holding the server side of the loopback connection ``sock`` (Linux /proc)."""
    client_port, server_port = sock.getsockname()[1], sock.getpeername()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{server_port:04X}") and fields[2].endswith(f":{client_port:04X}"):
            target = f"socket:[{fields[9]}]"
            for pid in candidates:
                fds = Path(f"/proc/{pid}/fd")
                if any(os.readlink(fd) == target for fd in fds.iterdir()):
                    return pid
    return None


def wait_until_every_worker_is_ready(server: Server, workers: int, timeout: float = 60) -> None:
    """``running`` waits for one ready answer; with several workers, wait for one from each."""
    deadline = time.monotonic() + timeout
    pids = worker_pids(server.pid) if workers > 1 else {server.pid}
    ready: set[int] = set()
    while ready != pids:
        assert time.monotonic() < deadline, f"workers {pids - ready} not ready"
        with connect(server) as sock:
            sock.sendall(b"GET /health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            if read_response(sock)[0] == 200:
                ready.add(serving_pid(sock, pids) or 0)
        time.sleep(0.02)


def hammer(base_url: str, stop: threading.Event, outcomes: Counter, lock: threading.Lock) -> None:
    """POST /predict-next back to back until ``stop``; count each outcome."""
    with httpx.Client(base_url=base_url, timeout=10) as client:
        while not stop.is_set():
            try:
                response = client.post("/predict-next", content=BODY, headers={"content-type": "application/json"})
                outcome = f"status {response.status_code}"
                if response.status_code != 200:
                    outcome += " " + response.text[:150]
            except httpx.ConnectError:
                outcome = "refused"  # the listening socket is closed: never accepted
                time.sleep(0.02)
            except httpx.TransportError as exc:  # reset, or closed without an answer
                outcome = type(exc).__name__
            with lock:
                outcomes[outcome] += 1


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_load_completes_accepted_requests_and_resets_nothing(tiny_store, workers):
    env = {"LSTM_SERVE_WORKERS": str(workers), "LSTM_SERVE_INTRA_OP_THREADS": "1",
           "LSTM_SERVE_SHUTDOWN_GRACE_SECONDS": str(GRACE), "LSTM_SERVE_READ_TIMEOUT_SECONDS": "5",
           "LSTM_SERVE_KEEP_ALIVE_SECONDS": str(KEEP_ALIVE)}
    outcomes: Counter = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    with running("app", tiny_store, env, timeout=90) as server:
        wait_until_every_worker_is_ready(server, workers)
        clients = [threading.Thread(target=hammer, args=(server.base_url, stop, outcomes, lock)) for _ in range(4)]
        for thread in clients:
            thread.start()
        probe = connect(server)  # a kept-alive connection, to ask for readiness during the drain
        probe.sendall(b"GET /health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(probe)[0] == 200
        uploading = connect(server)  # a request accepted before SIGTERM whose body arrives after it
        uploading.sendall(b"POST /predict-next HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY[:10]))
        for _ in range(10):  # a second of load; the probe asks often enough to stay kept alive
            time.sleep(0.1)
            probe.sendall(b"GET /health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(probe)[0] == 200
        with lock:
            served_before = outcomes["status 200"]

        signalled = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        while True:  # each answer is 200 until this connection's worker starts draining
            probe.sendall(b"GET /health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = read_response(probe)
            if status != 200:
                break
            assert time.monotonic() - signalled < 2, "readiness still 200 two seconds after SIGTERM"
            time.sleep(0.02)
        unready_after = time.monotonic() - signalled
        uploading.sendall(BODY[10:])
        upload_status, _, upload_body = read_response(uploading)
        while not exited(server.pid) and time.monotonic() - signalled < GRACE + 5:
            time.sleep(0.02)
        exit_seconds = time.monotonic() - signalled
        stop.set()
        for thread in clients:
            thread.join(timeout=15)
        probe.close()
        uploading.close()

    assert status == 503 and headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["code"] == "not_ready" and "shutting down" in error["message"]
    assert unready_after < 1.0
    assert upload_status == 200 and len(json.loads(upload_body)["predictions"]) == 3
    assert exit_seconds < GRACE
    assert served_before > 0
    assert set(outcomes) <= {"status 200", "refused"}, outcomes  # no reset, no 5xx, nothing left unanswered


def test_a_request_still_running_when_the_grace_period_ends_gets_503_and_the_process_exits(tiny_store):
    grace = 1.0
    env = {"LSTM_SERVE_INTRA_OP_THREADS": "1", "LSTM_SERVE_SHUTDOWN_GRACE_SECONDS": str(grace),
           "LSTM_SERVE_READ_TIMEOUT_SECONDS": "30"}
    with running("app", tiny_store, env, timeout=60) as server:
        stalled = connect(server)  # its body never completes, so the drain cannot finish on its own
        stalled.sendall(b"POST /predict-next HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY[:10]))
        time.sleep(0.2)
        signalled = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        status, headers, body = read_response(stalled)
        while not exited(server.pid) and time.monotonic() - signalled < grace + 10:
            time.sleep(0.02)
        exit_seconds = time.monotonic() - signalled
        stalled.close()

    assert status == 503 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "not_ready"
    assert grace <= exit_seconds < grace + 2
