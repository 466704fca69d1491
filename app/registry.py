"""Which model versions are in service. The store is the source of truth and the registry
reconciles with it (DESIGN.md), as Triton's poll mode does: `ModelRegistry.reconcile` scans the
store, reads each new version into memory and verifies it (checksums, self-test), warms it, and
only then lets it take traffic; the default version of a model switches atomically; a version
whose directory is gone is retired and unloaded once the requests using it have finished.

Start-up is the first reconcile; after it, one runs on every ``LSTM_SERVE_RESCAN_SECONDS``, on
``SIGHUP`` and on ``POST /admin/rescan`` (``app.main`` wires those). Reconciles run one at a time,
off the event loop.

A served version's bytes are held by the process (``app.store.read_version``), so nothing done
to its files can crash the service or change an answer. A served version whose files change is
re-read and re-verified: if the files still match what it serves, nothing happens; if not, it keeps
serving what it loaded and ``files_changed`` says why (remove the directory to retire it)."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from app.errors import Conflict, ModelNotFound, ModelUnavailable, NotReady, WrongTask
from app.manifest import Manifest, Task
from app.runtime import RUNTIMES, InferenceObserver, LanguageModelRuntime, ModelRuntime, SentimentRuntime
from app.store import ModelLoadError, VersionDirectory, VersionFiles, discover, fingerprint, read_version

log = logging.getLogger(__name__)

# When a request names no model, these serve their task if present; otherwise the first by name.
PREFERRED_MODELS = {"language-model": "ptb-lm", "sentiment": "sst2-sentiment"}


class ModelState(StrEnum):
    LOADING = "loading"
    SERVING = "serving"
    FAILED = "failed"
    UNLOADED = "unloaded"  # taken out of service by an operator; scans leave it alone until it is loaded again


@dataclass
class ModelVersion:
    """One version found in the store; ``manifest`` is None when it could not be read."""

    name: str
    version: int
    state: ModelState = ModelState.LOADING
    reason: str | None = None
    manifest: Manifest | None = None
    runtime: ModelRuntime | None = None
    fingerprint: tuple = ()  # the files as last read (app.store.fingerprint)
    files_changed: str | None = None  # serving, but the files on disk no longer match what it serves

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def task(self) -> str | None:
        return self.manifest.task if self.manifest else None


@dataclass
class ReconcileReport:
    """What one reconcile changed, as model@version references."""

    trigger: str
    loaded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    seconds: float = 0.0


ObserverFactory = Callable[[str, int], InferenceObserver]


class ModelRegistry:
    def __init__(
        self,
        store: Path,
        threads: int,
        max_tokens: int,
        observer: ObserverFactory | None = None,
        *,
        allow_links_outside_store: bool = False,
        ready_requires_every_model: bool = True,
        on_unload: Callable[[ModelRuntime], None] | None = None,
    ):
        self.store = store
        self.threads = threads
        self.max_tokens = max_tokens
        self.allow_links_outside_store = allow_links_outside_store
        self.ready_requires_every_model = ready_requires_every_model
        self._observer = observer
        self._on_unload = on_unload or (lambda runtime: None)
        # Replaced whole, never changed in place, so a reader always sees one consistent store.
        self._versions: dict[tuple[str, int], ModelVersion] = {}
        self._pins: dict[str, int] = {}
        self._draining: list[ModelRuntime] = []  # retired, still answering requests in flight
        self._reconcile_lock = threading.Lock()
        self._scanned = threading.Event()
        self._stopping = threading.Event()
        self.load_failures: Counter[str] = Counter()  # by model name
        self.reconciles: Counter[str] = Counter()  # by trigger
        self._load_ids = itertools.count(1)

    # -- what is in service ----------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        """True once the first reconcile has tried every version in the store."""
        return self._scanned.is_set()

    @property
    def ready(self) -> bool:
        """The first reconcile is done and every model in the store has a version in service (or,
        with ``ready_requires_every_model`` off, at least one model does)."""
        if not self.loaded:
            return False
        names = {v.name for v in self._versions.values()}
        if not names:
            return False
        return not self.missing() if self.ready_requires_every_model else len(self.missing()) < len(names)

    def missing(self) -> list[str]:
        """Models in the store with no version in service."""
        versions = self._versions.values()
        return sorted({v.name for v in versions} - {v.name for v in versions if v.state is ModelState.SERVING})

    def versions(self) -> list[ModelVersion]:
        return sorted(self._versions.values(), key=lambda v: (v.name, v.version))

    def draining(self) -> list[str]:
        return [runtime.ref for runtime in self._draining]

    def pins(self) -> dict[str, int]:
        return dict(self._pins)

    def default_version(self, name: str) -> int | None:
        """The version a request for ``name`` without a version gets: the pinned one while it
        serves, else the highest version in service."""
        serving = [v.version for v in self._versions.values() if v.name == name and v.state is ModelState.SERVING]
        pinned = self._pins.get(name)
        return pinned if pinned in serving else max(serving, default=None)

    # -- reconciling with the store --------------------------------------------------------

    def load_all(self) -> ReconcileReport:
        """The first reconcile (blocking; run it off the event loop)."""
        return self.reconcile("start-up")

    def reconcile(self, trigger: str = "scan") -> ReconcileReport:
        """Bring the versions in service in line with the store (blocking; one at a time)."""
        with self._reconcile_lock:
            started = time.perf_counter()
            report = ReconcileReport(trigger)
            self.reconciles[trigger] += 1
            try:
                found = {(d.name, d.version): d for d in discover(self.store)}
            except OSError:
                log.exception("the model store %s cannot be read", self.store)
                found = {(v.name, v.version): None for v in self._versions.values()}  # change nothing
            try:
                self._remove_gone(found, report)
                for key, directory in sorted(found.items()):
                    if self._stopping.is_set():
                        break
                    if directory is not None:
                        self._reconcile_version(key, directory, report)
            finally:
                self._scanned.set()
            report.seconds = round(time.perf_counter() - started, 3)
            if report.loaded or report.failed or report.removed or report.changed or trigger == "start-up":
                serving = [v.ref for v in self.versions() if v.state is ModelState.SERVING]
                log.info("reconciled with the store (%s) in %.1fs: serving %s; loaded %s, failed %s, removed %s, "
                         "changed %s", trigger, report.seconds, ", ".join(serving) or "nothing",
                         report.loaded or "-", report.failed or "-", report.removed or "-", report.changed or "-")
            return report

    def stop(self) -> None:
        """Stop a reconcile in progress after the version it is loading."""
        self._stopping.set()

    def _publish(self, versions: dict[tuple[str, int], ModelVersion]) -> None:
        self._versions = dict(versions)

    def _remove_gone(self, found: dict, report: ReconcileReport) -> None:
        current = dict(self._versions)
        for key, entry in list(current.items()):
            if key not in found:
                del current[key]
                report.removed.append(entry.ref)
                log.info("%s is gone from the store; retired", entry.ref)
                if entry.runtime is not None:
                    self._retire(entry.runtime)
        self._publish(current)

    def _reconcile_version(self, key: tuple[str, int], directory: VersionDirectory, report: ReconcileReport) -> None:
        entry = self._versions.get(key)
        if entry is None:
            entry = ModelVersion(directory.name, directory.version)
            self._publish({**self._versions, key: entry})
            self._load(entry, directory, report)
            return
        if entry.state is ModelState.UNLOADED or fingerprint(directory) == entry.fingerprint:
            return
        if entry.state is ModelState.SERVING:
            self._recheck(entry, directory, report)
        else:  # failed before: its files changed, so try again
            self._load(entry, directory, report)

    def _load(self, entry: ModelVersion, directory: VersionDirectory, report: ReconcileReport | None) -> bool:
        """Read, verify, self-test and warm ``directory``; on success it takes traffic at once
        (replacing the runtime ``entry`` had, which is retired). On failure ``entry`` keeps what it
        served, or is marked failed if it served nothing."""
        started = time.perf_counter()
        files: VersionFiles | None = None
        try:
            files = read_version(directory, self.allow_links_outside_store)
            entry.manifest = entry.manifest or files.manifest
            runtime = self._runtime(files)
        except ModelLoadError as e:
            entry.fingerprint = fingerprint(directory)
            return self._failed(entry, str(e), e, report)
        except Exception as e:  # a broken model must not take the others down with it
            entry.fingerprint = fingerprint(directory)
            log.exception("%s cannot be loaded", directory.ref)
            return self._failed(entry, f"unexpected {type(e).__name__} while loading", None, report)
        finally:
            if files is not None:
                files.discard()  # the sessions hold their weights now (see VersionFiles)
        if directory.outside:
            log.warning("%s; serving it because LSTM_SERVE_ALLOW_LINKS_OUTSIDE_STORE is set", directory.outside)
        previous = entry.runtime
        entry.manifest, entry.fingerprint = files.manifest, files.fingerprint
        entry.runtime, entry.state, entry.reason, entry.files_changed = runtime, ModelState.SERVING, None, None
        if previous is not None:
            self._retire(previous)
        if report is not None:
            report.loaded.append(entry.ref)
        log.info("%s (%s) verified, self-tested and warm in %.2fs", entry.ref, runtime.task,
                 time.perf_counter() - started)
        return True

    def _runtime(self, files: VersionFiles) -> ModelRuntime:
        manifest = files.manifest
        observe = self._observer(manifest.name, manifest.version) if self._observer else None
        runtime = RUNTIMES[manifest.task](files, self.threads, self.max_tokens, observe)
        runtime.load_id = next(self._load_ids)
        runtime.self_test()
        runtime.warm_up()
        return runtime

    def _failed(self, entry: ModelVersion, reason: str, error: Exception | None,
                report: ReconcileReport | None) -> bool:
        self.load_failures[entry.name] += 1
        if report is not None:
            (report.changed if entry.runtime is not None else report.failed).append(entry.ref)
        cause = f" ({error.__cause__})" if error is not None and error.__cause__ else ""
        if entry.runtime is not None:
            entry.files_changed = reason
            log.error("%s: its files no longer verify (%s%s); it keeps serving what it loaded", entry.ref, reason,
                      cause)
        else:
            entry.state, entry.reason = ModelState.FAILED, reason
            log.error("%s is out of service: %s%s", entry.ref, reason, cause)
        return False

    def _recheck(self, entry: ModelVersion, directory: VersionDirectory, report: ReconcileReport) -> None:
        """A serving version's files changed on disk: re-read them. The same bytes: nothing to do.
        Different bytes that verify: a new runtime replaces the old one. Otherwise: keep serving."""
        try:
            files = read_version(directory, self.allow_links_outside_store)
        except ModelLoadError as e:
            entry.fingerprint = fingerprint(directory)
            self._failed(entry, str(e), e, report)
            return
        files.discard()
        if files.manifest == entry.manifest:
            entry.fingerprint, entry.files_changed = files.fingerprint, None
            log.info("%s: its files were touched but still match what it serves", entry.ref)
            return
        report.changed.append(entry.ref)
        log.warning("%s: its files were replaced with different content; loading that instead", entry.ref)
        self._load(entry, directory, report)

    def _retire(self, runtime: ModelRuntime) -> None:
        """Take ``runtime`` out of service; it is unloaded once its requests in flight are done."""
        self._draining.append(runtime)
        runtime.retire(lambda: self._unloaded(runtime))

    def _unloaded(self, runtime: ModelRuntime) -> None:
        self._draining = [r for r in self._draining if r is not runtime]
        self._on_unload(runtime)
        log.info("%s (load %d) drained and unloaded", runtime.ref, runtime.load_id)

    # -- operator actions (the admin API) ----------------------------------------------------

    def _entry(self, name: str, version: int) -> ModelVersion:
        entry = self._versions.get((name, version))
        if entry is None:
            raise ModelNotFound(f"there is no {name}@{version} in the store",
                                {"available": [v.ref for v in self.versions()]})
        return entry

    def unload(self, name: str, version: int) -> ModelVersion:
        """Take a version out of service until `load`; scans leave it alone meanwhile."""
        with self._reconcile_lock:
            entry = self._entry(name, version)
            if entry.runtime is not None:
                self._retire(entry.runtime)
            entry.runtime, entry.state, entry.reason = None, ModelState.UNLOADED, "unloaded by an operator"
            entry.fingerprint = ()
            log.info("%s unloaded by an operator", entry.ref)
            return entry

    def load(self, name: str, version: int) -> ModelVersion:
        """(Re)load a version from the store now: after `unload`, or to retry a failed one."""
        with self._reconcile_lock:
            entry = self._entry(name, version)
            directory = next((d for d in discover(self.store) if (d.name, d.version) == (name, version)), None)
            if directory is None:
                raise ModelNotFound(f"{entry.ref} is no longer in the store")
            if entry.state is ModelState.UNLOADED:
                entry.state, entry.reason = ModelState.LOADING, None
            self._load(entry, directory, None)
            return entry

    def pin(self, name: str, version: int) -> None:
        """Make ``version`` the default of ``name`` (rollback) while it serves, whatever else is added."""
        entry = self._entry(name, version)
        if entry.state is not ModelState.SERVING:
            raise Conflict(f"{entry.ref} is not in service ({entry.state.value}); only a serving version can be pinned")
        self._pins = {**self._pins, name: version}
        log.info("%s pinned as the default version of %s", entry.ref, name)

    def unpin(self, name: str) -> None:
        if name not in self._pins:
            raise ModelNotFound(f"{name} has no pinned version")
        self._pins = {k: v for k, v in self._pins.items() if k != name}
        log.info("%s unpinned: its highest version in service is the default again", name)

    # -- resolving a request's model ---------------------------------------------------------

    def language_model(self, spec: str | None) -> LanguageModelRuntime:
        runtime = self.resolve(spec, LanguageModelRuntime.task)
        assert isinstance(runtime, LanguageModelRuntime)
        return runtime

    def sentiment_model(self, spec: str | None) -> SentimentRuntime:
        runtime = self.resolve(spec, SentimentRuntime.task)
        assert isinstance(runtime, SentimentRuntime)
        return runtime

    def resolve(self, spec: str | None, task: Task) -> ModelRuntime:
        """The runtime for ``spec`` ("name", "name@version" or None for the task's default model).
        Without a version, the model's default version (`default_version`) is used."""
        if not self.loaded:
            raise NotReady("models are still loading; retry shortly", headers={"Retry-After": "2"})
        versions = list(self._versions.values())  # one consistent view of the store
        name, _, version_text = (spec or "").partition("@")
        name = name or self._default_name(versions, task)
        matching = [v for v in versions if v.name == name]
        if not matching:
            raise ModelNotFound(f"there is no model {name!r}", {"available": self._serving(versions, task)})
        if version_text:
            matching = [v for v in matching if v.version == int(version_text)]
            if not matching:
                raise ModelNotFound(f"model {name!r} has no version {version_text}",
                                    {"available": self._serving(versions, task)})
        tasks = {v.task for v in matching if v.task}
        if tasks and task not in tasks:
            raise WrongTask(f"{spec or name} is a {tasks.pop()} model; this endpoint needs a {task} model",
                            {"available": self._serving(versions, task)})
        serving = {v.version: v.runtime for v in matching if v.task == task and v.runtime is not None
                   and v.state is ModelState.SERVING}
        if not serving:
            raise ModelUnavailable(f"{spec or name} is not in service; GET /models/{name} says why",
                                   {"available": self._serving(versions, task)})
        pinned = self._pins.get(name)
        chosen = pinned if not version_text and pinned in serving else max(serving)
        return serving[chosen]  # type: ignore[return-value]

    @staticmethod
    def _serving(versions: list[ModelVersion], task: str) -> list[str]:
        return sorted(v.ref for v in versions if v.task == task and v.state is ModelState.SERVING)

    @staticmethod
    def _default_name(versions: list[ModelVersion], task: str) -> str:
        serving = sorted({v.name for v in versions if v.task == task and v.state is ModelState.SERVING})
        if not serving:
            raise ModelUnavailable(f"no {task} model is in service")
        preferred = PREFERRED_MODELS.get(task)
        return preferred if preferred in serving else serving[0]
