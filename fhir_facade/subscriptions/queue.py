"""The subscription event rows as a work queue: lease due subscriptions, read their events, record
progress, purge what was delivered long ago. One lease per subscription (its `subscription_state`
row), so its events go out one after the other, in number order, whatever the number of workers
and replicas (ADR 0026; the pattern of the sync outbox, ADR 0007: short lease transactions, the POST
outside them).

Replicas: on PostgreSQL the lease reads the due rows `FOR UPDATE SKIP LOCKED`, so replicas leasing
at the same moment take disjoint subscriptions without waiting on each other; on SQLite the write
transaction (`BEGIN IMMEDIATE`, store/engine.py) serialises leases, and the same statement, its
`FOR UPDATE` dropped by the dialect, is enough. The lease's expiry (`lease_until`) is also the
worker's fencing token: every progress write is conditional on it, so a worker whose lease expired
and was taken over (a stalled replica) writes nothing and stops, instead of moving another
worker's progress.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, delete, func, or_, select, update

from fhir_facade.store.engine import WRITE
from fhir_facade.subscriptions.tables import EVENT, STATE

__all__ = ["EventRow", "Leased", "Progress", "SubscriptionQueue"]


@dataclass(frozen=True)
class Leased:
    """A subscription leased for delivery, as it stood when leased. `lease_until` is the lease's
    expiry as written, the token every progress write of this lease is conditional on."""

    subscription_id: str
    status: str
    author: str | None
    resource: dict[str, Any]
    events_count: int
    delivered_through: int
    failures: int
    lease_until: datetime


@dataclass(frozen=True)
class EventRow:
    event_number: int
    resource_type: str
    resource_id: str
    version_id: int
    occurred_at: datetime
    #: The event trigger's code (study topic), None for a resource trigger.
    event_code: str | None = None


@dataclass(frozen=True)
class Progress:
    """One change to a leased subscription's state row: applied only while `lease` (the
    `lease_until` the worker holds) is still the row's, i.e. nobody took the subscription over.
    `values` are the columns to set; `lease_until` among them renews (a datetime) or ends (None)
    the lease."""

    subscription_id: str
    lease: datetime
    values: dict[str, Any] = field(default_factory=dict)


class SubscriptionQueue:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def _write(self) -> Any:
        return self._engine.connect().execution_options(**{WRITE: True})

    def lease(self, limit: int, lease_seconds: float, now: datetime | None = None) -> list[Leased]:
        """Up to `limit` subscriptions that are due (a handshake to make, or events past the last
        delivered one) and that no worker holds, leased to the caller, oldest due first."""
        now = now or datetime.now(UTC)
        until = now + timedelta(seconds=lease_seconds)
        due = and_(
            STATE.c.channel == "rest-hook",  # websocket ones go to bound sockets (ADR 0028)
            STATE.c.next_attempt_at <= now,
            or_(STATE.c.lease_until.is_(None), STATE.c.lease_until < now),
            or_(
                STATE.c.status == "requested",
                and_(
                    STATE.c.status.in_(("active", "error")), STATE.c.events_count > STATE.c.delivered_through
                ),
            ),
        )
        with self._write() as connection, connection.begin():
            rows = connection.execute(
                select(STATE)
                .where(due)
                .order_by(STATE.c.next_attempt_at)
                .limit(limit)
                .with_for_update(skip_locked=True)  # PostgreSQL; SQLite: the write lock is held already
            ).all()
            if not rows:
                return []
            ids = [row.subscription_id for row in rows]
            taken = connection.execute(
                update(STATE)
                .where(STATE.c.subscription_id.in_(ids), due)
                .values(lease_until=until)
                .returning(STATE.c.subscription_id)
            ).scalars()
            mine = set(taken)
        return [
            Leased(
                row.subscription_id,
                row.status,
                row.author,
                json.loads(row.resource_json),
                int(row.events_count),
                int(row.delivered_through),
                int(row.failures),
                until,
            )
            for row in rows
            if row.subscription_id in mine
        ]

    def pending(self, leased: list[Leased], per_subscription: int) -> dict[str, list[EventRow]]:
        """The next undelivered events of each leased subscription (at most `per_subscription`
        each, in number order), in one query: a fan-out to many subscriptions reads them once."""
        if not leased:
            return {}
        ranked = (
            select(
                EVENT,
                func.row_number()
                .over(partition_by=EVENT.c.subscription_id, order_by=EVENT.c.event_number)
                .label("rank"),
            )
            .join(STATE, STATE.c.subscription_id == EVENT.c.subscription_id)
            .where(
                EVENT.c.subscription_id.in_([item.subscription_id for item in leased]),
                EVENT.c.event_number > STATE.c.delivered_through,
            )
            .subquery()
        )
        found: dict[str, list[EventRow]] = {}
        with self._engine.connect() as connection:
            rows = connection.execute(
                select(ranked)
                .where(ranked.c.rank <= per_subscription)
                .order_by(ranked.c.subscription_id, ranked.c.event_number)
            ).all()
        for r in rows:
            found.setdefault(r.subscription_id, []).append(
                EventRow(
                    int(r.event_number),
                    r.resource_type,
                    r.resource_id,
                    int(r.version_id),
                    r.occurred_at,
                    r.event_code,
                )
            )
        return found

    def events(
        self, subscription_id: str, since: int, until: int | None = None, limit: int = 100
    ) -> list[EventRow]:
        """Kept events numbered above `since` (and at most `until`), in order."""
        query = select(EVENT).where(EVENT.c.subscription_id == subscription_id, EVENT.c.event_number > since)
        if until is not None:
            query = query.where(EVENT.c.event_number <= until)
        with self._engine.connect() as connection:
            rows = connection.execute(query.order_by(EVENT.c.event_number).limit(limit)).all()
        return [
            EventRow(
                int(r.event_number),
                r.resource_type,
                r.resource_id,
                int(r.version_id),
                r.occurred_at,
                r.event_code,
            )
            for r in rows
        ]

    def counters(self, subscription_id: str) -> tuple[int, int] | None:
        """(events since the subscription started, last delivered event number), None if unknown."""
        with self._engine.connect() as connection:
            row = connection.execute(
                select(STATE.c.events_count, STATE.c.delivered_through).where(
                    STATE.c.subscription_id == subscription_id
                )
            ).first()
        return None if row is None else (int(row.events_count), int(row.delivered_through))

    def apply(self, changes: list[Progress]) -> list[bool]:
        """Apply progress records in one transaction (the worker's group commit: deliveries to
        many subscriptions that finish together cost one commit); for each, whether the lease
        was still the caller's (False: it was taken over, nothing was written). Rows are updated
        in subscription id order, the order matching locks them in too (matching.py), so a batch
        and a write that numbers events for the same subscriptions cannot deadlock."""
        if not changes:
            return []
        applied = [False] * len(changes)
        order = sorted(range(len(changes)), key=lambda i: changes[i].subscription_id)
        with self._write() as connection, connection.begin():
            for index in order:
                change = changes[index]
                result = connection.execute(
                    update(STATE)
                    .where(
                        STATE.c.subscription_id == change.subscription_id,
                        STATE.c.lease_until == change.lease,
                    )
                    .values(**change.values)
                )
                applied[index] = bool(result.rowcount)
        return applied

    def purge(self, before: datetime, limit: int = 10_000) -> int:
        """Delete events that occurred before `before` and reached their receiver (numbered at or
        below their subscription's `delivered_through`); undelivered events are kept whatever
        their age. Returns how many rows went."""
        delivered = (
            select(STATE.c.delivered_through)
            .where(STATE.c.subscription_id == EVENT.c.subscription_id)
            .scalar_subquery()
        )
        old = (
            select(EVENT.c.subscription_id, EVENT.c.event_number)
            .where(EVENT.c.occurred_at < before, EVENT.c.event_number <= delivered)
            .limit(limit)
        )
        with self._write() as connection, connection.begin():
            keys = connection.execute(old).all()
            removed = 0
            by_subscription: dict[str, list[int]] = {}
            for subscription_id, number in keys:
                by_subscription.setdefault(subscription_id, []).append(int(number))
            for subscription_id, numbers in by_subscription.items():
                removed += connection.execute(
                    delete(EVENT).where(
                        EVENT.c.subscription_id == subscription_id, EVENT.c.event_number.in_(numbers)
                    )
                ).rowcount
        return removed
