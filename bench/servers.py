"""Start the service (``python -m app``) or the naive baseline (``python -m bench.baseline``) as a
subprocess on a free loopback port, wait until it is ready, read its memory, stop it."""

from __future__ import annotations

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(
    module: str, store: Path, env: dict[str, str], timeout: float = 120.0, python: str = sys.executable
) -> Iterator[Server]:
    """``python -m module`` serving ``store`` with ``env`` added to the environment."""
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
                if httpx.get(f"{base_url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{module} was not ready within {timeout:.0f} s")
            time.sleep(0.1)
        yield Server(base_url, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
