"""GET /models and /models/{name}: what the store holds, from the manifests, and what is in service."""

from __future__ import annotations

from fastapi import APIRouter, Path

from app.errors import ModelNotFound
from app.manifest import FULL, MODEL_NAME_MAX_CHARS, PRECISIONS, graph_name
from app.registry import ModelRegistry, ModelVersion
from app.routes.deps import Registry
from app.schemas import ModelInfo, ModelList, ModelVersionInfo, error_responses

router = APIRouter(tags=["models"])


def _precisions(entry: ModelVersion) -> list[str] | None:
    """What a request may ask of this version: the loaded graphs, or before loading what the
    manifest lists."""
    if entry.runtime is not None:
        return list(entry.runtime.precisions)
    if entry.manifest is None:
        return None
    return [p for p in PRECISIONS if graph_name(FULL, p) in entry.manifest.graphs]


def version_info(entry: ModelVersion) -> ModelVersionInfo:
    manifest = entry.manifest
    return ModelVersionInfo(
        version=entry.version,
        state=entry.state.value,
        reason=entry.reason,
        files_changed=entry.files_changed,
        task=entry.task,
        created=manifest.created if manifest else None,
        description=manifest.description if manifest else None,
        vocab_size=manifest.tokenizer.vocab_size if manifest else None,
        precisions=_precisions(entry),
        labels=manifest.labels if manifest else None,
        architecture=manifest.architecture if manifest else None,
        training=manifest.training if manifest else None,
        metrics=manifest.metrics if manifest else None,
    )


def model_info(registry: ModelRegistry, name: str, versions: list[ModelVersion]) -> ModelInfo:
    return ModelInfo(
        name=name,
        task=next((v.task for v in versions if v.task), None),
        default_version=registry.default_version(name),
        pinned_version=registry.pins().get(name),
        versions=[version_info(v) for v in versions],
    )


def all_models(registry: ModelRegistry) -> list[ModelInfo]:
    """Every model in the store, by name, with its versions."""
    versions = registry.versions()
    return [model_info(registry, name, [v for v in versions if v.name == name])
            for name in sorted({v.name for v in versions})]


def model_named(registry: ModelRegistry, name: str) -> ModelInfo:
    """One model and its versions; 404 ``model_not_found`` (without echoing the name) if none."""
    versions = [v for v in registry.versions() if v.name == name]
    if not versions:
        raise ModelNotFound("there is no such model", {"available": sorted({v.name for v in registry.versions()})})
    return model_info(registry, name, versions)


@router.get("/models", summary="Every model in the store")
async def list_models(registry: Registry) -> ModelList:
    """Each model with its versions: state (`serving`, `failed` with the reason, or `loading`), task,
    architecture, metrics and vocabulary size from the manifest."""
    return ModelList(models=all_models(registry))


@router.get("/models/{name}", summary="One model's versions",
            responses=error_responses({404: "No such model (`model_not_found`)."}))
async def get_model(
    registry: Registry,
    name: str = Path(description="Model name, e.g. `ptb-lm`.", max_length=MODEL_NAME_MAX_CHARS),
) -> ModelInfo:
    """One model's versions, as in `GET /models`."""
    return model_named(registry, name)
