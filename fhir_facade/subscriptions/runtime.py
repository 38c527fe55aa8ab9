"""Topic-based Subscriptions as the application runs them (docs/adr/0026-subscriptions-design.md):
the matcher on the bus from the start (before any write), the Subscription provider, the topics
as read-only Basic resources, the delivery and heartbeat workers in the lifespan, the
`$status`/`$events`/`$get-ws-binding-token` routes and the websocket channel's socket
(docs/adr/0028-websocket-channel.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from fhir_facade.auth.access import on_server_authority
from fhir_facade.config import Settings
from fhir_facade.fhir.pipeline import Origin, origin_scope
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.store import ResourceStore
from fhir_facade.subscriptions.binding_tokens import BindingTokens
from fhir_facade.subscriptions.channel_state import ChannelStates
from fhir_facade.subscriptions.delivery import DeliverySettings, DeliveryWorker
from fhir_facade.subscriptions.heartbeat import HeartbeatWorker
from fhir_facade.subscriptions.matching import SubscriptionMatcher
from fhir_facade.subscriptions.operations import OPERATIONS, build_operations_router
from fhir_facade.subscriptions.provider import SubscriptionProvider
from fhir_facade.subscriptions.queue import SubscriptionQueue
from fhir_facade.subscriptions.topic_basic import TopicBasicProvider
from fhir_facade.subscriptions.topics import STUDY_AVAILABLE, topics
from fhir_facade.subscriptions.websocket import GET_WS_BINDING_TOKEN, WebsocketChannel, WebsocketSettings
from fhir_facade.watcher.change_feed import StudyArrived

__all__ = ["SubscriptionRuntime"]


class SubscriptionRuntime:
    operations = (*OPERATIONS, GET_WS_BINDING_TOKEN)

    def __init__(self, settings: Settings, store: ResourceStore) -> None:
        self._settings = settings
        self.topics = topics()
        self._matcher = SubscriptionMatcher(self.topics, settings.base_url)
        self._matcher.subscribe_to(store.bus)
        self._store = store
        self.queue = SubscriptionQueue(store.engine)
        self.provider = SubscriptionProvider(store, self.topics, settings.subscription_endpoints)
        self._states = ChannelStates(store.engine)
        #: The topics readable as Basic resources (read-only, topic_basic.py).
        self.topic_provider = TopicBasicProvider(t.resource for t in self.topics.values())
        self._worker: DeliveryWorker | None = None
        self._heartbeats = HeartbeatWorker(
            self._states, self.topics, settings.base_url, settings.subscription_timeout
        )
        self._websocket: WebsocketChannel | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def bind(self, visible: Sequence[ResourceProvider]) -> APIRouter:
        """Give the workers, the operations and the websocket channel the pipelined providers;
        returns the operations' routes (which take the bearer token; the socket's route, which does
        not, is `socket_router()`)."""
        readers = {p.resource_type: p for p in visible}
        settings = self._settings
        studies = readers.get("ImagingStudy")
        if studies is not None and any(t.event == STUDY_AVAILABLE for t in self.topics.values()):
            engine, matcher = self._store.engine, self._matcher

            async def on_study(study: StudyArrived) -> None:
                # Read once as the server; each subscription's author is checked on the resource.
                with origin_scope(Origin.INTERNAL), on_server_authority():
                    resource = await studies.read(study.study_uid)
                await run_in_threadpool(matcher.record_study, engine, resource, datetime.now(UTC))

            self._store.bus.subscribe(StudyArrived, on_study)
        self._worker = DeliveryWorker(
            self.queue,
            self.topics,
            readers,
            DeliverySettings(
                base_url=settings.base_url,
                max_failures=settings.subscription_max_failures,
                retry_seconds=settings.subscription_retry_seconds,
                poll_interval=settings.subscription_poll_interval,
                timeout=settings.subscription_timeout,
            ),
        )
        self._websocket = WebsocketChannel(
            readers,
            self.queue,
            self._states,
            BindingTokens(self._store.engine, settings.subscription_ws_token_seconds),
            self.topics,
            WebsocketSettings(
                base_url=settings.base_url,
                poll_interval=settings.subscription_poll_interval,
                enforced=settings.auth == "smart",
                bind_timeout=settings.subscription_ws_token_seconds,
            ),
        )
        routes = APIRouter()
        routes.include_router(build_operations_router(readers, self.queue, self.topics, settings.base_url))
        routes.include_router(self._websocket.operation_router())
        return routes

    def socket_router(self) -> APIRouter:
        """The websocket channel's socket route: the binding token is its credential (ADR 0028)."""
        assert self._websocket is not None, "bind() first"
        return self._websocket.socket_router()

    async def start(self) -> None:
        assert self._worker is not None, "bind() first"
        self._stop = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._worker.run_forever(self._stop), name="subscription-delivery"),
            asyncio.create_task(self._heartbeats.run_forever(self._stop), name="subscription-heartbeat"),
        ]

    async def stop(self) -> None:
        self._stop.set()
        if self._websocket is not None:
            await self._websocket.close_all()
        for task in self._tasks:
            await task
        self._tasks = []
