"""Heartbeats of rest-hook subscriptions (Subscriptions R5 Backport IG 1.1.0, "Heartbeats": the
`backport-heartbeat-period` extension on `Subscription.channel`): an in-process task of the app's
lifespan POSTs a `heartbeat` notification to an `active` subscription's endpoint when nothing was
sent to it for that period, so a receiver can tell a quiet subscription from a broken one.

Which subscriptions are due is read from `subscription_state` (`last_sent_at`, set by every
handshake and delivered event too), and each heartbeat is claimed by a conditional UPDATE before it
is sent, so with several replicas one sends it. A failed heartbeat is logged, not retried: the next
one is due a period later, and events keep their own retries (delivery.py). Websocket heartbeats
are sent by the socket itself (websocket.py).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress

import httpx
from starlette.concurrency import run_in_threadpool

from fhir_facade.fhir.errors import FhirError
from fhir_facade.subscriptions.backport import parse_subscription
from fhir_facade.subscriptions.channel_state import ChannelState, ChannelStates
from fhir_facade.subscriptions.notification import notification_bundle
from fhir_facade.subscriptions.topics import Topic

__all__ = ["HeartbeatWorker", "heartbeat_bundle"]

log = logging.getLogger(__name__)

#: Heartbeat periods are whole seconds; looking once a second is precise enough.
_POLL_SECONDS = 1.0


def heartbeat_bundle(base_url: str, state: ChannelState, topics: dict[str, Topic]) -> dict[str, object]:
    """The `heartbeat` notification of a subscription: its status and event count, no event."""
    content = parse_subscription(state.resource, topics).content
    return notification_bundle(base_url, state.resource, "heartbeat", state.events_count, [], content)


class HeartbeatWorker:
    def __init__(
        self, states: ChannelStates, topics: dict[str, Topic], base_url: str, timeout: float
    ) -> None:
        self._states = states
        self._topics = topics
        self._base_url = base_url
        self._timeout = timeout

    async def run_forever(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=self._timeout, follow_redirects=False) as client:
            while not stop.is_set():
                try:
                    await self.run_once(client)
                except Exception:
                    log.exception("Subscription heartbeat round failed")
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), _POLL_SECONDS)

    async def run_once(self, client: httpx.AsyncClient) -> int:
        """Send the heartbeats that are due; returns how many were sent."""
        sent = 0
        for state in await run_in_threadpool(self._states.heartbeats_due):
            try:
                spec = parse_subscription(state.resource, self._topics)
            except FhirError:
                continue
            if not await run_in_threadpool(self._states.claim_heartbeat, state):
                continue
            bundle = heartbeat_bundle(self._base_url, state, self._topics)
            headers = {"Content-Type": "application/fhir+json", **dict(spec.headers)}
            try:
                response = await client.post(spec.endpoint, json=bundle, headers=headers)
                response.raise_for_status()
                sent += 1
            except httpx.HTTPError as error:
                log.warning("Subscription/%s: heartbeat failed: %s", state.subscription_id, error)
        return sent
