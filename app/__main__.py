"""``python -m app``: serve with uvicorn, configured by ``LSTM_SERVE_*`` environment variables."""

from __future__ import annotations

import copy
import logging
import logging.config

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from app.config import Settings, available_cpus


def main() -> None:
    settings = Settings()
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["loggers"]["app"] = {"handlers": ["default"], "level": settings.log_level.upper(), "propagate": False}
    logging.config.dictConfig(log_config)
    if settings.cpu_budget_exceeded:
        logging.getLogger("app").warning(
            "%d workers x %d onnxruntime threads exceeds the %d CPUs available; expect contention",
            settings.workers, settings.intra_op_threads, available_cpus(),
        )
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        log_config=log_config,
        server_header=False,
    )


if __name__ == "__main__":
    main()
