"""The rest-hook delivery worker: an in-process task of the app's lifespan, like the sync worker.

Each round leases due subscriptions (queue.py: one lease per subscription, so its events go out in
number order) and, for each, either makes the handshake (status `requested`; a 2xx makes it
`active`, Backport IG "Handshake") or POSTs one notification per pending event, oldest first,
stopping at the first failure. A failure schedules a retry with exponential backoff; after
FACADE_SUBSCRIPTION_MAX_FAILURES in a row the subscription's status becomes `error` (a new version
written by the server), and the next successful delivery makes it `active` again: events keep
being numbered while it is in `error`, so a receiver that comes back gets every one it missed, in
order. Delivery is at least once: a crash between the POST and the recorded progress sends that
event again, with the same event number for the receiver to drop it.

`full-resource` content is read through the interaction pipeline acting as the subscription's
author (`acting_as`, ADR 0009/0022): what the author may not read is not sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from starlette.concurrency import run_in_threadpool

from fhir_facade.auth.access import Access, acting_as, on_server_authority
from fhir_facade.fhir.errors import FhirError
from fhir_facade.fhir.pipeline import Origin, origin_scope
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.store.authorship import WRITE_AUTHOR
from fhir_facade.subscriptions.backport import SubscriptionSpec, parse_subscription
from fhir_facade.subscriptions.notification import NotificationEvent, notification_bundle
from fhir_facade.subscriptions.queue import EventRow, Leased, SubscriptionQueue
from fhir_facade.subscriptions.topics import Topic

__all__ = ["DeliverySettings", "DeliveryWorker", "read_focus"]

log = logging.getLogger(__name__)

_MAX_BACKOFF = 300.0


@dataclass(frozen=True)
class DeliverySettings:
    base_url: str
    max_failures: int
    retry_seconds: float
    poll_interval: float
    timeout: float
    lease_seconds: float = 60.0
    batch: int = 20


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


class DeliveryWorker:
    def __init__(
        self,
        queue: SubscriptionQueue,
        topics: dict[str, Topic],
        readers: Mapping[str, ResourceProvider],
        settings: DeliverySettings,
    ) -> None:
        """`readers`: the pipelined providers (app.state.pipeline's view), Subscription among them."""
        self._queue = queue
        self._topics = topics
        self._readers = readers
        self._settings = settings
        self._client: httpx.AsyncClient | None = None

    async def run_forever(self, stop: asyncio.Event) -> None:
        self._client = httpx.AsyncClient(timeout=self._settings.timeout, follow_redirects=False)
        try:
            while not stop.is_set():
                try:
                    worked = await self.run_once()
                except Exception:
                    log.exception("Subscription delivery round failed")
                    worked = 0
                if not worked:
                    with suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self._settings.poll_interval)
        finally:
            await self._client.aclose()

    async def run_once(self) -> int:
        """One round; returns how many subscriptions it worked on."""
        leased = await run_in_threadpool(self._queue.lease, 50, self._settings.lease_seconds)
        for subscription in leased:
            try:
                await self._deliver(subscription)
            except Exception:
                log.exception("Delivery for Subscription/%s failed", subscription.subscription_id)
                await run_in_threadpool(self._queue.release, subscription.subscription_id)
        return len(leased)

    async def _deliver(self, leased: Leased) -> None:
        try:
            spec = parse_subscription(leased.resource, self._topics)
        except FhirError:
            await run_in_threadpool(self._queue.release, leased.subscription_id)
            return
        if leased.status == "requested":
            bundle = notification_bundle(
                self._settings.base_url, leased.resource, "handshake", leased.events_count, [], spec.content
            )
            failure = await self._post(spec, bundle)
            if failure is None:
                await run_in_threadpool(self._queue.handshaken, leased.subscription_id)
                await self._set_status(leased, "active")
            else:
                await self._failed(leased, failure)
            return
        events = await run_in_threadpool(
            self._queue.events, leased.subscription_id, leased.delivered_through, None, self._settings.batch
        )
        for event in events:
            focus = None
            if spec.content == "full-resource":
                with origin_scope(Origin.INTERNAL), _as(leased.author):
                    focus = await read_focus(self._readers, event)
            notification = NotificationEvent(
                event.event_number,
                event.occurred_at,
                event.resource_type,
                event.resource_id,
                event.version_id,
                focus,
                event.event_code,
            )
            bundle = notification_bundle(
                self._settings.base_url,
                leased.resource,
                "event-notification",
                leased.events_count,
                [notification],
                spec.content,
            )
            failure = await self._post(spec, bundle)
            if failure is not None:
                await self._failed(leased, failure)
                return
            await run_in_threadpool(self._queue.delivered, leased.subscription_id, event.event_number)
        if leased.status == "error":
            await self._set_status(leased, "active")
        await run_in_threadpool(self._queue.release, leased.subscription_id)

    async def _post(self, spec: SubscriptionSpec, bundle: dict[str, Any]) -> str | None:
        """POST the notification; None on a 2xx, else what went wrong."""
        assert self._client is not None
        headers = {"Content-Type": "application/fhir+json", **dict(spec.headers)}
        try:
            response = await self._client.post(spec.endpoint, json=bundle, headers=headers)
        except httpx.HTTPError as error:
            return f"{type(error).__name__}: {error}"
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"

    async def _failed(self, leased: Leased, failure: str) -> None:
        failures = leased.failures + 1
        delay = min(_MAX_BACKOFF, self._settings.retry_seconds * 2 ** (failures - 1))
        retry_at = datetime.now(UTC) + timedelta(seconds=delay)
        log.warning(
            "Subscription/%s: delivery failed (%s), retry in %.1fs", leased.subscription_id, failure, delay
        )
        await run_in_threadpool(self._queue.failed, leased.subscription_id, failures, retry_at, failure)
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
