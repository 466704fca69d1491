"""``python -m bench --faults``: the service under overload, the heavier version of the fault tests.

`/score` with 8 sentences per request (10-30 random vocabulary words each): the service time at one
connection, the throughput at the concurrency that saturates it, then ten times that many clients
(256 by default): only 200 and 429 may come back, accepted requests must wait no longer than the
admission bound plus one service time (their p99), and the 200s per second must stay near the
saturated throughput (>= 80%)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
from pathlib import Path

from app.config import Settings
from bench.load import LoadResult, python_load
from bench.run import workloads
from bench.servers import running

SENTENCES_PER_REQUEST = 8
SATURATION_CONCURRENCY = (4, 16, 32)


def _score_body(words: tuple[str, ...]):
    def body(rng: random.Random) -> bytes:
        texts = [" ".join(rng.choices(words, k=rng.randint(10, 30))) for _ in range(SENTENCES_PER_REQUEST)]
        return json.dumps({"texts": texts}).encode()

    return body


def run_overload(store: Path, seconds: float, clients: int, service_python: str, threads: int) -> dict:
    """Measure the service with default admission settings; returns a JSON-ready dict."""
    body = _score_body(workloads(store)["/score"].words)
    env = {"LSTM_SERVE_INTRA_OP_THREADS": str(threads)}

    def load(base_url: str, concurrency: int) -> LoadResult:
        return asyncio.run(python_load(base_url, "/score", body, concurrency, seconds))

    with running("app", store, env, python=service_python) as server:
        alone = load(server.base_url, 1)
        saturation = {c: load(server.base_url, c) for c in SATURATION_CONCURRENCY}
        overload = load(server.base_url, clients)
    best = max(saturation.values(), key=lambda r: r.requests_per_s)
    bound_ms = Settings().max_queue_wait_ms  # the server's too: same environment, no override
    allowed_p99_ms = bound_ms + alone.p50_ms
    statuses = set(overload.statuses)
    return {
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M%SZ"),
        "workload": f"/score, {SENTENCES_PER_REQUEST} sentences of 10-30 words per request",
        "seconds": seconds,
        "max_queue_wait_ms": bound_ms,
        "alone": alone.as_dict(),
        "saturation": {str(c): r.as_dict() for c, r in saturation.items()},
        "overload": {"clients": clients, **overload.as_dict()},
        "checks": {
            "only 200 and 429": statuses <= {"200", "429"},
            f"accepted p99 <= bound + one service time ({allowed_p99_ms:.0f} ms)": overload.p99_ms <= allowed_p99_ms,
            "2xx/s >= 80% of saturated": overload.requests_per_s >= 0.8 * best.requests_per_s,
        },
    }


def table(results: dict) -> str:
    rows = [("one client", results["alone"])]
    rows += [(f"{c} clients", r) for c, r in results["saturation"].items()]
    rows.append((f"{results['overload']['clients']} clients (overload)", results["overload"]))
    lines = ["| load | 200/s | accepted p50 / p99 ms | answers by status |", "|---|---:|---:|---|"]
    for name, r in rows:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        lines.append(f"| {name} | {r['requests_per_s']:.1f} | {r['p50_ms']:.0f} / {r['p99_ms']:.0f} | {statuses} |")
    lines.append("")
    lines += [f"[{'   met' if ok else 'MISSED'}] {check}" for check, ok in results["checks"].items()]
    return "\n".join(lines)
