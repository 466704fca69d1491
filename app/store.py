"""The model store on disk: ``<store>/<name>/<version>/manifest.json`` beside the graphs and the
vocabulary (see DESIGN.md). Finds versions, parses manifests, verifies file checksums."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
VERSION = re.compile(r"^[1-9][0-9]*$")
MANIFEST_FILE = "manifest.json"
Task = Literal["language-model", "sentiment"]


class ModelLoadError(Exception):
    """Why a model version is kept out of service. The message is shown in ``GET /models``, so it
    names files relative to the version directory and never an absolute path."""


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class TensorSpec(_Manifest):
    dtype: str
    shape: list[int | str]


class GraphSpec(_Manifest):
    file: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]


class SpecialToken(_Manifest):
    token: str
    id: int


class TokenizerSpec(_Manifest):
    normaliser: str
    vocab_file: str
    vocab_size: int
    special_tokens: dict[str, SpecialToken | None] = Field(default_factory=dict)


class FileEntry(_Manifest):
    sha256: str
    bytes: int


class SelfTestCheck(_Manifest):
    output: str
    index: list[int]
    value: float


class SelfTestCase(_Manifest):
    graph: str
    inputs: dict[str, list[Any]]
    checks: list[SelfTestCheck]


class SelfTest(_Manifest):
    tolerance: float
    cases: list[SelfTestCase] = Field(min_length=1)


class Manifest(_Manifest):
    """``manifest.json`` of one model version; only the keys the service relies on are typed."""

    name: str
    version: int
    task: Task
    created: str
    description: str = ""
    files: dict[str, FileEntry]
    graphs: dict[str, GraphSpec]
    tokenizer: TokenizerSpec
    labels: list[str] | None = None
    architecture: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    conventions: dict[str, Any] = Field(default_factory=dict)
    selftest: SelfTest


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
        if not MODEL_NAME.match(model_dir.name):
            log.warning("skipping %s: model names are lower-case letters, digits and '-'", model_dir.name)
            continue
        for version_dir in model_dir.iterdir():
            if version_dir.name.startswith(".") or not version_dir.is_dir():
                continue
            if not VERSION.match(version_dir.name):
                log.warning("skipping %s/%s: versions are positive integers", model_dir.name, version_dir.name)
                continue
            found.append(VersionDirectory(model_dir.name, int(version_dir.name), version_dir))
    return sorted(found, key=lambda v: (v.name, v.version))


def read_manifest(directory: VersionDirectory) -> Manifest:
    """Parse and sanity-check ``manifest.json``: it must describe this directory, and every file
    it points at must be listed in its checksum table."""
    try:
        raw = json.loads((directory.path / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{MANIFEST_FILE} is missing") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{MANIFEST_FILE} is not readable JSON ({type(e).__name__})") from None
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        fields = sorted({".".join(str(p) for p in err["loc"]) for err in e.errors()})
        raise ModelLoadError(f"{MANIFEST_FILE} has missing or invalid keys: {', '.join(fields[:10])}") from None
    if (manifest.name, manifest.version) != (directory.name, directory.version):
        raise ModelLoadError(
            f"{MANIFEST_FILE} describes {manifest.name}@{manifest.version}, not the directory it is in"
        )
    if "full" not in manifest.graphs:
        raise ModelLoadError(f"{MANIFEST_FILE} lists no 'full' graph")
    for referenced in [manifest.tokenizer.vocab_file, *(g.file for g in manifest.graphs.values())]:
        if referenced not in manifest.files:
            raise ModelLoadError(f"{referenced} is not in the manifest's checksum table")
    return manifest


def verify_files(directory: VersionDirectory, manifest: Manifest) -> None:
    """Check the size and SHA-256 of every file the manifest lists."""
    for filename, entry in manifest.files.items():
        if Path(filename).name != filename or filename in ("", ".", ".."):
            raise ModelLoadError(f"manifest lists {filename!r}, which is not a plain file name")
        path = directory.path / filename
        if not path.is_file():
            raise ModelLoadError(f"{filename} is missing")
        if path.stat().st_size != entry.bytes:
            raise ModelLoadError(f"{filename} has {path.stat().st_size} bytes, the manifest says {entry.bytes}")
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != entry.sha256:
            raise ModelLoadError(f"{filename} does not match its sha256 in the manifest")
