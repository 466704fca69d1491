"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.errors import NotReady
from app.registry import ModelState
from app.routes.deps import Metrics, Registry
from app.schemas import ErrorResponse, Liveness, Readiness

router = APIRouter(tags=["operations"])


@router.get("/health/live", summary="The process is up")
async def live() -> Liveness:
    """200 as long as the process answers; says nothing about the models."""
    return Liveness()


@router.get(
    "/health/ready",
    summary="Models are verified, self-tested and warm",
    responses={503: {"model": ErrorResponse, "description": "Still loading, or no model is in service."}},
)
async def ready(registry: Registry) -> Readiness:
    """200 once every model in the store has been tried and at least one serves; 503 before that."""
    versions = registry.versions()
    serving = [f"{v.name}@{v.version}" for v in versions if v.state is ModelState.SERVING]
    failed = [f"{v.name}@{v.version}" for v in versions if v.state is ModelState.FAILED]
    if not registry.ready:
        message = "models are still loading" if not registry.loaded else "no model is in service"
        raise NotReady(message, {"serving": serving, "failed": failed}, headers={"Retry-After": "2"})
    return Readiness(serving=serving, failed=failed)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"example": "lstm_serve_http_requests_total"
                                                                                 '{endpoint="/score",method="POST",'
                                                                                 'status="200"} 3.0'}}}},
)
async def metrics(registry: Registry, service_metrics: Metrics) -> Response:
    """Requests and errors by endpoint and status, latency histograms, onnxruntime call times per
    model and graph, model versions by state. Text exposition format."""
    states = Counter(v.state.value for v in registry.versions())
    body = service_metrics.exposition({state.value: states.get(state.value, 0) for state in ModelState})
    return Response(body, media_type=CONTENT_TYPE_LATEST)
