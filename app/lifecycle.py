"""When the service reconciles with the model store: at start-up (the first reconcile, after which
readiness can be true), every ``rescan_seconds``, on ``SIGHUP``, and when an operator asks
(``POST /admin/rescan``). What a reconcile does is ``app.registry``'s business; this module only
schedules it, off the event loop, and keeps a reference to every task it starts.

After a reconcile that loaded or retired versions, the heap is frozen (`freeze_heap`): everything
alive then (modules, sessions, vocabularies) leaves the garbage collector's generations, so a full
collection under load walks only what requests allocate instead of pausing the service for the
whole heap."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from contextlib import suppress

from app.registry import ModelRegistry, ReconcileReport

log = logging.getLogger(__name__)


def freeze_heap() -> None:
    """Collect, then exclude every object alive now from future collections (``gc.freeze``). A
    gen-2 collection walks every tracked object: measured in the test process (whose heap also holds
    torch), one stalled every request of an overloaded scheduler for 220 ms, twice the admission bound;
    with the heap frozen, admitted requests kept it. Frozen objects are still freed by reference counting;
    unfreezing first lets this collection reclaim cycles left by versions unloaded since the last freeze."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class StoreWatcher:
    def __init__(self, registry: ModelRegistry, rescan_seconds: float):
        self.registry = registry
        self.rescan_seconds = rescan_seconds
        self._tasks: set[asyncio.Task] = set()
        self._sighup = False

    def start(self) -> None:
        """The first reconcile now, then the periodic one; ``SIGHUP`` asks for one at any time."""
        self._spawn(self._watch())
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            self._sighup = True
        except (RuntimeError, ValueError, NotImplementedError):  # not the main thread (tests), or no SIGHUP
            log.debug("SIGHUP is not handled in this process")

    async def rescan(self, trigger: str) -> ReconcileReport:
        report = await asyncio.to_thread(self.registry.reconcile, trigger)
        if report.loaded or report.removed or report.changed:
            freeze_heap()
        return report

    async def _watch(self) -> None:
        await self.rescan("start-up")
        while self.rescan_seconds > 0:
            await asyncio.sleep(self.rescan_seconds)
            try:
                await self.rescan("periodic")
            except Exception:  # the next scan tries again; the service keeps serving what it has
                log.exception("reconciling with the model store failed")

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reconciling with the model store")
        self._spawn(self.rescan("SIGHUP"))

    def _spawn(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        self.registry.stop()
        if self._sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with suppress(asyncio.CancelledError, Exception):
                await task
