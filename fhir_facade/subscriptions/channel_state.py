"""What the websocket channel and the heartbeats read and write of `subscription_state` (the
columns of migration 8, docs/adr/0028-websocket-channel.md): a subscription's current state, the
rest-hook heartbeats that are due (claimed by a conditional UPDATE, so one replica sends each),
and the progress of websocket delivery."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, or_, select, update

from fhir_facade.store.engine import WRITE
from fhir_facade.subscriptions.tables import STATE

__all__ = ["ChannelState", "ChannelStates", "heartbeat_due"]


def heartbeat_due(last_sent: datetime | None, period: int | None, now: datetime) -> bool:
    """Whether nothing was sent for `period` seconds (IG "Heartbeats": a heartbeat notification is
    sent when no other notification was sent in the period); never without a period."""
    if period is None:
        return False
    return last_sent is None or now - last_sent >= timedelta(seconds=period)


@dataclass(frozen=True)
class ChannelState:
    subscription_id: str
    status: str
    author: str | None
    resource: dict[str, Any]
    channel: str
    events_count: int
    delivered_through: int
    heartbeat_seconds: int | None
    last_sent_at: datetime | None


def _state(row: Any) -> ChannelState:
    return ChannelState(
        row.subscription_id,
        row.status,
        row.author,
        json.loads(row.resource_json),
        row.channel,
        int(row.events_count),
        int(row.delivered_through),
        None if row.heartbeat_seconds is None else int(row.heartbeat_seconds),
        row.last_sent_at,
    )


class ChannelStates:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def get(self, subscription_id: str) -> ChannelState | None:
        with self._engine.connect() as connection:
            row = connection.execute(select(STATE).where(STATE.c.subscription_id == subscription_id)).first()
        return None if row is None else _state(row)

    def heartbeats_due(self, now: datetime | None = None) -> list[ChannelState]:
        """Active rest-hook subscriptions with a heartbeat period, nothing pending (a pending event
        is a notification the worker is about to send) and nothing sent for that period."""
        now = now or datetime.now(UTC)
        with self._engine.connect() as connection:
            rows = connection.execute(
                select(STATE).where(
                    STATE.c.channel == "rest-hook",
                    STATE.c.status == "active",
                    STATE.c.heartbeat_seconds.is_not(None),
                    STATE.c.events_count == STATE.c.delivered_through,
                )
            ).all()
        states = [_state(r) for r in rows]
        return [s for s in states if heartbeat_due(s.last_sent_at, s.heartbeat_seconds, now)]

    def claim_heartbeat(self, state: ChannelState, now: datetime | None = None) -> bool:
        """Take the heartbeat of `state` (records it as sent now); False when another replica, or a
        delivery, sent something meanwhile or the subscription is leased for delivery."""
        now = now or datetime.now(UTC)
        assert state.heartbeat_seconds is not None
        threshold = now - timedelta(seconds=state.heartbeat_seconds)
        with self._engine.connect().execution_options(**{WRITE: True}) as connection, connection.begin():
            taken = connection.execute(
                update(STATE)
                .where(
                    STATE.c.subscription_id == state.subscription_id,
                    STATE.c.status == "active",
                    or_(STATE.c.last_sent_at.is_(None), STATE.c.last_sent_at <= threshold),
                    or_(STATE.c.lease_until.is_(None), STATE.c.lease_until < now),
                )
                .values(last_sent_at=now)
            )
        return bool(taken.rowcount)

    def sent_on_socket(self, subscription_id: str, through: int | None, now: datetime | None = None) -> None:
        """A notification went out on a socket: `last_sent_at` is now, and `delivered_through`
        becomes `through` if that is higher (the highest event number sent to at least one bound
        socket, ADR 0028)."""
        now = now or datetime.now(UTC)
        key = STATE.c.subscription_id == subscription_id
        with self._engine.connect().execution_options(**{WRITE: True}) as connection, connection.begin():
            connection.execute(update(STATE).where(key).values(last_sent_at=now))
            if through is not None:
                connection.execute(
                    update(STATE)
                    .where(and_(key, STATE.c.delivered_through < through))
                    .values(delivered_through=through)
                )
