"""Shared resources, handed to routes as FastAPI dependencies (created once per app in ``create_app``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app import scheduler
from app.metrics import ServiceMetrics
from app.registry import ModelRegistry


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def get_scheduler(request: Request) -> scheduler.Scheduler:
    return request.app.state.scheduler


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


Registry = Annotated[ModelRegistry, Depends(get_registry)]
Scheduler = Annotated[scheduler.Scheduler, Depends(get_scheduler)]
Metrics = Annotated[ServiceMetrics, Depends(get_metrics)]
