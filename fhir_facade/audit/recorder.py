"""`AuditRecorder`: stores AuditEvents off the request path, in batches, without losing any.

Requests hand their event to a bounded asyncio queue; one background task drains it and writes
each batch in one store transaction (in a worker thread: the store is synchronous). A full queue
makes the request wait (backpressure) rather than drop its record. `stop()` flushes everything
queued. Events are written through `ResourceStore` on the server's own authority (not through the
HTTP API, which refuses AuditEvent writes), so each one gets a version, search index rows and,
with an upstream configured, an outbox row carrying the audited request's correlation id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from sqlalchemy.exc import OperationalError

from fhir_facade.correlation import correlation_id
from fhir_facade.fhir.errors import FhirError
from fhir_facade.store import ResourceStore

__all__ = ["AuditRecorder"]

log = logging.getLogger(__name__)

#: One queued event and the correlation id of the request it records.
_Item = tuple[dict[str, Any], str | None]
#: Seconds between attempts when the database refuses a write (locked, restarting).
_RETRY_DELAYS = (0.2, 1.0, 3.0)


class AuditRecorder:
    """Queue and store AuditEvents. `start()` and `stop()` belong in the app lifespan; until
    `start()` (and after `stop()`) `record` writes directly, so nothing is ever dropped."""

    def __init__(self, store: ResourceStore, *, queue_size: int = 1000, batch_size: int = 100) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._store = store
        self._batch_size = batch_size
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue(queue_size)
        self._task: asyncio.Task[None] | None = None
        #: Events stored, and events that could not be stored (each logged in full).
        self.recorded = 0
        self.failed = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the background writer (idempotent)."""
        if not self.running:
            self._task = asyncio.create_task(self._drain(), name="audit-recorder")

    async def stop(self) -> None:
        """Store everything queued, then stop the writer (idempotent)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            await self._queue.put(None)  # after every event queued so far
            await task
        # Events queued while the writer was stopping: written here, not dropped.
        leftovers = [item for item in self._drain_nowait() if item is not None]
        if leftovers:
            await asyncio.to_thread(self._write, leftovers)

    async def record(self, event: dict[str, Any], correlation: str | None = None) -> None:
        """Queue one event; waits while the queue is full. `correlation` is the audited
        request's correlation id, stored on the event's outbox row."""
        if not self.running:
            await asyncio.to_thread(self._write, [(event, correlation)])
            return
        await self._queue.put((event, correlation))

    def record_nowait(self, event: dict[str, Any], correlation: str | None = None) -> bool:
        """Queue one event without waiting (for a cancelled request, which cannot await);
        False, with the event logged, when the queue is full or the writer is not running."""
        if self.running:
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait((event, correlation))
                return True
        self.failed += 1
        log.error("AuditEvent not recorded (cancelled request, queue full): %s", json.dumps(event))
        return False

    async def flush(self) -> None:
        """Wait until every event queued so far is stored."""
        if self.running:
            await self._queue.join()

    def _drain_nowait(self) -> list[_Item | None]:
        items: list[_Item | None] = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                return items
            self._queue.task_done()

    async def _drain(self) -> None:
        while True:
            items: list[_Item | None] = [await self._queue.get()]
            while len(items) < self._batch_size and not self._queue.empty():
                items.append(self._queue.get_nowait())
            events = [item for item in items if item is not None]
            try:
                if events:
                    await asyncio.to_thread(self._write, events)
            except Exception:  # a bug, not a database refusal (those are handled in _write)
                self.failed += len(events)
                log.exception("AuditEvents not recorded: %s", json.dumps([e for e, _ in events]))
            finally:
                for _ in items:
                    self._queue.task_done()
            if None in items:
                return

    def _write(self, items: list[_Item]) -> None:
        """One transaction for the batch; if it fails, each event alone, so one bad event
        costs only itself."""
        if len(items) > 1:
            try:
                with self._store.transaction():
                    for event, correlation in items:
                        self._create(event, correlation)
            except (FhirError, OperationalError) as exc:
                log.warning("Batch of %d AuditEvents failed (%s); storing them one by one", len(items), exc)
            else:
                self.recorded += len(items)
                return
        for event, correlation in items:
            self._write_one(event, correlation)

    def _write_one(self, event: dict[str, Any], correlation: str | None) -> None:
        for delay in (*_RETRY_DELAYS, None):
            try:
                self._create(event, correlation)
            except OperationalError as exc:  # locked or unreachable database: try again
                if delay is None:
                    error: Exception = exc
                    break
                time.sleep(delay)
                continue
            except FhirError as exc:  # an event our builder got wrong: keep it in the log
                error = exc
                break
            self.recorded += 1
            return
        self.failed += 1
        log.error("AuditEvent could not be stored (%s): %s", error, json.dumps(event))

    def _create(self, event: dict[str, Any], correlation: str | None) -> None:
        # The outbox row takes the correlation id from the context: the audited request's.
        token = correlation_id.set(correlation)
        try:
            self._store.create(event)
        finally:
            correlation_id.reset(token)
