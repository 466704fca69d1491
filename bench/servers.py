"""Start the service (``python -m app``) or the naive baseline (``python -m bench.baseline``) as a
subprocess on a free loopback port, wait until it is ready, read its memory and CPU time, stop it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from app.metrics import MULTIPROC_ENV, SNAPSHOT_PREFIX

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Server:
    base_url: str
    pid: int

    def rss_mb(self) -> dict[str, float]:
        """Resident memory now and at its peak, in MiB (Linux /proc)."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
        return {"rss_mb": fields.get("VmRSS", float("nan")), "peak_rss_mb": fields.get("VmHWM", float("nan"))}

    def cpu_seconds(self) -> float:
        """CPU time (user + system, every thread) the server has used so far, with its worker
        processes where it runs several (Linux /proc)."""
        return sum(_cpu_seconds(pid) for pid in _process_tree(self.pid))


def _cpu_seconds(pid: int) -> float:
    # The command name in parentheses may hold spaces; utime and stime are the 14th and 15th fields.
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants now (by thread, since each lists the children it started)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return [pid, *(descendant for child in children for descendant in _process_tree(child))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(
    module: str, store: Path, env: dict[str, str], timeout: float = 120.0, python: str = sys.executable
) -> Iterator[Server]:
    """``python -m module`` serving ``store`` with ``env`` added to the environment, once ready (every worker,
    where ``env`` asks for several)."""
    port = free_port()
    environment = {**os.environ, "LSTM_SERVE_MODEL_STORE": str(store), "LSTM_SERVE_HOST": "127.0.0.1",
                   "LSTM_SERVE_PORT": str(port), "BENCH_PORT": str(port), "LSTM_SERVE_LOG_LEVEL": "warning", **env}
    process = subprocess.Popen([python, "-m", module], cwd=REPO, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{module} exited early:\n{process.stderr.read() if process.stderr else ''}")
            try:
                ready = httpx.get(f"{base_url}/health/ready", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{module} was not ready within {timeout:.0f} s")
            time.sleep(0.1)
        workers = int(environment.get("LSTM_SERVE_WORKERS", "1"))
        if workers > 1:
            # One worker answered; the others may still be loading (and would answer 503).
            wait_for_serving_workers(multiprocess_directory_of(process.pid), workers, len(ready.json()["serving"]),
                                     deadline - time.monotonic())
        yield Server(base_url, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def multiprocess_directory_of(pid: int) -> Path:
    """The metrics directory the service ``pid`` handed its workers (read from a worker's environment)."""
    for child in _process_tree(pid)[1:]:
        for variable in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            name, _, value = variable.decode(errors="replace").partition("=")
            if name == MULTIPROC_ENV:
                return Path(value)
    raise RuntimeError(f"no worker of {pid} has {MULTIPROC_ENV}")


def wait_for_serving_workers(directory: Path, workers: int, models: int, timeout: float = 60.0) -> None:
    """Until ``workers`` workers' metrics snapshots (``app.metrics.WorkerSnapshots``) each report ``models``
    model versions in service."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        serving = 0
        for path in directory.glob(f"{SNAPSHOT_PREFIX}*.json"):
            try:
                families = {f["name"]: f for f in json.loads(path.read_text())}
            except (OSError, ValueError):  # written meanwhile, or its worker is gone
                continue
            states = {labels["state"]: value for _, labels, value in families["lstm_serve_model_versions"]["samples"]}
            serving += states.get("serving") == models
        if serving >= workers:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{workers} workers did not all serve within {timeout:.0f} s")
