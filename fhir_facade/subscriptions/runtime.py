"""Topic-based Subscriptions as the application runs them (docs/adr/0026-subscriptions-design.md):
the matcher on the bus from the start (before any write), the Subscription provider, the topics
as read-only Basic resources, the delivery and heartbeat workers in the lifespan, the
`$status`/`$events`/`$get-ws-binding-token` routes and the websocket channel's socket
(docs/adr/0028-websocket-channel.md).

The delivery worker is woken after the commit of every change of a subscribed type (an
after-commit subscriber of `ResourceChanged`) and after study events are recorded, so a
notification leaves at once instead of at the next poll; the poll remains for events other
replicas record. Each rest-hook delivery attempt becomes an AuditEvent (audit/notification.py)
when the audit is on."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from fhir_facade.audit.notification import notification_audit_event
from fhir_facade.audit.recorder import AuditRecorder
from fhir_facade.auth.access import on_server_authority
from fhir_facade.auth.compartment import compartment_rule, patient_references
from fhir_facade.config import Settings
from fhir_facade.fhir.pipeline import ChangeKind, Origin, ResourceChanged, origin_scope
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.store import ResourceStore
from fhir_facade.subscriptions.binding_tokens import BindingTokens
from fhir_facade.subscriptions.channel_state import ChannelStates
from fhir_facade.subscriptions.delivery import DeliveryAttempt, DeliverySettings, DeliveryWorker
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
        self.provider = SubscriptionProvider(store, self.topics, settings.subscription.endpoints)
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

    def bind(self, visible: Sequence[ResourceProvider], audit: AuditRecorder | None = None) -> APIRouter:
        """Give the workers, the operations and the websocket channel the pipelined providers (and
        the audit recorder, when the audit is on); returns the operations' routes (which take the
        bearer token; the socket's route, which does not, is `socket_router()`)."""
        readers = {p.resource_type: p for p in visible}
        settings = self._settings
        section = settings.subscription
        studies = readers.get("ImagingStudy")
        if studies is not None and any(t.event == STUDY_AVAILABLE for t in self.topics.values()):
            engine, matcher = self._store.engine, self._matcher

            async def on_study(study: StudyArrived) -> None:
                known = datetime.now(UTC)  # the event's timestamp: when the facade learnt of it
                # Read once as the server; each subscription's author is checked on the resource.
                with origin_scope(Origin.INTERNAL), on_server_authority():
                    resource = await studies.read(study.study_uid)
                if await run_in_threadpool(matcher.record_study, engine, resource, known):
                    self.wake()

            self._store.bus.subscribe(StudyArrived, on_study)

            async def on_study_deleted(change: ResourceChanged) -> None:
                # DELETE ImagingStudy/{id} (ADR 0040): the study as it was before is the focus's last
                # known content, for the filters and each author's rights.
                if change.resource_type != "ImagingStudy" or change.change is not ChangeKind.DELETED:
                    return
                if change.before is None:
                    return
                known = datetime.now(UTC)
                if await run_in_threadpool(matcher.record_study_deleted, engine, change.before, known):
                    self.wake()

            self._store.bus.subscribe(ResourceChanged, on_study_deleted)
        watched = {t.resource_type for t in self.topics.values()} | {"Subscription"}

        async def on_change(change: ResourceChanged) -> None:
            if change.resource_type in watched:
                self.wake()

        self._store.bus.subscribe(ResourceChanged, on_change)
        self._worker = DeliveryWorker(
            self.queue,
            self.topics,
            readers,
            DeliverySettings(
                base_url=settings.base_url,
                max_failures=section.max_failures,
                retry_seconds=section.retry_seconds,
                poll_interval=section.poll_interval,
                timeout=section.timeout,
                lease_seconds=section.lease_seconds,
                concurrency=section.concurrency,
                retention=section.event_retention,
            ),
            on_attempt=self._auditor(audit) if audit is not None else None,
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

    def _auditor(self, recorder: AuditRecorder) -> Callable[[DeliveryAttempt], Awaitable[None]]:
        site, base_url = self._settings.public_root, self._settings.base_url

        async def record(attempt: DeliveryAttempt) -> None:
            event = attempt.event
            focus = None
            if event is not None:
                focus = f"{event.resource_type}/{event.resource_id}"
                if event.version_id:
                    focus += f"/_history/{event.version_id}"
            patients: set[str] = set()
            rule = compartment_rule(attempt.focus["resourceType"]) if attempt.focus else None
            if attempt.focus is not None and rule is not None:
                patients = patient_references(attempt.focus, rule, base_url)
            await recorder.record(
                notification_audit_event(
                    site=site,
                    subscription_id=attempt.subscription_id,
                    endpoint=attempt.endpoint,
                    kind=attempt.kind,
                    content=attempt.content,
                    event_number=event.event_number if event is not None else None,
                    focus=focus,
                    patients=patients,
                    status=attempt.status,
                    error=attempt.error,
                    started=attempt.started,
                    ended=attempt.ended,
                )
            )

        return record

    def wake(self) -> None:
        """Have the worker look for due subscriptions now (events were just committed)."""
        if self._worker is not None:
            self._worker.wake()

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
