"""One change-feed watcher among replicas: the watcher runs only while its replica holds a lease
(docs/adr/0032-replica-leases.md).

Every replica runs an `ElectedWatcher`. It tries to take the lease every third of the lease time;
the one that has it runs the StudyArrivalWatcher and renews the lease at the same rhythm. When a
renewal fails (another replica took the lease after this one stalled, or the database cannot be
reached), it stops watching at once, before its lease can have run out. A holder that dies
(SIGKILL, lost host) stops renewing: after at most one lease time plus one try interval another
replica has the lease, reloads the feed position the old holder saved in the store (table
`feed_position`) and carries on from there. Changes the old holder handled but had not yet
recorded are handled again; the arrival Task's atomic conditional create keeps that harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from fhir_facade.watcher.change_feed import StudyArrivalWatcher

__all__ = ["ElectedWatcher", "LeaseTaker"]

log = logging.getLogger(__name__)


class LeaseTaker(Protocol):
    """What the election needs of the lease table (fhir_facade.store.leases.Leases)."""

    holder: str
    seconds: float

    def acquire(self, name: str) -> bool: ...

    def release(self, name: str) -> None: ...


class ElectedWatcher:
    """Runs `watcher` while this replica holds the lease `name`."""

    def __init__(self, watcher: StudyArrivalWatcher, leases: LeaseTaker, name: str) -> None:
        self.watcher = watcher
        self.leases = leases
        self.name = name
        self.interval = leases.seconds / 3
        #: Whether this replica is watching now (for tests and logs).
        self.leading = False

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Take part in the election until `stop` is set; gives the lease back on the way out."""
        try:
            while not stop.is_set():
                if await self._take():
                    await self._lead(stop)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.interval)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.leases.release, self.name)

    async def _take(self) -> bool:
        try:
            return await asyncio.to_thread(self.leases.acquire, self.name)
        except Exception:
            log.exception("Could not take or renew the watcher lease %s", self.name)
            return False

    async def _lead(self, stop: asyncio.Event) -> None:
        """Watch, renewing the lease, until `stop` or a failed renewal."""
        log.info("Replica %s now watches the change feed (lease %s)", self.leases.holder, self.name)
        self.watcher.forget_position()
        term = asyncio.Event()
        runner = asyncio.create_task(self.watcher.run_forever(term), name="study-arrival-watcher")
        self.leading = True
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.interval)
                if stop.is_set():
                    break
                if not await self._take():
                    log.warning(
                        "Replica %s lost the watcher lease %s; stops watching", self.leases.holder, self.name
                    )
                    break
        finally:
            self.leading = False
            term.set()
            await runner
