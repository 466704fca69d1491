"""Shared resources, handed to routes as FastAPI dependencies (created once per app in ``create_app``).

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency on its thread pool, and three
such hops per request cost /sentiment about half its throughput at one connection."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app import scheduler
from app.metrics import ServiceMetrics
from app.registry import ModelRegistry


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def get_scheduler(request: Request) -> scheduler.Scheduler:
    return request.app.state.scheduler


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


Registry = Annotated[ModelRegistry, Depends(get_registry)]
Scheduler = Annotated[scheduler.Scheduler, Depends(get_scheduler)]
Metrics = Annotated[ServiceMetrics, Depends(get_metrics)]
