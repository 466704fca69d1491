"""The admin API: the model lifecycle for operators (list, rescan, load/unload a version, pin the
default version for a rollback). Off unless ``LSTM_SERVE_ADMIN_TOKEN`` is set; every call needs
``Authorization: Bearer <token>``, compared in constant time.

Each uvicorn worker is its own process with its own registry: with several workers an admin call
reaches one of them. Changes made through the store (adding or removing version folders) reach every
worker at its next scan."""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Request

from app.errors import AdminDisabled, Unauthorized
from app.lifecycle import StoreWatcher
from app.manifest import MODEL_NAME_MAX_CHARS, MODEL_NAME_PATTERN
from app.routes.deps import Registry
from app.routes.inference import JSONBodyRoute
from app.routes.models import all_models, model_named, version_info
from app.schemas import (
    AdminStatus,
    ModelInfo,
    ModelVersionInfo,
    PinRequest,
    ReconcileResult,
    error_responses,
)

REALM = 'Bearer realm="lstm-serve admin"'


async def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    token = request.app.state.admin_token
    if token is None:
        raise AdminDisabled("the admin API is off; set LSTM_SERVE_ADMIN_TOKEN to turn it on")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized("send the admin token as 'Authorization: Bearer <token>'",
                           headers={"WWW-Authenticate": REALM})
    if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise Unauthorized("the admin token is not valid",
                           headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'})


async def get_watcher(request: Request) -> StoreWatcher:
    return request.app.state.watcher


ERRORS = error_responses({
    401: "No bearer token, or not the admin token (`unauthorized`).",
    403: "The admin API is off: `LSTM_SERVE_ADMIN_TOKEN` is not set (`admin_disabled`).",
    415: "A body that is not `application/json` (`unsupported_media_type`).",
    422: "A body or path that fails the schema (`validation_error`), or is not JSON (`invalid_json`).",
})

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)], responses=ERRORS,
                   route_class=JSONBodyRoute)
ModelName = Annotated[str, Path(description="Model name, e.g. `ptb-lm`.", pattern=f"^{MODEL_NAME_PATTERN}$",
                                max_length=MODEL_NAME_MAX_CHARS)]
Version = Annotated[int, Path(description="Version number.", ge=1, le=999_999_999)]
NOT_FOUND = error_responses({404: "No such model or version in the store (`model_not_found`)."})


@router.get("/models", summary="Every model and version, with pins and draining versions")
async def status(registry: Registry) -> AdminStatus:
    return AdminStatus(models=all_models(registry), draining=registry.draining(),
                       reconciles=dict(registry.reconciles))


@router.post("/rescan", summary="Reconcile with the store now")
async def rescan(watcher: Annotated[StoreWatcher, Depends(get_watcher)]) -> ReconcileResult:
    """Scan the store as the periodic scan does and answer with what changed: new versions verified,
    warmed and in service; refused ones; removed ones retired (unloaded once their requests finish)."""
    report = await watcher.rescan("admin")
    return ReconcileResult(trigger=report.trigger, loaded=report.loaded, failed=report.failed,
                           removed=report.removed, changed=report.changed, seconds=report.seconds)


@router.post("/models/{name}/versions/{version}/load", summary="Load (or retry) a version", responses=NOT_FOUND)
async def load(registry: Registry, name: ModelName, version: Version) -> ModelVersionInfo:
    """Read, verify, self-test and warm the version now and put it in service: after an unload, or
    to retry one that failed. On failure the answer says why (`state`, `reason`)."""
    return version_info(await asyncio.to_thread(registry.load, name, version))


@router.post("/models/{name}/versions/{version}/unload", summary="Take a version out of service",
             responses=NOT_FOUND)
async def unload(registry: Registry, name: ModelName, version: Version) -> ModelVersionInfo:
    """Requests in flight finish on it; new ones go to the model's next default version. Scans leave
    it out of service until it is loaded again."""
    return version_info(await asyncio.to_thread(registry.unload, name, version))


@router.put("/models/{name}/pin", summary="Pin the default version (rollback)",
            responses={**NOT_FOUND, **error_responses({409: "The version is not in service (`conflict`)."})})
async def pin(registry: Registry, name: ModelName, body: PinRequest) -> ModelInfo:
    """Requests that name no version get this one while it serves, whatever versions are added."""
    registry.pin(name, body.version)
    return model_named(registry, name)


@router.delete("/models/{name}/pin", summary="Unpin: the highest version in service is the default again",
               responses=NOT_FOUND)
async def unpin(registry: Registry, name: ModelName) -> ModelInfo:
    registry.unpin(name)
    return model_named(registry, name)
