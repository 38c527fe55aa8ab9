"""The rest-hook delivery worker: an in-process task of the app's lifespan, like the sync worker.

The worker leases due subscriptions (queue.py: one lease per subscription, `SKIP LOCKED` between
replicas) and delivers to up to FACADE_SUBSCRIPTION_CONCURRENCY of them at the same time, each in
its own task that goes through that subscription's events strictly one after the other: either
the handshake (status `requested`; a 2xx makes it `active`, Backport IG "Handshake") or one
notification per pending event, oldest first, stopping at the first failure. A failure schedules
a retry with exponential backoff; after FACADE_SUBSCRIPTION_MAX_FAILURES in a row the
subscription's status becomes `error` (a new version written by the server), and the next
successful delivery makes it `active` again: events keep being numbered while it is in `error`,
so a receiver that comes back gets every one it missed, in order.

Delivery is at least once, and at most one event per subscription is ever unrecorded: each
delivered event is recorded (progress.py, group commit) before the next is sent, so a crash sends
again only the events that were on the wire, with their event numbers for the receivers to drop
them. The worker wakes at once when `wake()` is called (after a commit that recorded events, see
runtime.py) and otherwise polls every FACADE_SUBSCRIPTION_POLL_INTERVAL (events recorded by another
replica). It also purges delivered event rows older than FACADE_SUBSCRIPTION_EVENT_RETENTION.

Every attempt (handshake or event, delivered or failed) is reported to `on_attempt` (the audit,
runtime.py). `full-resource` content is read through the interaction pipeline acting as the
subscription's author (`acting_as`, ADR 0009/0022): what the author may not read is not sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from starlette.concurrency import run_in_threadpool

from fhir_facade.auth.access import Access, acting_as, on_server_authority
from fhir_facade.fhir.errors import FhirError
from fhir_facade.fhir.pipeline import Origin, origin_scope
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.store.authorship import WRITE_AUTHOR
from fhir_facade.subscriptions.backport import SubscriptionSpec, parse_subscription
from fhir_facade.subscriptions.notification import NotificationEvent, notification_bundle
from fhir_facade.subscriptions.progress import ProgressWriter
from fhir_facade.subscriptions.queue import EventRow, Leased, Progress, SubscriptionQueue
from fhir_facade.subscriptions.topics import Topic

__all__ = ["DeliveryAttempt", "DeliverySettings", "DeliveryWorker", "event_notification", "read_focus"]

log = logging.getLogger(__name__)

_MAX_BACKOFF = 300.0
#: Subscriptions leased per delivery slot: those waiting for a slot hold their lease meanwhile, so
#: keep lease_seconds above (this - 1) x FACADE_SUBSCRIPTION_TIMEOUT.
_LEASED_AHEAD = 4


@dataclass(frozen=True)
class DeliverySettings:
    base_url: str
    max_failures: int
    retry_seconds: float
    poll_interval: float
    timeout: float
    lease_seconds: float = 60.0
    #: Events of one subscription read per lease.
    batch: int = 20
    #: Subscriptions delivered to at the same time.
    concurrency: int = 64
    #: Seconds a delivered event row is kept; None keeps them all.
    retention: float | None = None


@dataclass(frozen=True)
class DeliveryAttempt:
    """One notification POSTed (or tried): what the audit records."""

    subscription_id: str
    author: str | None
    endpoint: str
    kind: str  # handshake or event-notification
    content: str
    event: EventRow | None
    #: The focus as sent (full-resource), None otherwise.
    focus: dict[str, Any] | None
    #: The receiver's HTTP status, None when it gave none (connection refused, timeout).
    status: int | None
    error: str | None
    started: datetime
    ended: datetime


AttemptObserver = Callable[[DeliveryAttempt], Awaitable[None]]


def _as(author: str | None) -> AbstractContextManager[None]:
    """The author's rights for a read done on its behalf (the server's own for no author)."""
    return acting_as(Access.from_principal(author)) if author else on_server_authority()


async def read_focus(readers: Mapping[str, ResourceProvider], event: EventRow) -> dict[str, Any] | None:
    """The event's version of its resource through the pipeline, with the rights in context; None
    when refused or gone."""
    provider = readers.get(event.resource_type)
    if provider is None:
        return None
    try:
        if event.version_id == 0:  # a live resource of the PACS (the study topic)
            return await provider.read(event.resource_id)
        return await provider.vread(event.resource_id, str(event.version_id))
    except FhirError:
        return None


async def event_notification(
    readers: Mapping[str, ResourceProvider], event: EventRow, content: str, author: str | None
) -> NotificationEvent:
    """The notification of one event row, for rest-hook and websocket alike: with `full-resource`
    content its focus is read acting as the subscription's author (what the author may not read is
    not sent)."""
    focus = None
    if content == "full-resource":
        with origin_scope(Origin.INTERNAL), _as(author):
            focus = await read_focus(readers, event)
    return NotificationEvent(
        event.event_number,
        event.occurred_at,
        event.resource_type,
        event.resource_id,
        event.version_id,
        focus,
        event.event_code,
    )


class _LeaseLost(Exception):
    """Another worker took the subscription over (this one's lease expired): stop quietly."""


class DeliveryWorker:
    def __init__(
        self,
        queue: SubscriptionQueue,
        topics: dict[str, Topic],
        readers: Mapping[str, ResourceProvider],
        settings: DeliverySettings,
        on_attempt: AttemptObserver | None = None,
    ) -> None:
        """`readers`: the pipelined providers (app.state.pipeline's view), Subscription among them."""
        self._queue = queue
        self._topics = topics
        self._readers = readers
        self._settings = settings
        self._on_attempt = on_attempt
        self._progress = ProgressWriter(queue)
        self._session: aiohttp.ClientSession | None = None
        self._wake: asyncio.Event | None = None
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._stopping = False

    def wake(self) -> None:
        """Look for due subscriptions now instead of at the next poll (call on the worker's loop)."""
        if self._wake is not None:
            self._wake.set()

    async def run_forever(self, stop: asyncio.Event) -> None:
        size = self._settings.concurrency
        self._session = self._open_session(size)
        self._wake = asyncio.Event()
        self._stopping = False
        self._slots = asyncio.Semaphore(size)
        # Leased ahead of the POSTs: a lease round per `size` subscriptions, not one per finished
        # delivery; the semaphore keeps `size` POSTs in flight.
        capacity = size * _LEASED_AHEAD
        running: set[asyncio.Task[None]] = set()
        next_purge = 0.0

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            self.wake()  # a slot is free, and its subscription may have more events

        try:
            while not stop.is_set():
                self._wake.clear()
                started = 0
                if capacity - len(running) >= size or not running:
                    try:
                        started = await self._start(capacity - len(running), running, finished)
                    except Exception:
                        log.exception("Leasing subscriptions for delivery failed")
                if self._settings.retention is not None and time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + min(60.0, self._settings.retention / 4)
                    await self._purge()
                if not started:
                    await self._sleep(stop)
        finally:
            self._stopping = True
            if running:
                await asyncio.gather(*running, return_exceptions=True)
            await self._session.close()
            self._session = None

    async def run_once(self) -> int:
        """One round for tests and tools: lease what is due, deliver it all, return how many
        subscriptions were worked on."""
        own_session = self._session is None
        if own_session:
            self._session = self._open_session(self._settings.concurrency)
        try:
            running: set[asyncio.Task[None]] = set()
            count = await self._start(self._settings.concurrency, running, running.discard)
            if running:
                await asyncio.gather(*running, return_exceptions=True)
            return count
        finally:
            if own_session and self._session is not None:
                await self._session.close()
                self._session = None

    def _open_session(self, size: int) -> aiohttp.ClientSession:
        """One aiohttp session with at most `size` connections (keep-alive per receiver). aiohttp,
        not httpx as elsewhere: a notification POST costs it about a quarter of httpx's CPU, which
        decides a fan-out to 1,000 subscriptions on a busy event loop (ADR 0026, "Delivery client")."""
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=size, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout),
        )

    async def _sleep(self, stop: asyncio.Event) -> None:
        assert self._wake is not None
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waiters, timeout=self._settings.poll_interval, return_when="FIRST_COMPLETED")
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _start(
        self, slots: int, running: set[asyncio.Task[None]], finished: Callable[[asyncio.Task[None]], None]
    ) -> int:
        leased = await run_in_threadpool(self._queue.lease, slots, self._settings.lease_seconds)
        if not leased:
            return 0
        active = [item for item in leased if item.status != "requested"]
        pending = await run_in_threadpool(self._queue.pending, active, self._settings.batch)
        for item in leased:
            task = asyncio.create_task(
                self._guarded(item, pending.get(item.subscription_id, [])),
                name=f"deliver-Subscription/{item.subscription_id}",
            )
            running.add(task)
            task.add_done_callback(finished)
        return len(leased)

    async def _purge(self) -> None:
        assert self._settings.retention is not None
        cutoff = datetime.now(UTC) - timedelta(seconds=self._settings.retention)
        try:
            removed = await run_in_threadpool(self._queue.purge, cutoff)
        except Exception:
            log.exception("Purging delivered subscription events failed")
            return
        if removed:
            log.info("Purged %d delivered subscription events older than %s", removed, cutoff.isoformat())

    async def _guarded(self, leased: Leased, events: list[EventRow]) -> None:
        try:
            async with self._slots:
                await self._deliver(leased, events)
        except _LeaseLost:
            log.warning("Subscription/%s: lease taken over by another worker", leased.subscription_id)
        except Exception:
            log.exception("Delivery for Subscription/%s failed", leased.subscription_id)
            # Let the lease run out rather than guess: the subscription comes back after it.

    async def _record(self, leased: Leased, lease: datetime, **values: Any) -> None:
        if not await self._progress.record(Progress(leased.subscription_id, lease, values)):
            raise _LeaseLost(leased.subscription_id)

    async def _deliver(self, leased: Leased, events: list[EventRow]) -> None:
        lease = leased.lease_until
        try:
            spec = parse_subscription(leased.resource, self._topics)
        except FhirError:
            await self._record(leased, lease, lease_until=None)
            return
        if leased.status == "requested":
            bundle = notification_bundle(
                self._settings.base_url, leased.resource, "handshake", leased.events_count, [], spec.content
            )
            failure = await self._post(leased, spec, bundle, "handshake", None, None)
            if failure is None:
                await self._set_status(leased, "active")  # before the release: no second handshake
                done = {"failures": 0, "last_error": None, "last_sent_at": datetime.now(UTC)}
                await self._record(leased, lease, lease_until=None, **done)
            else:
                await self._failed(leased, lease, failure)
            return
        for index, event in enumerate(events):
            if self._stopping:
                break
            notification = await event_notification(self._readers, event, spec.content, leased.author)
            focus = notification.resource
            bundle = notification_bundle(
                self._settings.base_url,
                leased.resource,
                "event-notification",
                leased.events_count,
                [notification],
                spec.content,
            )
            failure = await self._post(leased, spec, bundle, "event-notification", event, focus)
            if failure is not None:
                await self._failed(leased, lease, failure)
                return
            # The last one ends the lease in the same write (one commit per subscription in a fan-out).
            last = index == len(events) - 1 and leased.status != "error"
            renewed = None if last else datetime.now(UTC) + timedelta(seconds=self._settings.lease_seconds)
            await self._record(
                leased,
                lease,
                delivered_through=event.event_number,
                failures=0,
                last_error=None,
                last_sent_at=datetime.now(UTC),  # heartbeats are due a period after it (heartbeat.py)
                lease_until=renewed,
            )
            if renewed is None:
                return
            lease = renewed
        if leased.status == "error":
            await self._set_status(leased, "active")
        await self._record(leased, lease, lease_until=None)

    async def _post(
        self,
        leased: Leased,
        spec: SubscriptionSpec,
        bundle: dict[str, Any],
        kind: str,
        event: EventRow | None,
        focus: dict[str, Any] | None,
    ) -> str | None:
        """POST the notification; None on a 2xx, else what went wrong. Reported to `on_attempt`."""
        assert self._session is not None, "run_forever or run_once opens the session"
        headers = {"Content-Type": "application/fhir+json", **dict(spec.headers)}
        started = datetime.now(UTC)
        status: int | None = None
        try:
            async with self._session.post(
                spec.endpoint, data=json.dumps(bundle), headers=headers, allow_redirects=False
            ) as response:
                await response.read()  # the connection goes back to the pool only when read
                status = response.status
            failure = None if 200 <= status < 300 else f"HTTP {status}"
        except (aiohttp.ClientError, TimeoutError) as error:
            failure = f"{type(error).__name__}: {error or 'timed out'}"
        if self._on_attempt is not None:
            attempt = DeliveryAttempt(
                leased.subscription_id,
                leased.author,
                spec.endpoint,
                kind,
                spec.content,
                event,
                focus,
                status,
                failure,
                started,
                datetime.now(UTC),
            )
            try:
                await self._on_attempt(attempt)
            except Exception:
                log.exception(
                    "Recording the delivery attempt for Subscription/%s failed", leased.subscription_id
                )
        return failure

    async def _failed(self, leased: Leased, lease: datetime, failure: str) -> None:
        failures = leased.failures + 1
        delay = min(_MAX_BACKOFF, self._settings.retry_seconds * 2 ** (failures - 1))
        retry_at = datetime.now(UTC) + timedelta(seconds=delay)
        log.warning(
            "Subscription/%s: delivery failed (%s), retry in %.1fs", leased.subscription_id, failure, delay
        )
        await self._record(
            leased,
            lease,
            failures=failures,
            next_attempt_at=retry_at,
            last_error=failure[:2000],
            lease_until=None,
        )
        if failures >= self._settings.max_failures and leased.status != "error":
            await self._set_status(leased, "error")

    async def _set_status(self, leased: Leased, status: str) -> None:
        """Record a status the server manages as a new version of the Subscription, written by the
        server (no caller) with the subscription's author kept as the version's author."""
        provider = self._readers["Subscription"]
        token = WRITE_AUTHOR.set(leased.author)
        try:
            with origin_scope(Origin.INTERNAL), on_server_authority():
                current = await provider.read(leased.subscription_id)
                if current.get("status") == status:
                    return
                await provider.update(leased.subscription_id, {**current, "status": status}, if_match=None)
        except FhirError as error:
            log.warning("Subscription/%s: status %s not recorded: %s", leased.subscription_id, status, error)
        finally:
            WRITE_AUTHOR.reset(token)
