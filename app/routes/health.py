"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.errors import NotReady
from app.registry import ModelState
from app.routes.deps import Metrics, Registry
from app.schemas import Liveness, Readiness, error_responses

router = APIRouter(tags=["operations"])


@router.get("/health/live", summary="The process is up")
async def live() -> Liveness:
    """200 as long as the process answers; says nothing about the models."""
    return Liveness()


@router.get(
    "/health/ready",
    summary="Models are verified, self-tested and warm",
    responses=error_responses({503: "Still loading, or a model has no version in service (`not_ready`)."}),
)
async def ready(registry: Registry) -> Readiness:
    """200 once the store has been scanned and every model in it has a version in service (with
    `LSTM_SERVE_READY_REQUIRES_EVERY_MODEL=false`: at least one); 503 before that, and while a model
    has none, naming it in `missing`."""
    versions = registry.versions()
    serving = [v.ref for v in versions if v.state is ModelState.SERVING]
    failed = [v.ref for v in versions if v.state is ModelState.FAILED]
    missing = registry.missing()
    if not registry.ready:
        if not registry.loaded:
            message = "models are still loading"
        elif not versions:
            message = "the model store holds no model"
        else:
            message = f"no version in service for: {', '.join(missing)}"
        raise NotReady(message, {"serving": serving, "failed": failed, "missing": missing},
                       headers={"Retry-After": "2"})
    return Readiness(serving=serving, failed=failed, missing=missing)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"example": "lstm_serve_http_requests_total"
                                                                                 '{endpoint="/score",method="POST",'
                                                                                 'status="200"} 3.0'}}}},
)
async def metrics(service_metrics: Metrics) -> Response:
    """Requests and errors by endpoint and status, latency histograms, onnxruntime call times per
    model and graph, model versions by state. Text exposition format."""
    return Response(service_metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
