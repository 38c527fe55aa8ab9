"""Group commit of delivery progress: the deliveries that finish while a commit is under way share
the next one.

Each delivered event must be recorded before its subscription's next event is sent (so a crash
re-sends at most the one in flight, ADR 0026); with many subscriptions delivered at once (a fan-out
to 1,000), one transaction per event would make the database, not the receivers, the bottleneck.
`ProgressWriter.record` queues a `Progress` and waits for the transaction that applies it; one
flushing task applies everything queued in one transaction, then whatever queued meanwhile, so an
idle server commits each record at once and a busy one in batches, without a timer.
"""

from __future__ import annotations

import asyncio

from starlette.concurrency import run_in_threadpool

from fhir_facade.subscriptions.queue import Progress, SubscriptionQueue

__all__ = ["ProgressWriter"]


class ProgressWriter:
    def __init__(self, queue: SubscriptionQueue) -> None:
        self._queue = queue
        self._waiting: list[tuple[Progress, asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def record(self, progress: Progress) -> bool:
        """Apply `progress` durably; False when the lease it names was no longer the caller's."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((progress, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="subscription-progress")
        return await future

    async def _flush(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                applied = await run_in_threadpool(self._queue.apply, [progress for progress, _ in batch])
            except Exception as error:  # the database refused: each waiter gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), ok in zip(batch, applied, strict=True):
                if not future.done():
                    future.set_result(ok)
