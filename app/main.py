"""The FastAPI application: ``create_app(settings)`` wires settings, model registry, scheduler,
metrics, routes, error handlers and middleware together."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.auth import UNAUTHORIZED, BearerAuth, access_guards, document_guards
from app.cache import PrefixStateCache
from app.config import Settings
from app.errors import install_error_handlers
from app.lifecycle import StoreWatcher
from app.metrics import ServiceMetrics
from app.middleware import BodySizeLimit, RequestMetrics
from app.registry import ModelRegistry
from app.routes import admin, demo, health, models
from app.routes.docs import install_docs
from app.routes.inference import INFERENCE_PATHS, LoadShedding, inference_router
from app.scheduler import Admission, Scheduler
from app.schemas import Limits, request_schemas

log = logging.getLogger(__name__)

DESCRIPTION = """\
Next-word prediction (and completion of the word being typed), sentence scoring (n-best rescoring) and text
generation with an LSTM language model, and sentence sentiment,
served from the model store with onnxruntime.

Every error has one shape: `{"error": {"code", "message", "details"}}`. Log-probabilities are
natural logs; the language model's context starts at a sentence boundary (`<eos>`).
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service. Models load in the background after start-up; ``/health/ready`` answers 200
    once they are verified, self-tested and warm."""
    settings = settings or Settings()
    metrics = ServiceMetrics()
    cache = PrefixStateCache(settings.cache_bytes, settings.cache_split_last_word)
    metrics.watch_cache(cache)
    registry = ModelRegistry(
        settings.model_store, settings.intra_op_threads, settings.max_text_tokens, metrics.inference_observer,
        allow_links_outside_store=settings.allow_links_outside_store,
        ready_requires_every_model=settings.ready_requires_every_model,
        on_unload=lambda runtime: cache.forget(runtime.name, runtime.version, runtime.load_id),
    )
    metrics.watch_models(registry)
    watcher = StoreWatcher(registry, settings.rescan_seconds)
    scheduler = Scheduler(
        Admission(settings.max_queue_wait_ms / 1000, metrics.observe_admitted), cache, batching=settings.batching,
        max_size=settings.batch_max_size, max_wait=settings.batch_max_wait_ms / 1000,
        default_precision=settings.default_precision, timeout=settings.request_timeout_ms / 1000,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("loading models from %s with %d onnxruntime threads", settings.model_store,
                 settings.intra_op_threads)
        watcher.start()
        metrics.start()
        try:
            yield
        finally:
            await watcher.stop()
            scheduler.close()
            metrics.stop()

    app = FastAPI(
        title="lstm-serve",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.state.registry = registry
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.state.watcher = watcher
    app.state.admin_token = settings.admin_token

    install_error_handlers(app)
    limits = Limits(settings.max_text_chars, settings.max_texts, settings.max_text_tokens)
    inference = inference_router(request_schemas(limits))
    app.include_router(inference, responses=UNAUTHORIZED)
    app.include_router(models.router)
    app.include_router(health.router)
    if settings.metrics:
        app.include_router(health.metrics_router)
    app.include_router(admin.router)
    if settings.docs:
        install_docs(app)
    if settings.demo:
        app.include_router(demo.router)
    guards = access_guards(settings, inference=inference.routes, metrics=health.metrics_router.routes)
    document_guards(app, guards)
    # The last one added runs first: metrics see every answer, 413s included.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(LoadShedding, admission=scheduler.admission, paths=INFERENCE_PATHS)
    if guards:  # keys are checked before a body is read, and before load is shed (no 429 without a key)
        app.add_middleware(BearerAuth, guards=guards)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app
