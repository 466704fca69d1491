"""The model store on disk: ``<store>/<name>/<version>/manifest.json`` beside the graphs and the
vocabulary (see DESIGN.md). Finds versions, reads their manifests, verifies file checksums."""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from app.manifest import Manifest, ManifestError, is_model_name, is_version, load_manifest

log = logging.getLogger(__name__)

COPY_CHUNK_BYTES = 1 << 20


class ModelLoadError(Exception):
    """Why a model version is kept out of service. The message is shown in ``GET /models``, so it
    names files relative to the version directory and never an absolute path."""


@dataclass(frozen=True)
class VersionDirectory:
    """One ``<store>/<name>/<version>/`` directory, not yet read. ``outside`` says why its real
    path is outside the store (a symbolic link), or is None."""

    name: str
    version: int
    path: Path
    outside: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class VersionFiles:
    """A version as read by the service: its manifest, and every file it lists copied into
    ``directory``, a private directory only this process knows, each checked against its size and
    SHA-256 as it was copied. The service loads from this copy and then deletes it (`discard`).

    Why a copy: onnxruntime memory-maps a graph's external weights, so a weights file truncated in
    the store under a running service would crash it (SIGBUS) on the next call. Mapped from the
    copy, unlinked as soon as the sessions exist, the pages belong to the process alone; the graphs
    of one version still share one mapping of their weights. Files are streamed, never held whole
    in memory (a freed 30 MB buffer would raise glibc's mmap threshold and leave later large
    allocations on the heap for good). ``fingerprint`` identifies the store's files as they were
    read (see `fingerprint`)."""

    manifest: Manifest
    directory: Path
    fingerprint: tuple

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def discover(store: Path) -> list[VersionDirectory]:
    """Every ``<name>/<version>/`` under ``store``, by name then version. Hidden entries (an
    export's staging directory) are skipped silently, other misnamed ones with a warning."""
    if not store.is_dir():
        log.warning("model store %s is not a directory; no models to serve", store)
        return []
    root = store.resolve()
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
            outside = None
            if not version_dir.resolve().is_relative_to(root):
                outside = f"{model_dir.name}/{version_dir.name} resolves outside the model store (a symbolic link)"
            found.append(VersionDirectory(model_dir.name, int(version_dir.name), version_dir, outside))
    return sorted(found, key=lambda v: (v.name, v.version))


def fingerprint(directory: VersionDirectory) -> tuple:
    """What changes when any file of the version is written, replaced, truncated or removed:
    the (name, size, modification time, inode) of every entry in its directory. Cheap: no file is read."""
    entries = []
    try:
        for path in sorted(directory.path.iterdir()):
            try:
                stat = path.stat()
            except OSError:
                entries.append((path.name, None))
                continue
            entries.append((path.name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    except OSError:
        return ()
    return tuple(entries)


def read_version(directory: VersionDirectory, allow_outside: bool = False) -> VersionFiles:
    """Read and check a version: the manifest against the contract and its directory, then every
    file it lists into memory, checked against its size and SHA-256. Files (or the directory) that
    resolve outside the store are refused unless ``allow_outside``. Raises `ModelLoadError`."""
    if directory.outside and not allow_outside:
        raise ModelLoadError(f"{directory.outside}; set LSTM_SERVE_ALLOW_LINKS_OUTSIDE_STORE=true to serve it")
    before = fingerprint(directory)
    try:
        manifest = load_manifest(directory.path)
    except ManifestError as e:
        raise ModelLoadError(str(e)) from None
    if (manifest.name, manifest.version) != (directory.name, directory.version):
        raise ModelLoadError(f"manifest.json describes {manifest.ref}, not the directory it is in")
    real_dir = directory.path.resolve()
    private = Path(tempfile.mkdtemp(prefix=f"lstm-serve-{manifest.name}-{manifest.version}-"))
    try:
        for filename, entry in manifest.files.items():
            path = directory.path / filename
            if path.is_symlink() and not path.resolve().is_relative_to(real_dir) and not allow_outside:
                raise ModelLoadError(f"{filename} is a symbolic link out of its version directory; "
                                     "set LSTM_SERVE_ALLOW_LINKS_OUTSIDE_STORE=true to serve it")
            size, digest = _copy(path, private / filename, filename)
            if size != entry.bytes:
                raise ModelLoadError(f"{filename} has {size} bytes, the manifest says {entry.bytes}")
            if digest != entry.sha256:
                raise ModelLoadError(f"{filename} does not match its sha256 in the manifest")
        after = fingerprint(directory)
        if after != before:
            raise ModelLoadError("the files changed while they were read; the next scan tries again")
    except BaseException:
        shutil.rmtree(private, ignore_errors=True)
        raise
    return VersionFiles(manifest, private, after)


def _copy(source: Path, target: Path, filename: str) -> tuple[int, str]:
    """Copy ``source`` to ``target`` in chunks; its size and SHA-256 as copied."""
    digest = hashlib.sha256()
    size = 0
    try:
        with source.open("rb") as reader, target.open("wb") as writer:
            while chunk := reader.read(COPY_CHUNK_BYTES):
                digest.update(chunk)
                writer.write(chunk)
                size += len(chunk)
    except FileNotFoundError:
        raise ModelLoadError(f"{filename} is missing") from None
    except OSError as e:
        raise ModelLoadError(f"{filename} cannot be read ({type(e).__name__})") from None
    return size, digest.hexdigest()
