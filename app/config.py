"""The service's settings: one object, read once from ``LSTM_SERVE_*`` environment variables."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.manifest import Precision

ENV_PREFIX = "LSTM_SERVE_"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota where one is set
    (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``), rounded up, at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def _cgroup_quota(root: Path) -> float | None:
    """The CPU quota in CPUs, or None where there is none (or it cannot be read)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


class Settings(BaseSettings):
    """Every knob of the service. Each field is read from ``LSTM_SERVE_<FIELD>`` (for example
    ``LSTM_SERVE_MODEL_STORE``); the defaults serve ``model_store/`` on loopback."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    model_store: Path = Field(Path("model_store"), description="Directory of <name>/<version>/ model folders.")
    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 in the container).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")
    workers: int = Field(1, ge=1, description="uvicorn worker processes; each loads every model.")
    max_header_bytes: int = Field(
        16384, ge=1024, description="Request line and headers together, in bytes; a larger head gets 431.",
    )
    max_headers: int = Field(100, ge=1, description="Headers per request; more get 431.")
    read_timeout_seconds: float = Field(
        5.0, gt=0, le=300,
        description="A request's head and body must arrive within this many seconds of its first byte (of the "
        "connection opening, for the first request); a client that stalls gets 408, or is disconnected if it sent "
        "nothing.",
    )
    keep_alive_seconds: float = Field(
        5.0, gt=0, le=300, description="An idle keep-alive connection is closed after this many seconds.",
    )
    max_connections: int = Field(
        1024, ge=1,
        description="Open connections per worker (lowered to fit the descriptor limit); at the bound the "
        "connection idle the longest is closed to make room, or the new one when every connection has a request "
        "in progress.",
    )
    shutdown_grace_seconds: float = Field(
        20.0, gt=0, le=3600,
        description="On SIGTERM, requests in progress get this long to complete (then 503); with several "
        "workers, one still running 5 s later is killed. Keep it below the orchestrator's kill timeout "
        "(Kubernetes: 30 s by default).",
    )
    intra_op_threads: int = Field(
        0, ge=0,
        description="onnxruntime intra-op threads per worker; 0 = available CPUs (cgroup quota aware) / workers.",
    )
    max_text_chars: int = Field(2000, ge=1, description="Characters per text, before normalisation.")
    max_text_tokens: int = Field(256, ge=1, description="Tokens per text, after normalisation.")
    max_texts: int = Field(64, ge=1, description="Texts per /score or /sentiment request.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Request body size; larger bodies get 413.")
    max_queue_wait_ms: float = Field(
        500, gt=0, le=60_000,
        description="Admission bound: a request that would wait longer than this for the inference thread (the "
        "expected onnxruntime time of the work admitted before it) is refused at once with 429 and Retry-After.",
    )
    request_timeout_ms: float = Field(
        10_000, gt=0, le=600_000,
        description="Every inference request's deadline unless the client asks for a sooner one with the "
        "X-Request-Timeout-Ms header; past it the answer is 504 deadline_exceeded and its work is dropped.",
    )
    cache_bytes: int = Field(
        64 << 20, ge=0,
        description="Prefix-state cache bound in bytes (LSTM state + next-word distribution per cached prefix); "
        "0 disables it.",
    )
    cache_split_last_word: bool = Field(
        False,
        description="Read a new prefix's last word as a step of its own, so the state before it is cached too: "
        "for clients that resend the text with only its last word changed and do not use complete_last_word. "
        "Costs a second onnxruntime call on every prefix not seen before.",
    )
    batching: bool = Field(
        True, description="Group work from requests that arrive together into shared onnxruntime calls.",
    )
    batch_max_size: int = Field(32, ge=1, description="Rows (texts, prefixes) per grouped onnxruntime call.")
    batch_max_wait_ms: float = Field(
        1.0, ge=0, le=100,
        description="How long work waits for companions while other requests are in flight, in milliseconds; "
        "a request alone in the service never waits.",
    )
    default_precision: Precision = Field(
        "int8", description="Graphs a request runs on when it names no precision: int8 where the model has int8 "
        "graphs (the language model's output layer in int8 at fixed scales: PTB perplexity 84.060 against 84.059, "
        "the same top word at 99.4% of positions, measured by `python -m training evaluate --compare-to full`), "
        "else float32.",
    )
    rescan_seconds: float = Field(
        10.0, ge=0,
        description="How often the service reconciles with the model store (new, changed and removed versions), "
        "in seconds; 0 turns the periodic scan off (SIGHUP and POST /admin/rescan still work).",
    )
    allow_links_outside_store: bool = Field(
        False, description="Serve version folders and files that are symbolic links resolving outside the store "
        "(logged); refused by default.",
    )
    ready_requires_every_model: bool = Field(
        True, description="/health/ready is 503 while any model in the store has no version in service; "
        "false: ready while at least one model serves.",
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for the /admin API (model lifecycle); the admin API is off while unset.",
    )
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated bearer keys accepted by the inference endpoints (/predict-next, /score, "
        "/sentiment). With this or api_key_hashes_file set, those endpoints answer 401 without one of the keys; "
        "while both are unset they are open.",
    )
    api_key_hashes_file: Path | None = Field(
        None, description="File of accepted inference keys as SHA-256 hex digests, one per line ('#' starts a "
        "comment); read at start-up. Adds to api_keys.",
    )
    docs: bool = Field(True, description="Serve /docs, /redoc and /openapi.json; false: they are 404.")
    demo: bool = Field(True, description="Serve the demo page at /demo (and redirect / to it); false: they are 404.")
    metrics: bool = Field(True, description="Serve Prometheus metrics at /metrics; false: it is 404.")
    metrics_token: SecretStr | None = Field(
        None, description="Bearer token that /metrics requires (401 without it); open while unset.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="Log level.")

    @model_validator(mode="after")
    def _derive_threads(self) -> Self:
        if self.intra_op_threads == 0:
            # frozen model: set the derived value the way pydantic's own __init__ would
            object.__setattr__(self, "intra_op_threads", max(1, available_cpus() // self.workers))
        return self

    @property
    def cpu_budget_exceeded(self) -> bool:
        """True when workers x intra-op threads asks for more CPUs than this process may use."""
        return self.workers * self.intra_op_threads > available_cpus()
