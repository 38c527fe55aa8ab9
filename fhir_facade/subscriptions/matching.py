"""Matching a change against the Subscriptions, in the transaction that writes it.

A pre-commit handler of `VersionStored` (ADR 0022: the phase whose writes commit or roll back with
the version itself, as the outbox's): every stored version of a topic's resource type is matched
against the `active` and `error` Subscriptions of that type, and each match becomes a
`subscription_event` row with the subscription's next event number. The counter is incremented in
the same transaction, so the numbers have no gaps and follow commit order (a rolled-back write
takes its numbers with it). A Subscription's own versions keep its `subscription_state` row.

Confinement: a change is an event for a Subscription only if the Subscription's author (the
principal that wrote it, ADR 0009) may read the resource; a `patient/` subscription never gets a
number for another patient's resource, so not even its id leaves the server.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, delete, insert, select, update

from fhir_facade.auth.access import Access
from fhir_facade.auth.compartment import compartment_rule, patient_references
from fhir_facade.auth.scopes import Interaction
from fhir_facade.fhir.errors import FhirError
from fhir_facade.fhir.pipeline import EventBus, VersionStored
from fhir_facade.store.authorship import WRITE_AUTHOR
from fhir_facade.store.engine import WRITE
from fhir_facade.store.tables import VERSION
from fhir_facade.subscriptions.backport import SubscriptionSpec, parse_subscription
from fhir_facade.subscriptions.study_changes import STUDY_DELETED, classify, forget
from fhir_facade.subscriptions.tables import EVENT, STATE
from fhir_facade.subscriptions.topics import Topic

__all__ = ["SubscriptionMatcher", "author_may_read"]

log = logging.getLogger(__name__)

#: Statuses that collect events (`error` too: a receiver that recovers gets what it missed).
COLLECTING = ("active", "error")
#: Parsed Subscriptions kept by the matcher (by their stored JSON); cleared when full.
_SPEC_CACHE = 4096


def author_may_read(author: str | None, resource: dict[str, Any], base_url: str) -> bool:
    """Whether the principal `author` (None: the server, or FACADE_AUTH=none) may read `resource`:
    its scopes grant read on the type and, when confined, the resource is in one of its patients'
    compartments (the rules of auth/compartment.py, as the authorization stage applies them)."""
    if author is None:
        return True
    access = Access.from_principal(author)
    resource_type = str(resource.get("resourceType"))
    if not access.allows(Interaction.READ, resource_type):
        return False
    try:
        patients = access.confinement(Interaction.READ, resource_type)
    except FhirError:
        return False  # a patient/ grant without patient context reads nothing
    if patients is None:
        return True
    rule = compartment_rule(resource_type)
    if rule is None:
        return True  # the type holds no patient data
    return not patients.isdisjoint(patient_references(resource, rule, base_url))


class SubscriptionMatcher:
    def __init__(self, topics: dict[str, Topic], base_url: str) -> None:
        self._topics = topics
        self._types = {t.resource_type for t in topics.values()}
        self._base_url = base_url
        self._specs: dict[str, SubscriptionSpec | None] = {}

    def subscribe_to(self, bus: EventBus) -> None:
        bus.on_precommit(VersionStored, self.on_version)

    def on_version(self, connection: Connection, version: VersionStored) -> None:
        if version.resource_type == "Subscription":
            self._keep_state(connection, version)
        elif version.resource_type in self._types:
            self._match(connection, version)

    def _keep_state(self, connection: Connection, version: VersionStored) -> None:
        key = STATE.c.subscription_id == version.resource_id
        if version.deleted:
            connection.execute(delete(EVENT).where(EVENT.c.subscription_id == version.resource_id))
            connection.execute(delete(STATE).where(key))
            return
        resource = version.resource
        channel, heartbeat = "rest-hook", None
        try:
            spec = parse_subscription(resource, self._topics)
            topic, resource_type = spec.topic.url, spec.topic.resource_type
            channel, heartbeat = spec.channel, spec.heartbeat_period
        except FhirError:  # written around the provider's checks: kept, never matched
            topic, resource_type = str(resource.get("criteria", "")), ""
        status = str(resource.get("status", "off"))
        values: dict[str, Any] = {
            "topic": topic,
            "resource_type": resource_type,
            "channel": channel,  # ADR 0028: the rest-hook worker leases only rest-hook rows
            "heartbeat_seconds": heartbeat,
            "status": status,
            "author": WRITE_AUTHOR.get(),
            "resource_json": json.dumps(resource, separators=(",", ":")),
        }
        if status == "requested":  # (again) due for a handshake now
            values.update(next_attempt_at=version.at, failures=0)
        row = connection.execute(select(STATE.c.subscription_id).where(key).with_for_update()).first()
        if row is None:
            fresh = {"events_count": 0, "delivered_through": 0, "failures": 0, "next_attempt_at": version.at}
            connection.execute(
                insert(STATE).values(subscription_id=version.resource_id, **{**fresh, **values})
            )
        else:
            connection.execute(update(STATE).where(key).values(**values))

    def _match(self, connection: Connection, version: VersionStored) -> None:
        candidates = connection.execute(
            select(STATE.c.subscription_id, STATE.c.author, STATE.c.resource_json)
            .where(STATE.c.resource_type == version.resource_type, STATE.c.status.in_(COLLECTING))
            # One lock order for every transaction that updates several state rows (the
            # delivery's group commit too): concurrent writers queue, they do not deadlock.
            .order_by(STATE.c.subscription_id)
        ).all()
        if not candidates:
            return
        before = self._before(connection, version)
        matched: list[str] = []
        after = None if version.deleted else version.resource
        change = "delete" if version.deleted else ("create" if before is None else "update")
        for candidate in candidates:
            spec = self._spec(candidate.resource_json)
            if spec is None:
                continue
            if not spec.topic.triggered(change, before, after):
                continue
            current = after if after is not None else before
            if current is None or not spec.topic.matches(spec.filters, current):
                continue
            if not author_may_read(candidate.author, current, self._base_url):
                continue
            matched.append(candidate.subscription_id)
        at = version.at if version.at.tzinfo else version.at.replace(tzinfo=UTC)
        self._record(connection, matched, version.resource_type, version.resource_id, version.version, at)

    @staticmethod
    def _before(connection: Connection, version: VersionStored) -> dict[str, Any] | None:
        if version.version <= 1:
            return None
        row = connection.execute(
            select(VERSION.c.resource_json, VERSION.c.deleted).where(
                VERSION.c.resource_type == version.resource_type,
                VERSION.c.resource_id == version.resource_id,
                VERSION.c.version_id == version.version - 1,
            )
        ).first()
        if row is None or row.deleted:
            return None
        loaded: dict[str, Any] = json.loads(row.resource_json)
        return loaded

    def record_study(self, engine: Engine, study: dict[str, Any], at: datetime) -> int:
        """A study became stable in the PACS (`StudyArrived`): classified `study-available` (first
        time) or `study-changed` (other series or instances than last time; the same ones: a
        replay, no event) by study_changes.py, then an event, numbered like the others in one
        transaction of its own (the watcher has none), for each `active`/`error` subscription of a
        topic with that event trigger whose filters and author accept the live ImagingStudy
        `study`. Version 0: the focus is the live resource. Returns how many.

        A watcher retry of a study some other consumer failed on is such a replay: the
        classification committed with the first attempt's events, so the retry numbers none
        (tests/subscriptions/test_study_arrival_once.py)."""
        with engine.connect().execution_options(**{WRITE: True}) as connection, connection.begin():
            code = classify(connection, study, at)
            if code is None:
                return 0
            return self._record_study_event(connection, study, at, code)

    def record_study_deleted(self, engine: Engine, study: dict[str, Any], at: datetime) -> int:
        """A study was deleted through the facade (ADR 0040): a `study-deleted` event for each
        subscription of the study topic that takes it and whose author could read the study as it
        was (`study`, read before the delete); the study is forgotten, so a resend is "available"."""
        with engine.connect().execution_options(**{WRITE: True}) as connection, connection.begin():
            forget(connection, str(study["id"]))
            return self._record_study_event(connection, study, at, STUDY_DELETED)

    def _record_study_event(
        self, connection: Connection, study: dict[str, Any], at: datetime, code: str
    ) -> int:
        """Number event `code` of the live (or last seen) ImagingStudy `study` for every matching
        subscription, in the caller's transaction."""
        matched: list[str] = []
        candidates = connection.execute(
            select(STATE.c.subscription_id, STATE.c.author, STATE.c.resource_json)
            .where(STATE.c.resource_type == "ImagingStudy", STATE.c.status.in_(COLLECTING))
            .order_by(STATE.c.subscription_id)
        ).all()
        for candidate in candidates:
            spec = self._spec(candidate.resource_json)
            if spec is None:
                continue
            if code not in spec.topic.events or not spec.topic.matches(spec.filters, study):
                continue
            if not author_may_read(candidate.author, study, self._base_url):
                continue
            matched.append(candidate.subscription_id)
        self._record(connection, matched, "ImagingStudy", str(study["id"]), 0, at, code)
        return len(matched)

    def _spec(self, resource_json: str) -> SubscriptionSpec | None:
        """The parsed Subscription of a state row, cached by its JSON (a fan-out to many
        subscriptions parses each once, not once per write)."""
        if resource_json in self._specs:
            return self._specs[resource_json]
        try:
            spec: SubscriptionSpec | None = parse_subscription(json.loads(resource_json), self._topics)
        except FhirError:
            spec = None
        if len(self._specs) >= _SPEC_CACHE:
            self._specs.clear()
        self._specs[resource_json] = spec
        return spec

    @staticmethod
    def _record(
        connection: Connection,
        subscription_ids: list[str],
        resource_type: str,
        resource_id: str,
        version_id: int,
        at: datetime,
        event_code: str | None = None,
    ) -> None:
        """Number one event for each subscription: their counters incremented in one statement,
        their rows inserted in one. The state rows are locked first, in subscription id order (the
        order delivery's group commit takes them in), so concurrent writers queue without
        deadlocking and number their events one after the other."""
        if not subscription_ids:
            return
        ids = sorted(subscription_ids)
        key = STATE.c.subscription_id.in_(ids)
        connection.execute(
            select(STATE.c.subscription_id).where(key).order_by(STATE.c.subscription_id).with_for_update()
        ).all()
        numbers = connection.execute(
            update(STATE)
            .where(key)
            .values(events_count=STATE.c.events_count + 1)
            .returning(STATE.c.subscription_id, STATE.c.events_count)
        ).all()
        connection.execute(
            insert(EVENT),
            [
                {
                    "subscription_id": subscription_id,
                    "event_number": int(number),
                    "resource_type": resource_type,
                    "resource_id": resource_id,
                    "version_id": version_id,
                    "occurred_at": at,
                    "event_code": event_code,
                }
                for subscription_id, number in numbers
            ],
        )
