"""Shared resources, handed to routes as FastAPI dependencies (created once per app in ``create_app``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.metrics import ServiceMetrics
from app.registry import ModelRegistry
from app.runtime import InferencePool


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def get_pool(request: Request) -> InferencePool:
    return request.app.state.pool


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


Registry = Annotated[ModelRegistry, Depends(get_registry)]
Pool = Annotated[InferencePool, Depends(get_pool)]
Metrics = Annotated[ServiceMetrics, Depends(get_metrics)]
