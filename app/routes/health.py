"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.errors import NotReady
from app.registry import ModelState
from app.routes.deps import Metrics, Registry
from app.schemas import Liveness, Readiness, error_responses
from app.server import SHUTDOWN, Shutdown

router = APIRouter(tags=["operations"])


@router.get("/health/live", summary="The process is up")
async def live() -> Liveness:
    """200 as long as the process answers; says nothing about the models."""
    return Liveness()


@router.get(
    "/health/ready",
    summary="Models are verified, self-tested and warm",
    responses=error_responses({503: "Still loading, a model has no version in service, or shutting down "
                                    "(`not_ready`)."}),
)
async def ready(request: Request, registry: Registry) -> Readiness:
    """200 once the store has been scanned and every model in it has a version in service (with
    `LSTM_SERVE_READY_REQUIRES_EVERY_MODEL=false`: at least one); 503 before that, while a model
    has none, naming it in `missing`, and from the moment the service is told to stop (SIGTERM)."""
    versions = registry.versions()
    serving = [v.ref for v in versions if v.state is ModelState.SERVING]
    failed = [v.ref for v in versions if v.state is ModelState.FAILED]
    missing = registry.missing()
    shutting_down = getattr(request.state, SHUTDOWN, Shutdown()).started
    if shutting_down or not registry.ready:
        if shutting_down:
            message = "the service is shutting down"
        elif not registry.loaded:
            message = "models are still loading"
        elif not versions:
            message = "the model store holds no model"
        else:
            message = f"no version in service for: {', '.join(missing)}"
        raise NotReady(message, {"serving": serving, "failed": failed, "missing": missing},
                       headers={"Retry-After": "2"})
    return Readiness(serving=serving, failed=failed, missing=missing)


# Apart from `router` so that LSTM_SERVE_METRICS=false can leave it out (404, and not in the OpenAPI).
metrics_router = APIRouter(tags=["operations"])


@metrics_router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"example": "lstm_serve_http_requests_total"
                                                                          '{endpoint="/score",method="POST",'
                                                                          'status="200"} 3.0'}}},
        **error_responses({401: "`LSTM_SERVE_METRICS_TOKEN` is set and the request has no bearer token, or "
                                "another one (`unauthorized`)."}),
    },
)
async def metrics(service_metrics: Metrics) -> Response:
    """Requests and errors by endpoint and status, latency histograms, onnxruntime call times per
    model and graph, model versions by state. Text exposition format. With several uvicorn workers the
    figures are those of every worker together, whichever worker answers."""
    return Response(service_metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
