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
    intra_op_threads: int = Field(
        0, ge=0,
        description="onnxruntime intra-op threads per worker; 0 = available CPUs (cgroup quota aware) / workers.",
    )
    max_text_chars: int = Field(2000, ge=1, description="Characters per text, before normalisation.")
    max_text_tokens: int = Field(256, ge=1, description="Tokens per text, after normalisation.")
    max_texts: int = Field(64, ge=1, description="Texts per /score or /sentiment request.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Request body size; larger bodies get 413.")
    max_waiting_requests: int = Field(
        64, ge=1, description="Inference requests allowed to wait for a model; more get 429."
    )
    cache_bytes: int = Field(
        64 << 20, ge=0,
        description="Prefix-state cache bound in bytes (LSTM state + next-word distribution per cached prefix); "
        "0 disables it.",
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
        "float32", description="Graphs a request runs on when it names no precision (int8 where the model has "
        "int8 graphs, else float32).",
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
