"""Load generators: ``wrk`` with a generated Lua script where it is installed, else a bounded
asyncio HTTP/1.1 client. Both send the same random request bodies (``Workload``), keep
connections alive, and report requests per second and latency percentiles."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Workload:
    """Request bodies for one endpoint: ``template`` (JSON with one ``%s``) filled with
    ``texts_per_request`` JSON strings, comma-separated, each of ``min_words`` to ``max_words`` words
    drawn uniformly from ``words`` (JSON-safe tokens): ``{"text": %s}`` for one text,
    ``{"texts": [%s]}`` for several."""

    path: str
    template: str
    words: tuple[str, ...]
    min_words: int
    max_words: int
    texts_per_request: int = 1

    def text(self, rng: random.Random) -> str:
        return " ".join(rng.choices(self.words, k=rng.randint(self.min_words, self.max_words)))

    def request_texts(self, rng: random.Random) -> list[str]:
        return [self.text(rng) for _ in range(self.texts_per_request)]

    def body(self, rng: random.Random) -> bytes:
        return (self.template % ", ".join(f'"{text}"' for text in self.request_texts(rng))).encode()


@dataclass(frozen=True)
class LoadResult:
    """``requests_per_s`` counts successful answers; latencies (of successful answers) are in
    milliseconds; ``statuses`` counts answers by status code (Python client only)."""

    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    client: str
    statuses: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def drive(base_url: str, workload: Workload, concurrency: int, seconds: float, client: str = "auto") -> LoadResult:
    """Send ``workload`` to ``base_url`` from ``concurrency`` connections for ``seconds``."""
    if client == "wrk" or (client == "auto" and shutil.which("wrk")):
        return _wrk(base_url, workload, concurrency, seconds)
    return asyncio.run(python_load(base_url, workload.path, workload.body, concurrency, seconds))


def time_requests(base_url: str, path: str, bodies: list[bytes], warm_up: list[bytes | None]) -> list[float]:
    """Send ``bodies`` one at a time, each after its ``warm_up`` body (unless None, and not timed);
    returns each timed request's latency in milliseconds."""

    async def run() -> list[float]:
        connection = await _Connection.open(base_url)
        latencies = []
        try:
            for body, before in zip(bodies, warm_up, strict=True):
                if before is not None:
                    await connection.post(path, before)
                started = time.perf_counter()
                await connection.post(path, body)
                latencies.append((time.perf_counter() - started) * 1000)
        finally:
            connection.close()
        return latencies

    return asyncio.run(run())


class _Connection:
    """One keep-alive HTTP/1.1 connection to a loopback server (enough of the protocol for uvicorn)."""

    def __init__(self, host: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.host, self.reader, self.writer = host, reader, writer
        self.retry_after: float | None = None  # the last response's Retry-After, in seconds

    @classmethod
    async def open(cls, base_url: str) -> _Connection:
        host, port = base_url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(f"{host}:{port}", reader, writer)

    async def post(self, path: str, body: bytes) -> int:
        """The response's status code (its ``Retry-After`` in ``retry_after``); the body is read and dropped."""
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
        self.retry_after = next((float(line.split(":", 1)[1]) for line in lines
                                 if line.lower().startswith("retry-after:")), None)
        await self.reader.readexactly(length)
        return int(lines[0].split()[1])

    def close(self) -> None:
        self.writer.close()


async def python_load(base_url: str, path: str, body: Callable[[random.Random], bytes], concurrency: int,
                      seconds: float, honour_retry_after: bool = False) -> LoadResult:
    """``concurrency`` keep-alive connections sending ``body(rng)`` to ``path`` for ``seconds``; a
    connection that was refused or reset is counted under its exception's name in ``statuses``. A
    client retries at once after a 429, or with ``honour_retry_after`` waits its ``Retry-After`` first."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    deadline = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        rng = random.Random(run_seed(path, concurrency) + index)
        try:
            connection = await _Connection.open(base_url)
        except OSError as e:
            statuses[type(e).__name__] += 1
            return
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                status = await connection.post(path, body(rng))
                statuses[str(status)] += 1
                if status == 200:
                    latencies.append((time.perf_counter() - started) * 1000)
                elif honour_retry_after and connection.retry_after is not None:
                    await asyncio.sleep(max(0.0, min(connection.retry_after, deadline - time.perf_counter())))
        except (OSError, asyncio.IncompleteReadError) as e:
            statuses[type(e).__name__] += 1
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(index) for index in range(concurrency)))
    elapsed = time.perf_counter() - started
    p50, p99 = np.percentile(latencies, [50, 99]).tolist() if latencies else (float("nan"), float("nan"))
    errors = sum(statuses.values()) - len(latencies)
    return LoadResult(len(latencies), errors, elapsed, len(latencies) / elapsed, p50, p99, "python", dict(statuses))


def run_seed(path: str, concurrency: int) -> int:
    """The texts' random seed for one load run: the same for every server measured at this endpoint and
    concurrency (a fair comparison), different for each concurrency, so that a run never sends the
    prefixes of an earlier run to a server that has cached them."""
    return zlib.crc32(f"{path} {concurrency}".encode())


LUA = """
local words = {%(words)s}
local template = %(template)s
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local seeded = false
function setup(thread)
  if not seeded then math.randomseed(%(seed)d); seeded = true end
  thread:set("seed", math.random(1, 1000000))
end

function init(args)
  math.randomseed(seed or 1)
end

function request()
  local texts = {}
  for t = 1, %(texts_per_request)d do
    local chosen = {}
    for i = 1, math.random(%(min_words)d, %(max_words)d) do chosen[i] = words[math.random(#words)] end
    texts[t] = '"' .. table.concat(chosen, " ") .. '"'
  end
  return wrk.format(nil, nil, nil, string.format(template, table.concat(texts, ", ")))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCH {"requests": %%d, "duration_us": %%d, "errors": %%d, "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def _wrk(base_url: str, workload: Workload, concurrency: int, seconds: float) -> LoadResult:
    script = LUA % {
        "words": ", ".join(json.dumps(w) for w in workload.words),
        "template": json.dumps(workload.template),
        "min_words": workload.min_words,
        "max_words": workload.max_words,
        "texts_per_request": workload.texts_per_request,
        "seed": run_seed(workload.path, concurrency),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        command = ["wrk", f"-t{min(concurrency, 2)}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s",
                   "--timeout", "10s", "-s", f.name, f"{base_url}{workload.path}"]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    finally:
        Path(f.name).unlink()
    line = next(line for line in output.splitlines() if line.startswith("BENCH "))
    raw = json.loads(line.removeprefix("BENCH "))
    elapsed = raw["duration_us"] / 1e6
    good = raw["requests"] - raw["errors"]
    return LoadResult(good, raw["errors"], elapsed, good / elapsed, raw["p50_us"] / 1000, raw["p99_us"] / 1000, "wrk")
