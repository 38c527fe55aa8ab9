"""The subscription event rows as a work queue: lease due subscriptions, read their events, record
progress. One lease per subscription (its `subscription_state` row), so its events go out one
after the other, in number order, whatever the number of workers (ADR 0026; the pattern of the
sync outbox, ADR 0007: short lease transactions, the POST outside them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, or_, select, update

from fhir_facade.store.engine import WRITE
from fhir_facade.subscriptions.tables import EVENT, STATE

__all__ = ["EventRow", "Leased", "SubscriptionQueue"]


@dataclass(frozen=True)
class Leased:
    """A subscription leased for delivery, as it stood when leased."""

    subscription_id: str
    status: str
    author: str | None
    resource: dict[str, Any]
    events_count: int
    delivered_through: int
    failures: int


@dataclass(frozen=True)
class EventRow:
    event_number: int
    resource_type: str
    resource_id: str
    version_id: int
    occurred_at: datetime
    #: The event trigger's code (study topic), None for a resource trigger.
    event_code: str | None = None


class SubscriptionQueue:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def lease(self, limit: int, lease_seconds: float, now: datetime | None = None) -> list[Leased]:
        """Subscriptions that are due (a handshake to make, or events past the last delivered one)
        and that no worker holds, leased to the caller."""
        now = now or datetime.now(UTC)
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
        leased: list[Leased] = []
        with self._engine.connect().execution_options(**{WRITE: True}) as connection, connection.begin():
            rows = connection.execute(
                select(STATE).where(due).order_by(STATE.c.next_attempt_at).limit(limit)
            ).all()
            for row in rows:
                # Conditional: a replica that leased the row meanwhile wins, we skip it.
                taken = connection.execute(
                    update(STATE)
                    .where(STATE.c.subscription_id == row.subscription_id, due)
                    .values(lease_until=now + timedelta(seconds=lease_seconds))
                )
                if taken.rowcount:
                    leased.append(
                        Leased(
                            row.subscription_id,
                            row.status,
                            row.author,
                            json.loads(row.resource_json),
                            int(row.events_count),
                            int(row.delivered_through),
                            int(row.failures),
                        )
                    )
        return leased

    def events(
        self, subscription_id: str, since: int, until: int | None = None, limit: int = 100
    ) -> list[EventRow]:
        """Events numbered above `since` (and at most `until`), in order."""
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

    def delivered(self, subscription_id: str, through: int) -> None:
        """Events up to `through` reached the receiver: the failure count starts over. The lease is
        kept (the worker goes on with the next event)."""
        with self._engine.connect().execution_options(**{WRITE: True}) as connection, connection.begin():
            connection.execute(
                update(STATE)
                .where(STATE.c.subscription_id == subscription_id)
                .values(
                    delivered_through=through, failures=0, last_error=None, last_sent_at=datetime.now(UTC)
                )
            )

    def handshaken(self, subscription_id: str) -> None:
        self._set(subscription_id, failures=0, last_error=None, last_sent_at=datetime.now(UTC))

    def failed(self, subscription_id: str, failures: int, retry_at: datetime, error: str) -> None:
        self._set(subscription_id, failures=failures, next_attempt_at=retry_at, last_error=error[:2000])

    def release(self, subscription_id: str) -> None:
        self._set(subscription_id)

    def _set(self, subscription_id: str, **values: object) -> None:
        with self._engine.connect().execution_options(**{WRITE: True}) as connection, connection.begin():
            connection.execute(
                update(STATE)
                .where(STATE.c.subscription_id == subscription_id)
                .values(lease_until=None, **values)
            )
