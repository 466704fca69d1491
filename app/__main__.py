"""``python -m app``: serve with uvicorn (see ``app.server``), configured by ``LSTM_SERVE_*`` environment variables."""

from __future__ import annotations

import copy
import logging
import logging.config

from uvicorn.config import LOGGING_CONFIG

from app.config import Settings, available_cpus
from app.metrics import prepare_multiprocess_directory
from app.server import serve


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
    prepare_multiprocess_directory(settings.workers)  # before any worker imports prometheus_client
    serve(settings, log_config)


if __name__ == "__main__":
    main()
