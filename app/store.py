"""The model store on disk: ``<store>/<name>/<version>/manifest.json`` beside the graphs and the
vocabulary (see DESIGN.md). Finds versions, reads their manifests, verifies file checksums."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from app.manifest import Manifest, ManifestError, is_model_name, is_version, load_manifest

log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """Why a model version is kept out of service. The message is shown in ``GET /models``, so it
    names files relative to the version directory and never an absolute path."""


@dataclass(frozen=True)
class VersionDirectory:
    """One ``<store>/<name>/<version>/`` directory, not yet read."""

    name: str
    version: int
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def discover(store: Path) -> list[VersionDirectory]:
    """Every ``<name>/<version>/`` under ``store``, by name then version. Hidden entries (an
    export's staging directory) are skipped silently, other misnamed ones with a warning."""
    if not store.is_dir():
        log.warning("model store %s is not a directory; no models to serve", store)
        return []
    found = []
    for model_dir in sorted(store.iterdir()):
        if model_dir.name.startswith(".") or not model_dir.is_dir():
            continue
        if not is_model_name(model_dir.name):
            log.warning("skipping %s: a model name is lower-case letters and digits, words joined by '-'",
                        model_dir.name)
            continue
        for version_dir in model_dir.iterdir():
            if version_dir.name.startswith(".") or not version_dir.is_dir():
                continue
            if not is_version(version_dir.name):
                log.warning("skipping %s/%s: versions are positive integers", model_dir.name, version_dir.name)
                continue
            found.append(VersionDirectory(model_dir.name, int(version_dir.name), version_dir))
    return sorted(found, key=lambda v: (v.name, v.version))


def read_manifest(directory: VersionDirectory) -> Manifest:
    """Read ``manifest.json`` against the contract (``app.manifest``); it must also describe
    the directory it is in."""
    try:
        manifest = load_manifest(directory.path)
    except ManifestError as e:
        raise ModelLoadError(str(e)) from None
    if (manifest.name, manifest.version) != (directory.name, directory.version):
        raise ModelLoadError(f"manifest.json describes {manifest.ref}, not the directory it is in")
    return manifest


def verify_files(directory: VersionDirectory, manifest: Manifest) -> None:
    """Check the size and SHA-256 of every file the manifest lists."""
    for filename, entry in manifest.files.items():
        path = directory.path / filename
        if not path.is_file():
            raise ModelLoadError(f"{filename} is missing")
        if path.stat().st_size != entry.bytes:
            raise ModelLoadError(f"{filename} has {path.stat().st_size} bytes, the manifest says {entry.bytes}")
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != entry.sha256:
            raise ModelLoadError(f"{filename} does not match its sha256 in the manifest")
