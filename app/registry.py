"""Which model versions are in service: loads every version in the store (verify checksums, load,
self-test, warm up), keeps the ones that fail out of service with the reason, and resolves a
request's ``model`` ("name" or "name@version") to a loaded runtime."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from app.errors import ModelNotFound, ModelUnavailable, NotReady, WrongTask
from app.runtime import RUNTIMES, InferenceObserver, LanguageModelRuntime, ModelRuntime, SentimentRuntime
from app.store import Manifest, ModelLoadError, VersionDirectory, discover, read_manifest, verify_files

log = logging.getLogger(__name__)

# When a request names no model, these serve their task if present; otherwise the first by name.
PREFERRED_MODELS = {"language-model": "ptb-lm", "sentiment": "sst2-sentiment"}


class ModelState(StrEnum):
    LOADING = "loading"
    SERVING = "serving"
    FAILED = "failed"


@dataclass
class ModelVersion:
    """One version found in the store; ``manifest`` is None when it could not be read."""

    name: str
    version: int
    state: ModelState = ModelState.LOADING
    reason: str | None = None
    manifest: Manifest | None = None
    runtime: ModelRuntime | None = None

    @property
    def task(self) -> str | None:
        return self.manifest.task if self.manifest else None


ObserverFactory = Callable[[str, int], InferenceObserver]


class ModelRegistry:
    def __init__(
        self,
        store: Path,
        threads: int,
        max_tokens: int,
        observer: ObserverFactory | None = None,
    ):
        self.store = store
        self.threads = threads
        self.max_tokens = max_tokens
        self._observer = observer
        self._versions: list[ModelVersion] = []
        self._loaded = threading.Event()
        self._stopping = threading.Event()

    @property
    def loaded(self) -> bool:
        """True once every version in the store has been tried."""
        return self._loaded.is_set()

    @property
    def ready(self) -> bool:
        """Loading has finished and at least one model serves."""
        return self.loaded and any(v.state is ModelState.SERVING for v in self._versions)

    def versions(self) -> list[ModelVersion]:
        return list(self._versions)

    def load_all(self) -> None:
        """Find and load every version in the store (blocking; run it off the event loop)."""
        started = time.perf_counter()
        try:
            directories = discover(self.store)
            self._versions = [ModelVersion(d.name, d.version) for d in directories]
            for directory, entry in zip(directories, self._versions, strict=True):
                if self._stopping.is_set():
                    return
                self._load(directory, entry)
        except OSError:
            log.exception("the model store %s cannot be read", self.store)
        finally:
            self._loaded.set()
        serving = [f"{v.name}@{v.version}" for v in self._versions if v.state is ModelState.SERVING]
        log.info("model loading done in %.1fs: serving %s", time.perf_counter() - started,
                 ", ".join(serving) or "nothing")

    def stop_loading(self) -> None:
        self._stopping.set()

    def _load(self, directory: VersionDirectory, entry: ModelVersion) -> None:
        started = time.perf_counter()
        try:
            entry.manifest = read_manifest(directory)
            verify_files(directory, entry.manifest)
            observe = self._observer(entry.name, entry.version) if self._observer else None
            runtime = RUNTIMES[entry.manifest.task](entry.manifest, directory.path, self.threads, self.max_tokens,
                                                    observe)
            runtime.self_test()
            runtime.warm_up()
        except ModelLoadError as e:
            entry.state, entry.reason = ModelState.FAILED, str(e)
            cause = f" ({e.__cause__})" if e.__cause__ else ""
            log.error("%s is out of service: %s%s", directory.ref, e, cause)
            return
        except Exception as e:  # a broken model must not take the others down with it
            entry.state, entry.reason = ModelState.FAILED, f"unexpected {type(e).__name__} while loading"
            log.exception("%s is out of service", directory.ref)
            return
        entry.runtime, entry.state = runtime, ModelState.SERVING
        log.info("%s (%s) verified, self-tested and warm in %.2fs", directory.ref, runtime.task,
                 time.perf_counter() - started)

    def language_model(self, spec: str | None) -> LanguageModelRuntime:
        runtime = self.resolve(spec, LanguageModelRuntime.task)
        assert isinstance(runtime, LanguageModelRuntime)
        return runtime

    def sentiment_model(self, spec: str | None) -> SentimentRuntime:
        runtime = self.resolve(spec, SentimentRuntime.task)
        assert isinstance(runtime, SentimentRuntime)
        return runtime

    def resolve(self, spec: str | None, task: str) -> ModelRuntime:
        """The runtime for ``spec`` ("name", "name@version" or None for the task's default model).
        Without a version, the highest version in service is used."""
        if not self.loaded:
            raise NotReady("models are still loading; retry shortly", headers={"Retry-After": "2"})
        name, _, version_text = (spec or "").partition("@")
        name = name or self._default_name(task)
        matching = [v for v in self._versions if v.name == name]
        if not matching:
            raise ModelNotFound(f"there is no model {name!r}", {"available": self._serving(task)})
        if version_text:
            matching = [v for v in matching if v.version == int(version_text)]
            if not matching:
                raise ModelNotFound(f"model {name!r} has no version {version_text}",
                                    {"available": self._serving(task)})
        tasks = {v.task for v in matching if v.task}
        if tasks and task not in tasks:
            raise WrongTask(f"{spec or name} is a {tasks.pop()} model; this endpoint needs a {task} model",
                            {"available": self._serving(task)})
        serving = [v for v in matching if v.task == task and v.runtime is not None]
        if not serving:
            raise ModelUnavailable(f"{spec or name} is not in service; GET /models/{name} says why",
                                   {"available": self._serving(task)})
        return max(serving, key=lambda v: v.version).runtime  # type: ignore[return-value]

    def _serving(self, task: str) -> list[str]:
        return [f"{v.name}@{v.version}" for v in self._versions if v.task == task and v.state is ModelState.SERVING]

    def _default_name(self, task: str) -> str:
        serving = sorted({v.name for v in self._versions if v.task == task and v.state is ModelState.SERVING})
        if not serving:
            raise ModelUnavailable(f"no {task} model is in service")
        preferred = PREFERRED_MODELS.get(task)
        return preferred if preferred in serving else serving[0]

    def default_version(self, name: str) -> int | None:
        serving = [v.version for v in self._versions if v.name == name and v.state is ModelState.SERVING]
        return max(serving, default=None)
